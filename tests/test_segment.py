"""``spml-deploy segment``: outputs, bad files, resume, palette, and the demo end to end."""
from __future__ import annotations

import json
import struct
from dataclasses import replace
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runs import make_run
from spml_deploy.artifacts import read_manifest
from spml_deploy.cli import main
from spml_deploy.engine.pipeline import Pipeline, PipelineOptions, load_pipeline
from spml_deploy.serving.segment import discover, run_segment_job


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run", num_classes=4)


def _png_bomb(path: Path, w: int = 60000, h: int = 60000) -> None:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 41), np.uint8)).save(src / "sub" / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 30, 4), np.uint8), "RGBA").save(src / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (20, 24), np.uint16)).save(src / "deep16.png")
    jpg = src / "corrupt.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:300])
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("this is not an image")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(src / "tiny.png")
    _png_bomb(src / "bomb.png")
    return src


GOOD = {"a.png", "sub/gray.jpg", "rgba.png", "deep16.png"}
BAD = {"corrupt.jpg", "empty.png", "text.png", "tiny.png", "bomb.png"}


def test_bad_files_reported_good_ones_written(run, folder, tmp_path):
    out = tmp_path / "out"
    pipe = load_pipeline(run)
    report = run_segment_job(pipe, folder, out, batch=3, overlay=True, progress=False)
    assert (report.done, report.failed, report.skipped) == (len(GOOD), len(BAD), 0)
    failed = (out / "failed.txt").read_text().splitlines()
    assert {Path(line.split("\t")[0]).relative_to(folder).as_posix() for line in failed} == BAD
    assert all(len(line.split("\t")[1]) > 5 for line in failed)          # a reason for each
    for rel in GOOD:
        lab = Image.open(out / "labels" / (rel.rsplit(".", 1)[0] + ".png"))
        src = Image.open(folder / rel)
        assert lab.mode == "P" and lab.size == src.size
        assert np.asarray(lab).max() < 4
        pal = lab.getpalette()[:12]
        assert pal == [v for c in read_manifest(run).palette[:4] for v in c]   # the run's colours
        assert (out / "overlays" / (rel.rsplit(".", 1)[0] + ".png")).is_file()
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == len(GOOD)
    for r in results:
        w, h = r["size"]
        assert sum(r["classes"].values()) == w * h
        assert "network" in r["timings_ms"]
    assert not list(out.rglob("*.tmp"))


def test_skip_existing_resumes_without_redoing(run, folder, tmp_path):
    out = tmp_path / "out"
    pipe = load_pipeline(run)
    run_segment_job(pipe, folder, out, progress=False)
    done = out / "labels" / "a.png"
    done.unlink()
    before = {p: p.stat().st_mtime_ns for p in (out / "labels").rglob("*.png")}
    report = run_segment_job(pipe, folder, out, skip_existing=True, progress=False)
    assert report.done == 1 and report.skipped == len(GOOD) - 1
    assert done.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_same_labels_whatever_the_batch(run, folder, tmp_path):
    pipe = load_pipeline(run)
    a = run_segment_job(pipe, folder, tmp_path / "b1", batch=1, progress=False)
    b = run_segment_job(pipe, folder, tmp_path / "b4", batch=4, progress=False)
    assert a.done == b.done
    for p in (tmp_path / "b1" / "labels").rglob("*.png"):
        q = tmp_path / "b4" / p.relative_to(tmp_path / "b1")
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))


def test_discover_glob_and_list(folder, tmp_path):
    items = discover(str(folder / "**" / "*.jpg"))
    assert {i.rel for i in items} == {"corrupt.jpg", "sub/gray.jpg"}
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\n{folder / 'a.png'}\n{folder / 'sub' / 'gray.jpg'}\n")
    assert {i.rel for i in discover(lst)} == {"a.png", "sub/gray.jpg"}


