"""``spml-deploy demo``: the whole flow on the built-in scenes, on a CPU, in minutes.

Generates a small set of benchmark scenes, trains SPML with point supervision (tiny preset) —
embedding, pseudo labels, final classifier and prototype memory — trains the partial
cross-entropy baseline on the same points with the same network and iteration budget, segments
the validation images with the SPML run, and scores both.

This module belongs to the command-line layer (like ``cli.py``): it composes the stages and
imports them inside :func:`run_demo` only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable


def run_demo(out: Path, n_train: int = 64, n_val: int = 16, size: int = 128, iters: int = 150,
             classifier_iters: int = 150, seed: int = 0, device: str = "cpu",
             echo: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out`` (re-running continues where it stopped); returns the scores."""
    from spml_deploy.metrics import evaluate_folder
    from spml_deploy.pipeline import PipelineOptions, load_pipeline
    from spml_deploy.serving.segment import run_segment_job
    from spml_deploy.synth import synthesize
    from spml_deploy.training.train import train

    out = Path(out)
    t0 = time.perf_counter()
    data = out / "scenes"
    if not (data / "annotations.json").is_file():
        echo(f"[1/5] generating {n_train} + {n_val} built-in scenes ({size} px) ...")
        echo("      " + synthesize(data, n_train=n_train, n_val=n_val, size=size, seed=seed)
             .splitlines()[0])
    else:
        echo(f"[1/5] scenes already in {data}")
    overrides = {"train": {"iters": iters, "classifier_iters": classifier_iters, "seed": seed,
                           "ckpt_every": max(10, iters // 5)}}
    runs = {"spml": out / "runs" / "spml-points", "pce": out / "runs" / "pce-points"}
    for i, (name, run) in enumerate(runs.items(), start=2):
        what = "SPML (points)" if name == "spml" else "partial cross-entropy baseline (points)"
        o = json.loads(json.dumps(overrides))
        if name == "pce":
            o["train"]["baseline"] = "pce"
        if (run / "spml.json").is_file():
            echo(f"[{i}/5] {what}: already trained in {run}")
            continue
        echo(f"[{i}/5] training {what}, {iters} iterations ...")
        train(data, "points", run, preset_name="tiny", overrides=o, device=device,
              resume=(run / "config.json").is_file(), progress=progress)
    seg_out = out / "segment-val"
    scores = {}
    echo("[4/5] segmenting the validation images with the SPML run ...")
    for name, run in runs.items():
        dst = seg_out if name == "spml" else out / f"segment-val-{name}"
        pipe = load_pipeline(run, backend="torch", device=device, options=PipelineOptions())
        try:
            job = run_segment_job(pipe, data / "images", dst, batch=4, overlay=name == "spml",
                                  skip_existing=True, progress=False,
                                  only=[line.strip() for line in
                                        (data / "splits" / "val.txt").read_text().splitlines()
                                        if line.strip()])
        finally:
            pipe.close()
        if name == "spml":
            echo("      " + job.format().replace("\n", "\n      "))
        scores[name] = evaluate_folder(dst / "labels", data, split="val")
    echo("[5/5] validation scores (mIoU over 9 classes, %):")
    spml, pce = 100 * scores["spml"].miou, 100 * scores["pce"].miou
    echo(f"      SPML, points           {spml:6.2f}")
    echo(f"      partial CE, points     {pce:6.2f}   (same network, same iterations)")
    echo(f"      difference             {spml - pce:+6.2f}")
    echo(f"label maps: {seg_out / 'labels'}   overlays: {seg_out / 'overlays'}")
    echo(f"per-class table: spml-deploy eval {seg_out / 'labels'} {data} --split val")
    echo(f"total time {time.perf_counter() - t0:.0f} s")
    result = {"spml_miou": spml, "pce_miou": pce, "seconds": time.perf_counter() - t0,
              "labels": str(seg_out / "labels")}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
