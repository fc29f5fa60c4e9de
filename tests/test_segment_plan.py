"""The planning step shared by the local and the Ray segment jobs (serving.segment.plan_job):
what is left to do, restored records, and the partial files a killed job leaves."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from spml_deploy.data.imageio import write_label_png
from spml_deploy.serving.segment import label_path, plan_job, sweep_partial_files


def test_plan_skips_finished_restores_their_records_and_sweeps_partial_files(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(src / f"im{i}.png")
    out = tmp_path / "out"
    done = label_path(out, "im1.png")
    write_label_png(done, np.array([[0, 1], [1, 2]], np.uint8), [[0, 0, 0]] * 3)
    stale = [out / "labels" / ".im2.png.x1y2.tmp", out / "overlays" / "sub" / ".im3.png.q.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a png")
    keep = out / "labels" / "notes.tmp"       # not a temporary file of an atomic write
    keep.write_text("mine")

    plan = plan_job(src, out, skip_existing=True, class_names=["bg", "a", "b"])
    assert [it.rel for it in plan.todo] == ["im0.png", "im2.png", "im3.png"]
    assert (plan.total, plan.report.skipped, plan.report.recovered) == (4, 1, 1)
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["label"] == str(done) and record["restored"] is True
    assert record["classes"] == {"bg": 1, "a": 2, "b": 1}
    assert not any(p.exists() for p in stale) and keep.exists()
    # planning again restores nothing twice; without --skip-existing everything is to do
    again = plan_job(src, out, skip_existing=True, class_names=["bg", "a", "b"])
    assert again.report.recovered == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert len(plan_job(src, out).todo) == 4
    assert sweep_partial_files(tmp_path / "nothing-here") == 0
