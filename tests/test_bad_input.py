"""Bad input on the command line, in the segment job and in training: a clear message with exit
code 2 (never a traceback), no silently accepted nonsense, and nothing computed lost."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spml_deploy.serving.segment as segment_mod
from runs import make_run
from spml_deploy.artifacts import read_manifest, write_manifest
from spml_deploy.cli import main
from spml_deploy.errors import ConfigError, SpmlError
from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline
from spml_deploy.serving.segment import run_segment_job
from spml_deploy.data.synth import synthesize


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run", num_classes=4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "ds"
    synthesize(root, n_train=4, n_val=2, size=64, seed=1)
    return root


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(folder / name)
    return folder


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``spml-deploy ARGS`` run in-process."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def _run_quietly(args: list[str]) -> None:
    """``spml-deploy ARGS`` for --help / --version (which may or may not exit via SystemExit)."""
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)


# --------------------------------------------------------------------------------------------
# segment: one output per input, records kept on resume, .txt lists


def test_two_inputs_sharing_a_label_map_are_refused_before_any_work(run, tmp_path, capsys):
    src = _images(tmp_path / "in", ["a.png", "a.jpg", "b.png", "sub/c.png", "sub/c.bmp"])
    out = tmp_path / "out"
    with pytest.raises(SpmlError) as exc:
        run_segment_job(load_pipeline(run), src, out, progress=False)
    text = str(exc.value)
    for name in ("a.png", "a.jpg", "labels/a.png", "sub/c.png", "sub/c.bmp", "labels/sub/c.png"):
        assert name in text
    assert "b.png" not in text.replace("labels/", "")       # only the clashes are listed
    assert not out.exists()                                   # nothing written
    code, err = _cli(["segment", str(run), str(src), str(out), "--quiet"], capsys)
    assert code == 2 and "a.jpg" in err and "Traceback" not in err


def test_a_list_naming_one_image_twice_segments_it_once(run, tmp_path):
    src = _images(tmp_path / "in", ["a.png", "b.png"])
    lst = src / "list.txt"
    lst.write_text("a.png\nb.png\na.png\n")
    report = run_segment_job(load_pipeline(run), lst, tmp_path / "out", progress=False)
    assert report.done == 2
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 2


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs in the job."""


def test_resume_restores_the_record_of_a_label_map_finished_before_a_kill(run, tmp_path,
                                                                          monkeypatch):
    """The crash window: a label map is written (writer thread) but its results.jsonl line is
    not (main thread). A resume must give every finished image exactly one line."""
    src = _images(tmp_path / "in", [f"im{i:02d}.png" for i in range(7)])
    out = tmp_path / "out"
    pipe = load_pipeline(run)
    real_finish = segment_mod._finish
    calls = {"n": 0}

    def finish_then_die(fut, results_f, report):
        calls["n"] += 1
        if calls["n"] == 3:
            fut.result()                       # the label map is on disk ...
            raise _Killed()                    # ... and the process dies before its line
        return real_finish(fut, results_f, report)

    monkeypatch.setattr(segment_mod, "_finish", finish_then_die)
    with pytest.raises(_Killed):
        run_segment_job(pipe, src, out, batch=2, progress=False)
    monkeypatch.setattr(segment_mod, "_finish", real_finish)
    labels = sorted(p.name for p in (out / "labels").glob("*.png"))
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(labels) > len(lines)                       # the window was hit
    # a kill in the middle of a line leaves it cut short
    with open(out / "results.jsonl", "a") as f:
        f.write('{"path": "cut sh')

    report = run_segment_job(pipe, src, out, batch=2, skip_existing=True, progress=False)
    assert report.skipped == len(labels) and report.done == 7 - len(labels)
    assert report.recovered == len(labels) - len(lines)
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["label"]).name for r in records) == [f"im{i:02d}.png" for i in range(7)]
    restored = [r for r in records if r.get("restored")]
    assert len(restored) == report.recovered
    for r in restored:                                     # restored from the label map itself
        lab = np.asarray(Image.open(r["label"]))
        assert r["size"] == [lab.shape[1], lab.shape[0]]
        assert sum(r["classes"].values()) == lab.size
    # a second resume has nothing left to restore
    again = run_segment_job(pipe, src, out, skip_existing=True, progress=False)
    assert again.recovered == 0 and again.skipped == 7
    assert len((out / "results.jsonl").read_text().splitlines()) == 7