def test_cli_exit_code_reports_failures(run, folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(run), str(folder), str(tmp_path / "o"), "--quiet"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "5 failed" in captured.out and "failed.txt" in captured.err


def test_refine_and_knn_paths(run, folder, tmp_path):
    """--refine and --classifier knn run through the same pipeline and give valid labels."""
    rng = np.random.default_rng(1)
    protos = rng.normal(size=(50, 32)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    from spml_deploy.engine.index import ExactIndex

    pipe = load_pipeline(run, options=PipelineOptions(refine=True))
    image = np.asarray(Image.open(folder / "a.png").convert("RGB"))
    (res,) = pipe.predict([image])
    assert res.labels.shape == image.shape[:2] and "refine" in res.timings
    mem = ExactIndex.of(protos, rng.integers(0, 4, 50))
    knn = Pipeline(pipe.backend, pipe.pp, pipe.class_names, pipe.palette,
                   PipelineOptions(classifier="knn", knn_k=5), memory=mem)
    (res,) = knn.predict([image])
    assert res.labels.shape == image.shape[:2] and res.labels.max() < 4


def test_knn_without_memory_is_a_clear_error(run, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(run), str(tmp_path), str(tmp_path / "o"), "--classifier", "knn"])
    assert exc.value.code == 2
    assert "memory" in capsys.readouterr().err


def test_knn_search_option_is_hidden_and_ignored(run, folder, capsys, tmp_path):
    """The removed --knn-search option still parses (old scripts run) and says it is ignored."""
    import click

    from spml_deploy.cli import cli

    segment = cli.commands["segment"]
    assert "--knn-search" not in segment.get_help(click.Context(segment))
    try:
        main(["segment", str(run), str(folder / "a.png"), str(tmp_path / "o"), "--knn-search",
              "exact", "--quiet"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert "--knn-search is ignored" in capsys.readouterr().err
    assert (tmp_path / "o" / "labels" / "a.png").is_file()


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    main_args = ["demo", "--out", str(tmp_path / "demo"), "--n-train", "6", "--n-val", "2",
                 "--iters", "3", "--classifier-iters", "2", "--quiet"]
    try:
        main(main_args)
    except SystemExit as exc:  # pragma: no cover - main exits only on errors
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "SPML, points" in out and "partial CE" in out and "full-mask CE (reference)" in out
    res = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert 0 <= res["spml_miou"] <= 100 and 0 <= res["pce_miou"] <= 100
    assert 0 <= res["ce_miou"] <= 100 and set(res["f0_miou"]) == {"spml", "pce", "ce"}
    # a fair comparison: every run has the same budget, and SPML and the partial CE baseline
    # the same stages (pseudo labels of every training image, f1 with the same iterations)
    runs = tmp_path / "demo" / "runs"
    cfgs = {r.name: json.loads((r / "config.json").read_text())["train"] for r in runs.iterdir()}
    assert set(cfgs) == {"spml-points", "pce-points", "ce-full"}
    assert len({(c["iters"], c["lr"], c["batch"], c["classifier_iters"], c["seed"])
                for c in cfgs.values()}) == 1
    assert [cfgs[n]["baseline"] for n in ("spml-points", "pce-points", "ce-full")] == ["", "pce", "ce"]
    for name in ("spml-points", "pce-points"):
        assert set(torch.load(runs / name / "weights.pt", weights_only=True)) == {"net", "f0", "f1"}
        assert len(list((runs / name / "pseudo").glob("*.png"))) == 6
    assert len(list((tmp_path / "demo" / "segment-val" / "labels").glob("*.png"))) == 2
    assert len(list((tmp_path / "demo" / "segment-val" / "overlays").glob("*.png"))) == 2


# --------------------------------------------------------------------------------------------
# fast paths of the job against direct references


def _mixed_images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(50, 70), (33, 41), (64, 64), (90, 30)]
    return [rng.integers(0, 256, s + (3,), np.uint8) for s in sizes]


def _reference_batch(images, pp):
    """The network input as stacked per-image preprocess() outputs (the original code)."""
    from spml_deploy.engine.preprocess import preprocess

    prepped = [preprocess(im, pp) for im in images]
    ph = max(p.padded_hw[0] for _, p in prepped)
    pw = max(p.padded_hw[1] for _, p in prepped)
    x = np.zeros((len(images), 3, ph, pw), np.float32)
    for i, (arr, _) in enumerate(prepped):
        x[i, :, : arr.shape[1], : arr.shape[2]] = arr
    return torch.from_numpy(x), [p for _, p in prepped]


@pytest.mark.parametrize("max_side,pad", [(512, 8), (0, 8), (48, 16), (64, 8)])
def test_prepare_batch_equals_stacked_preprocess(max_side, pad):
    from spml_deploy.config import PreprocessConfig
    from spml_deploy.engine.preprocess import prepare_batch

    pp = PreprocessConfig(max_side=max_side, pad_multiple=pad)
    images = _mixed_images()
    ref, ref_meta = _reference_batch(images, pp)
    x, meta = prepare_batch(images, pp)
    assert meta == ref_meta and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, ref)                                   # bit for bit
    assert torch.equal(torch.signbit(x), torch.signbit(ref))    # padding is +0.0
    from spml_deploy.engine.preprocess import resize_for_network
    x2, meta2 = prepare_batch(images, pp, resized=[resize_for_network(im, pp) for im in images])
    assert meta2 == ref_meta and torch.equal(x2, ref)
    with pytest.raises(ValueError, match="resized images"):
        prepare_batch(images, pp, resized=[resize_for_network(images[0], pp)])


def test_class_argmax_equals_torch_argmax():
    from spml_deploy.engine.preprocess import class_argmax

    gen = torch.Generator().manual_seed(0)
    for shape, dtype in [((2, 5, 9, 11), torch.float32), ((1, 1, 4, 4), torch.float32),
                         ((3, 21, 8, 8), torch.float64), ((2, 7, 5, 6), torch.float32)]:
        s = torch.rand(shape, generator=gen, dtype=dtype)
        s = (s * 3).round() / 3             # many exact ties: the first maximum must win
        got = class_argmax(s)
        assert got.dtype == np.uint8 and got.shape == (shape[0],) + shape[2:]
        assert np.array_equal(got, s.argmax(1).to(torch.uint8).numpy())
    ones = torch.ones(1, 4, 3, 3)                 # all tied: class 0 everywhere
    assert not class_argmax(ones).any()


def _reference_predict(pipe, images):
    """Label maps the slow way: per-image upsampling, torch argmax, nearest resize (cv2)."""
    import cv2
    import torch.nn.functional as F

    x, prepped = _reference_batch(images, pipe.pp)
    phi, logits = pipe.backend(x)
    B, _, h, w = phi.shape
    valid = torch.zeros(B, h, w, dtype=torch.bool)
    for i, p in enumerate(prepped):
        valid[i, : -(-p.resized_hw[0] // 4), : -(-p.resized_hw[1] // 4)] = True
    if pipe.opt.classifier == "softmax":
        scores = torch.softmax(logits.float(), dim=1)
    else:
        scores = pipe._knn_scores(phi, valid)
    if pipe.opt.refine:
        scores = pipe._refine(scores, phi, valid)
    out = []
    for i, p in enumerate(prepped):
        s = F.interpolate(scores[i: i + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
        s = s[0, :, : p.resized_hw[0], : p.resized_hw[1]]
        lab = s.argmax(0).to(torch.uint8).numpy()
        if lab.shape != p.orig_hw:
            lab = cv2.resize(lab, p.orig_hw[::-1], interpolation=cv2.INTER_NEAREST)
        out.append(lab)
    return out


@pytest.mark.parametrize("classifier,refine",
                         [("softmax", False), ("softmax", True), ("knn", False)])
def test_predict_equals_reference(run, classifier, refine):
    from spml_deploy.engine.index import ExactIndex

    rng = np.random.default_rng(3)
    base = load_pipeline(run, options=PipelineOptions(refine=refine))
    memory = None
    if classifier == "knn":
        protos = rng.normal(size=(40, 32)).astype(np.float32)
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        memory = ExactIndex.of(protos, rng.integers(0, 4, 40))
    pp = replace(base.pp, max_side=64)          # small grids: a fast test
    pipe = Pipeline(base.backend, pp, base.class_names, base.palette,
                    PipelineOptions(classifier=classifier, refine=refine, knn_k=5), memory=memory)
    images = _mixed_images(1)
    got = pipe.predict(images)
    ref = _reference_predict(pipe, images)
    for g, r, im in zip(got, ref, images):
        assert g.labels.dtype == np.uint8 and g.labels.shape == im.shape[:2]
        assert np.array_equal(g.labels, r)
    keep = Pipeline(base.backend, pp, base.class_names, base.palette,
                    PipelineOptions(classifier=classifier, refine=refine, keep_scores=True, knn_k=5),
                    memory=memory).predict(images[:2])
    for k, g, im in zip(keep, got, images):
        assert k.scores.shape == (4,) + im.shape[:2] and np.array_equal(k.labels, g.labels)


def test_overlay_equals_float_blend():
    from spml_deploy.serving.segment import overlay_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (23, 31, 3), np.uint8)
    labels = rng.integers(0, 6, (23, 31)).astype(np.uint8)
    palette = [[0, 0, 0], [255, 255, 255], [128, 0, 0], [1, 2, 3], [250, 7, 99]]   # id 5: black
    pal = np.zeros((256, 3), np.uint8)
    pal[:5] = palette
    for alpha in (0.5, 0.3, 0.37, 0.123456, 0.9, 0.0, 1.0):
        ref = (image * (1 - alpha) + pal[labels] * alpha).astype(np.uint8)
        assert np.array_equal(overlay_image(image, labels, palette, alpha), ref), alpha


def test_results_record_counts_every_class(run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, im in enumerate(_mixed_images(2)):
        Image.fromarray(im).save(src / f"im{i}.png")
    out = tmp_path / "out"
    run_segment_job(load_pipeline(run), src, out, batch=3, progress=False)
    names = read_manifest(run).classes
    for r in (json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()):
        lab = np.asarray(Image.open(r["label"]))
        ids, counts = np.unique(lab, return_counts=True)
        assert r["classes"] == {names[i]: int(c) for i, c in zip(ids, counts)}
        assert list(r["classes"]) == [names[i] for i in ids]          # ascending class ids


def test_pipelined_job_equals_predict(run, folder, tmp_path):
    """The job overlaps the network of one batch with the read-out of the previous one: the
    label maps are still exactly Pipeline.predict's, image by image, with kNN and refinement."""
    from spml_deploy.data.imageio import read_image
    from spml_deploy.engine.index import ExactIndex

    rng = np.random.default_rng(2)
    protos = rng.normal(size=(60, 32)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    base = load_pipeline(run)
    pipe = Pipeline(base.backend, base.pp, base.class_names, base.palette,
                    PipelineOptions(classifier="knn", refine=True, knn_k=5),
                    memory=ExactIndex.of(protos, rng.integers(0, 4, 60)))
    report = run_segment_job(pipe, folder, tmp_path / "out", batch=1, progress=False)
    assert report.done == len(GOOD)
    assert {"network", "classifier", "refine", "postprocess", "write"} <= set(report.stages)
    for rel in GOOD:
        (ref,) = pipe.predict([read_image(folder / rel)])
        got = np.asarray(Image.open(tmp_path / "out" / "labels" / (rel.rsplit(".", 1)[0] + ".png")))
        np.testing.assert_array_equal(got, ref.labels, err_msg=rel)


class _FailingFinish:
    """A pipeline whose read-out fails for batches holding an image of the given width."""

    def __init__(self, pipe, width):
        self.pipe, self.width, self.palette, self.pp = pipe, width, pipe.palette, pipe.pp

    def forward(self, images, resized=None):
        return self.pipe.forward(images, resized)

    def finish(self, staged):
        from spml_deploy.errors import SpmlError

        if any(im.shape[1] == self.width for im in staged.images):
            raise SpmlError("read-out failed on purpose", fix="none")
        return self.pipe.finish(staged)


def test_failing_batch_is_reported_and_the_job_goes_on(run, folder, tmp_path):
    out = tmp_path / "out"
    report = run_segment_job(_FailingFinish(load_pipeline(run), 70), folder, out, batch=1,
                             progress=False)
    assert (report.done, report.failed) == (len(GOOD) - 1, len(BAD) + 1)
    failed = dict(line.split("\t") for line in (out / "failed.txt").read_text().splitlines())
    assert failed[str(folder / "a.png")] == "read-out failed on purpose"
    assert not (out / "labels" / "a.png").exists()
    assert (out / "labels" / "rgba.png").is_file()


def test_skip_existing_redoes_incomplete_label_maps(run, folder, tmp_path):
    """Label maps are written without fsync; a file a power loss left empty or cut short is
    redone on resume, a complete one is skipped."""
    from spml_deploy.data.imageio import png_is_complete

    out = tmp_path / "out"
    pipe = load_pipeline(run)
    run_segment_job(pipe, folder, out, progress=False)
    full = (out / "labels" / "a.png").read_bytes()
    (out / "labels" / "a.png").write_bytes(full[: len(full) // 2])
    (out / "labels" / "rgba.png").write_bytes(b"")
    assert not png_is_complete(out / "labels" / "a.png")
    assert png_is_complete(out / "labels" / "deep16.png")
    report = run_segment_job(pipe, folder, out, skip_existing=True, progress=False)
    assert (report.done, report.skipped) == (2, len(GOOD) - 2)
    assert (out / "labels" / "a.png").read_bytes() == full
    assert png_is_complete(out / "labels" / "rgba.png")


def test_predict_timings_are_per_call(run, folder):
    """Per-image timings describe one call (they used to add up over calls); pop_timings sums
    the calls since the last pop."""
    from spml_deploy.data.imageio import read_image

    pipe = load_pipeline(run)
    image = read_image(folder / "a.png")
    pipe.pop_timings()
    firsts = [pipe.predict([image])[0].timings["network"] for _ in range(3)]
    total = pipe.pop_timings()["network"]
    assert total == pytest.approx(sum(firsts), rel=1e-9)
    assert pipe.pop_timings() == {}
