"""The segment job on Ray (``segment --ray``): a local Ray instance of 2 CPUs, started here;
the same label maps and results records as the local job, bad files listed, a worker killed
mid-job leaves no partial file and the job still completes, a killed job resumes."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runs import make_run

ray = pytest.importorskip("ray", reason="ray not installed (pip install 'spml-deploy[ray]')")

from spml_deploy.engine.pipeline import load_pipeline
from spml_deploy.serving.ray_job import run_segment_job_ray  # noqa: E402
from spml_deploy.serving.segment import run_segment_job  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (2 CPUs, a small object store)."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run", num_classes=4)


def _images(folder: Path, n: int, size=(60, 80), bad: bool = True) -> Path:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        where = folder / "sub" if i % 3 == 0 else folder
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(where / f"im{i:02d}.png")
    if bad:
        (folder / "broken.png").write_text("not an image")
        (folder / "empty.jpg").write_bytes(b"")
    return folder


def _records(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {Path(r["label"]).relative_to(out).as_posix(): r for r in rows}


def _labels(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out).as_posix(): np.array(Image.open(p))
            for p in sorted((out / "labels").rglob("*.png"))}


def _no_partial_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_same_outputs_as_the_local_job(cluster, run, tmp_path):
    src = _images(tmp_path / "in", 10)
    local = run_segment_job(load_pipeline(run), src, tmp_path / "local", batch=3, progress=False)
    report = run_segment_job_ray(run, src, tmp_path / "ray", workers=2, batch=3, progress=False)
    assert (report.done, report.failed) == (local.done, local.failed) == (10, 2)
    a, b = _labels(tmp_path / "local"), _labels(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    ra, rb = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert sorted(ra) == sorted(rb)
    for name in ra:
        for key in ("path", "size", "classes"):
            assert ra[name][key] == rb[name][key], (name, key)
        assert set(rb[name]["timings_ms"]) == set(ra[name]["timings_ms"])
    failed = sorted(line.split("\t")[0] for line in (tmp_path / "ray" / "failed.txt").read_text().splitlines())
    assert failed == sorted(str(src / n) for n in ("broken.png", "empty.jpg"))
    assert "stages" not in report.to_dict() or report.stages["network"] > 0
    # a rerun with --skip-existing has nothing left to do and adds no record
    again = run_segment_job_ray(run, src, tmp_path / "ray", skip_existing=True, progress=False)
    assert (again.done, again.skipped) == (0, 10)
    assert len((tmp_path / "ray" / "results.jsonl").read_text().splitlines()) == 10


def _actor_pids() -> list[int]:
    """Processes of the job's actors (Ray names them after the worker class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"SegmentWorker" in cmd:
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor processes through /proc")
def test_a_worker_killed_mid_job_leaves_no_partial_file_and_the_job_completes(cluster, run, tmp_path):
    src = _images(tmp_path / "in", 30, size=(96, 128), bad=False)
    out = tmp_path / "out"
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_actor_after_some_labels():
        while not stop.is_set() and not killed:
            if len(list(out.glob("labels/**/*.png"))) >= 4:
                for pid in _actor_pids()[:1]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_one_actor_after_some_labels, daemon=True)
    watcher.start()
    try:
        report = run_segment_job_ray(run, src, out, workers=2, batch=2, progress=False)
    finally:
        stop.set()
        watcher.join()
    assert killed, "the job ended before an actor could be killed (make it longer)"
    assert report.done == 30 and report.failed == 0
    assert len(_labels(out)) == 30
    records = _records(out)
    assert len(records) == 30 and len((out / "results.jsonl").read_text().splitlines()) == 30
    assert _no_partial_files(out)


def test_a_killed_job_resumes_with_skip_existing(cluster, run, tmp_path):
    """The driver killed after some label maps were written but before their records: the
    rerun restores the records and segments the rest, one record per image."""
    src = _images(tmp_path / "in", 8, bad=False)
    out = tmp_path / "out"
    run_segment_job_ray(run, src, out, workers=1, batch=4, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    # the state a kill leaves: 3 records lost, 2 label maps never written, a torn last line
    keep = lines[:3]
    (out / "results.jsonl").write_text("\n".join(keep) + "\n" + lines[3][:10])
    for line in lines[3:5]:                       # two of the lost records' label maps
        Path(json.loads(line)["label"]).unlink()
    (out / "labels" / ".im99.png.abc.tmp").write_bytes(b"partial")   # a write cut short
    report = run_segment_job_ray(run, src, out, skip_existing=True, progress=False)
    assert report.done == 2 and report.skipped == 6 and report.recovered == 3
    records = _records(out)
    assert len(records) == 8 and len((out / "results.jsonl").read_text().splitlines()) == 8
    assert _no_partial_files(out)


def test_cli_segment_ray_writes_the_local_jobs_outputs(cluster, run, tmp_path, capsys):
    from spml_deploy.cli import main

    src = _images(tmp_path / "in", 5)
    with pytest.raises(SystemExit) as exc:            # exit 1: two images failed
        main(["segment", str(run), str(src), str(tmp_path / "ray"), "--ray", "--ray-workers", "2",
              "--batch", "2", "--quiet"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "5 done" in captured.out and "2 failed" in captured.out
    assert "failed.txt" in captured.err
    with pytest.raises(SystemExit):
        main(["segment", str(run), str(src), str(tmp_path / "local"), "--quiet"])
    a, b = _labels(tmp_path / "local"), _labels(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 5
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(run), str(src), str(tmp_path / "x"), "--ray", "--ray-workers", "0"])
    assert exc.value.code == 2


def test_a_listed_image_that_is_missing_fails_as_in_the_local_job(cluster, run, tmp_path):
    src = _images(tmp_path / "in", 2, bad=False)
    listing = src / "list.txt"
    listing.write_text("im00.png\nim01.png\nmissing.png\n")   # im00 lives in sub/: missing too
    run_segment_job(load_pipeline(run), listing, tmp_path / "local", progress=False)
    report = run_segment_job_ray(run, listing, tmp_path / "ray", workers=1, progress=False)
    assert report.failed == 2
    local = sorted((tmp_path / "local" / "failed.txt").read_text().splitlines())
    assert sorted((tmp_path / "ray" / "failed.txt").read_text().splitlines()) == local
    assert all("resolved against the folder" in line for line in local)