def test_list_paths_are_relative_to_the_list_and_errors_name_the_path_tried(run, tmp_path,
                                                                           monkeypatch):
    _images(tmp_path / "photos", ["a.png", "b.png"])
    (tmp_path / "lists").mkdir()
    monkeypatch.chdir(tmp_path)
    # written relative to the working directory: no line exists next to the list -> refused
    wrong = tmp_path / "lists" / "cwd.txt"
    wrong.write_text("photos/a.png\nphotos/b.png\n")
    with pytest.raises(SpmlError) as exc:
        run_segment_job(load_pipeline(run), Path("lists/cwd.txt"), tmp_path / "o1", progress=False)
    text = str(exc.value)
    assert str(tmp_path / "lists" / "photos" / "a.png") in text        # the path tried
    assert "working directory" in text and "list" in text
    # relative to the list: works; a missing line names the absolute path it tried
    good = tmp_path / "lists" / "rel.txt"
    good.write_text("../photos/a.png\n../photos/missing.png\n")
    report = run_segment_job(load_pipeline(run), Path("lists/rel.txt"), tmp_path / "o2",
                             progress=False)
    assert (report.done, report.failed) == (1, 1)
    (line,) = (tmp_path / "o2" / "failed.txt").read_text().splitlines()
    reason = line.split("\t")[1]
    assert str((tmp_path / "photos" / "missing.png").resolve()) in reason.replace("/lists/..", "")
    assert "folder that holds the list" in reason


def test_segment_help_documents_naming_and_lists(capsys):
    _run_quietly(["segment", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "without its extension" in out and "a.png and a.jpg" in out
    assert "resolved against the folder holding the list" in out
    assert "SPML_MAX_PIXELS" in out


# --------------------------------------------------------------------------------------------
# exit code 2 with the option named, instead of a traceback or a silent no-op


def test_segment_output_that_is_a_file(run, tmp_path, capsys):
    src = _images(tmp_path / "in", ["a.png"])
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    code, err = _cli(["segment", str(run), str(src), str(target), "--quiet"], capsys)
    assert code == 2 and "not a folder" in err and str(target) in err
    assert "Traceback" not in err and target.read_text() == "keep me"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_segment_batch_must_be_positive(run, tmp_path, capsys, value):
    src = _images(tmp_path / "in", ["a.png"])
    code, err = _cli(["segment", str(run), str(src), str(tmp_path / "o"), "--batch", value],
                     capsys)
    assert code == 2 and "--batch" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option,value", [("--batch", "0"), ("--lr", "-1"), ("--lr", "0"),
                                          ("--workers", "-1"), ("--iters", "-5"),
                                          ("--iters", "0"), ("--crop", "0"),
                                          ("--val-every", "-1"), ("--threads", "0")])
def test_train_numeric_options_are_checked_at_parse_time(scenes, tmp_path, capsys, option,
                                                         value):
    code, err = _cli(["train", str(scenes), "--out", str(tmp_path / "r"), option, value], capsys)
    assert code == 2 and f"Invalid value for '{option}'" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args", [["data", "synth", "X", "--n-train", "-1"],
                                  ["data", "synth", "X", "--size", "0"],
                                  ["data", "weaken", "X", "--kind", "points", "--seed", "-1"],
                                  ["export", "X", "--batch", "0"],
                                  ["export", "X", "--opset", "11"],
                                  ["export", "X", "--workspace", "0"],
                                  ["export", "X", "--max-side", "0"]])
def test_other_commands_check_numbers_at_parse_time(tmp_path, capsys, args):
    args = [str(tmp_path / "x") if a == "X" else a for a in args]
    code, err = _cli(args, capsys)
    assert code == 2 and f"Invalid value for '{args[-2]}'" in err      # refused by the parser


@pytest.mark.parametrize("key,value", [("lr", "-1"), ("iters", "0"), ("batch", "0"),
                                       ("workers", "-2"), ("classifier_iters", "-1")])
def test_set_overrides_are_range_checked(scenes, tmp_path, capsys, key, value):
    code, err = _cli(["train", str(scenes), "--out", str(tmp_path / "r"),
                      "--set", f"train.{key}={value}"], capsys)
    assert code == 2 and f"train.{key}" in err and "out of range" in err


def test_config_file_values_are_range_checked(tmp_path):
    from spml_deploy.training.train import resolve_config

    with pytest.raises(ConfigError, match="train.lr"):
        resolve_config(3, "points", "tiny", None, {"train": {"lr": -0.5}})
    cfg = resolve_config(3, "points", "tiny", None, {"train": {"classifier_iters": 0}})
    assert cfg.train.classifier_iters == 0                 # 0 is allowed: no final classifier


# --------------------------------------------------------------------------------------------
# messages that say what is wrong


@pytest.mark.parametrize("typed", ["nonexist", "runs/nonexist", "runs/nonexist/model.onnx"])
def test_mistyped_model_path_is_named(tmp_path, capsys, monkeypatch, typed):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    src = _images(tmp_path / "in", ["a.png"])
    code, err = _cli(["segment", typed, str(src), "o", "--quiet"], capsys)
    assert code == 2
    first = err.strip().splitlines()[0]
    assert first.startswith(f"error: {typed}: ") and "does not exist" in first


@pytest.mark.parametrize("command", [["index", "build", "{model}", "{src}", "--out", "idx"],
                                     ["serve", "{model}"]])
def test_mistyped_model_path_is_named_by_index_and_serve(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    src = _images(tmp_path / "in", ["a.png"])
    args = [a.format(model="runs/nonexist", src=src) for a in command]
    code, err = _cli(args, capsys)
    assert code == 2
    named = [ln for ln in err.splitlines() if "runs/nonexist" in ln]
    assert named and "does not exist" in named[0] and "Traceback" not in err
    assert not (tmp_path / "idx").exists()


def test_mistyped_model_path_in_the_backend_loader(tmp_path):
    from spml_deploy.engine.backends import load_backend

    with pytest.raises(SpmlError) as exc:
        load_backend(tmp_path / "nope")
    assert exc.value.path == str(tmp_path / "nope") and "does not exist" in exc.value.message


def test_dataset_without_training_images(tmp_path, scenes, capsys):
    import shutil

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    ann = json.loads((scenes / "annotations.json").read_text())
    (empty / "annotations.json").write_text(json.dumps({**ann, "images": [], "annotations": []}))
    code, err = _cli(["train", str(empty), "--out", str(tmp_path / "r1")], capsys)
    assert code == 2 and "no images to train on" in err and "pick one of" not in err
    nosplit = tmp_path / "nosplit"
    shutil.copytree(scenes, nosplit)
    shutil.rmtree(nosplit / "splits")
    code, err = _cli(["train", str(nosplit), "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "no training images" in err and "splits/train.txt" in err
    assert "train.train_split=all" in err and "pick one of" not in err
    assert not (tmp_path / "r2").exists()                  # refused before the run folder


def _png_bomb(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12000, 60000])   # above our limit only / above Pillow's too
def test_decompression_bomb_message_has_one_limit_and_a_cli_fix(tmp_path, side, monkeypatch):
    from spml_deploy.data import imageio
    from spml_deploy.data.imageio import DEFAULT_MAX_PIXELS, read_image

    monkeypatch.setattr(imageio, "_max_pixels", None)
    monkeypatch.delenv("SPML_MAX_PIXELS", raising=False)

    _png_bomb(tmp_path / "bomb.png", side, side)
    with pytest.raises(SpmlError) as exc:
        read_image(tmp_path / "bomb.png")
    text = str(exc.value)
    limits = {n.replace(",", "") for n in re.findall(r"limit of ([\d,]+)", text)}
    assert limits == {str(DEFAULT_MAX_PIXELS)}
    assert "178956970" not in text and "set_max_pixels" not in text
    assert "SPML_MAX_PIXELS" in exc.value.fix


def test_max_pixels_environment_variable(tmp_path, monkeypatch):
    from spml_deploy.data import imageio
    from spml_deploy.data.imageio import read_image

    monkeypatch.setattr(imageio, "_max_pixels", None)     # no process-wide set_max_pixels

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setenv("SPML_MAX_PIXELS", "1999")
    with pytest.raises(SpmlError, match="limit of 1,999"):
        read_image(tmp_path / "a.png")
    monkeypatch.setenv("SPML_MAX_PIXELS", "2000")
    assert read_image(tmp_path / "a.png").shape == (40, 50, 3)
    monkeypatch.setenv("SPML_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="SPML_MAX_PIXELS"):
        read_image(tmp_path / "a.png")


def test_segment_failed_txt_says_how_to_raise_the_limit(run, tmp_path, monkeypatch):
    from spml_deploy.data import imageio

    monkeypatch.setattr(imageio, "_max_pixels", None)
    monkeypatch.delenv("SPML_MAX_PIXELS", raising=False)
    src = _images(tmp_path / "in", ["a.png"])
    _png_bomb(src / "bomb.png", 60000, 60000)
    report = run_segment_job(load_pipeline(run), src, tmp_path / "out", progress=False)
    assert report.failed == 1
    (line,) = (tmp_path / "out" / "failed.txt").read_text().splitlines()
    assert "SPML_MAX_PIXELS" in line and "100,000,000" in line


def test_knn_on_a_baseline_run_says_what_can_be_done(tmp_path, capsys):
    folder = make_run(tmp_path / "pce", num_classes=4)
    m = read_manifest(folder)
    m.training["baseline"] = "pce"
    write_manifest(folder, m)
    with pytest.raises(SpmlError) as exc:
        load_pipeline(folder, options=PipelineOptions(classifier="knn"))
    text = str(exc.value)
    assert "baseline" in text and "--classifier softmax" in text
    assert "train finishes with it" not in text


def test_train_prints_stages_percent_miou_and_resume_step(scenes, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "run"
    args = ["train", str(scenes), "--out", str(out), "--iters", "2", "--batch", "2", "--crop",
            "64", "--val-every", "1", "--quiet", "--threads", "1",
            "--set", "train.classifier_iters=3"]
    try:
        main(args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert re.search(r"SPML embedding, 2 steps", text)
    assert re.search(r"final classifier f1, 3 steps", text)
    f0_val = re.search(r"val mIoU of f0 at step 2: ([\d.]+)", text).group(1)
    miou = json.loads((out / "spml.json").read_text())["training"]["val"]["miou"]
    # one format, percent, everywhere: the mid-run line of step 2 equals the final f0 line
    assert re.search(rf"step 2: val mIoU {re.escape(f0_val)}\b", text), text
    logged = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    f0_frac = [r["val_miou"] for r in logged if "val_miou" in r][-1]
    assert f0_val == f"{100 * f0_frac:.2f}"
    assert 0 <= miou <= 1
    main(["train", str(scenes), "--out", str(out), "--resume", "--quiet"])
    assert "resuming from step 2 of 2" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# threads, file modes


def test_cli_sets_a_passive_openmp_wait_policy_before_torch_loads(monkeypatch):
    # OpenMP reads the policy when torch loads it: the CLI module must not import torch itself
    res = subprocess.run([sys.executable, "-c", "import sys, spml_deploy.cli; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    _run_quietly(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    _run_quietly(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"          # the user's setting wins


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_temporary_outputs_follow_the_umask(tmp_path, umask):
    from spml_deploy.data.imageio import atomic_write_bytes, make_temp_dir, make_temp_file

    old = os.umask(umask)
    try:
        d = make_temp_dir(tmp_path, prefix="d")
        fd, f = make_temp_file(tmp_path, prefix="f")
        os.close(fd)
        w = atomic_write_bytes(tmp_path / "w.bin", b"x")
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o777 & ~umask
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    assert w.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exported_bundle_follows_the_umask(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from spml_deploy.export.bundle import export_bundle

    old = os.umask(0o022)
    try:
        export_bundle(run, out=tmp_path / "bundle")
    finally:
        os.umask(old)
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "bundle").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_train_with_a_val_split_without_masks_does_not_crash(tmp_path, capsys):
    scenes = tmp_path / "ds"
    synthesize(scenes, n_train=4, n_val=0, size=64, seed=2)          # splits/val.txt is empty
    main(["train", str(scenes), "--out", str(tmp_path / "r"), "--iters", "2", "--batch", "2",
          "--crop", "64", "--val-every", "1", "--quiet", "--set", "train.classifier_iters=0"])
    out = capsys.readouterr().out
    assert "run written to" in out and "mIoU" not in out


@pytest.mark.parametrize("command", [["train", "X", "--out", "Y"], ["segment", "X", "X", "Y"],
                                     ["export", "X"]])
def test_device_is_checked_at_parse_time(tmp_path, capsys, command):
    args = [str(tmp_path / a) if a in ("X", "Y") else a for a in command]
    code, err = _cli([*args, "--device", "gpu0"], capsys)
    assert code == 2 and "Invalid value for '--device'" in err and "cuda:N" in err


def test_sigkill_then_resume_gives_one_record_per_label_map(run, tmp_path):
    """The real thing: SIGKILL a segment process mid-job, resume with --skip-existing."""
    import signal
    import time

    src = _images(tmp_path / "in", [f"im{i:03d}.png" for i in range(40)])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "spml_deploy.cli", "segment", str(run),
                             str(src), str(out), "--batch", "1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "labels").glob("*.png"))) >= 10:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    report = run_segment_job(load_pipeline(run), src, out, skip_existing=True, progress=False)
    assert report.done + report.skipped == 40
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["label"]).name for r in records) == [f"im{i:03d}.png" for i in range(40)]


@pytest.mark.parametrize("args", [["--iters", "0"], ["--n-val", "0"], ["--lr", "-1"],
                                  ["--classifier-iters", "0"], ["--seed", "-2"]])
def test_demo_options_are_checked_when_parsed(tmp_path, capsys, args):
    code, err = _cli(["demo", "--out", str(tmp_path / "d"), *args], capsys)
    assert code == 2 and args[0] in err
    assert not (tmp_path / "d").exists()
