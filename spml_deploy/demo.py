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
import os
import time
from pathlib import Path
from typing import Any, Callable

# The demo's budget: the scratch-trained tiny network needs several hundred iterations at a
# high learning rate to leave the all-background solution (benchmarks/results/accuracy_points.md).
DEMO_TRAIN, DEMO_VAL = 96, 32
DEMO_ITERS = 600
DEMO_LR = 0.03
DEMO_CLASSIFIER_ITERS = 150


# the two runs: step number and what the output calls them
STEPS = {"spml": 2, "pce": 3}
WHAT = {"spml": "SPML (points)", "pce": "partial cross-entropy baseline (points)"}


def _train_run(data: Path, run: Path, overrides: dict[str, Any], device: str,
               progress: bool) -> None:
    """Train (or resume) one run of the demo: tiny preset, point labels."""
    from spml_deploy.training.train import train

    train(data, "points", run, preset_name="tiny", overrides=overrides, device=device,
          resume=(run / "config.json").is_file(), progress=progress)


def _train_logged(data: Path, run: Path, overrides: dict[str, Any], device: str) -> None:
    """Train one run in a child process: one torch thread, messages to ``run/demo.log``."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(filename=run / "demo.log", level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _train_run(data, run, overrides, device, progress=False)
    except BaseException:
        logging.exception("training failed")
        raise


def run_demo(out: Path, n_train: int = DEMO_TRAIN, n_val: int = DEMO_VAL, size: int = 128,
             iters: int = DEMO_ITERS, classifier_iters: int = DEMO_CLASSIFIER_ITERS,
             lr: float = DEMO_LR, seed: int = 0, device: str = "cpu",
             echo: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out`` (re-running continues where it stopped); returns the scores."""
    import multiprocessing as mp

    import torch

    from spml_deploy.errors import TrainingError
    from spml_deploy.metrics import evaluate_folder
    from spml_deploy.pipeline import PipelineOptions, load_pipeline
    from spml_deploy.serving.segment import run_segment_job
    from spml_deploy.synth import synthesize

    out = Path(out)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    data = out / "scenes"
    if not (data / "annotations.json").is_file():
        echo(f"[1/5] generating {n_train} + {n_val} built-in scenes ({size} px) ...")
        echo("      " + synthesize(data, n_train=n_train, n_val=n_val, size=size, seed=seed)
             .splitlines()[0])
    else:
        echo(f"[1/5] scenes already in {data}")
    overrides = {"train": {"iters": iters, "lr": lr, "classifier_iters": classifier_iters,
                           "seed": seed, "ckpt_every": max(10, iters // 5)}}
    runs = {"spml": out / "runs" / "spml-points", "pce": out / "runs" / "pce-points"}
    run_overrides = {"spml": overrides, "pce": json.loads(json.dumps(overrides))}
    run_overrides["pce"]["train"]["baseline"] = "pce"
    todo = {name: run for name, run in runs.items() if not (run / "spml.json").is_file()}
    for name, run in runs.items():
        if name not in todo:
            echo(f"[{STEPS[name]}/5] {WHAT[name]}: already trained in {run}")
    side = None
    if "pce" in todo and device == "cpu" and (os.cpu_count() or 1) >= 2:
        # Two CPU cores: the baseline trains in a second process (one thread each), which is
        # faster than two threads on one run; its output goes to a log file in its run folder.
        todo["pce"].mkdir(parents=True, exist_ok=True)
        echo(f"[{STEPS['pce']}/5] training the {WHAT['pce']}, {iters} iterations, "
             f"meanwhile in a second process (log: {todo['pce'] / 'demo.log'})")
        side = mp.get_context("spawn").Process(
            target=_train_logged, args=(data, todo.pop("pce"), run_overrides["pce"], device),
            daemon=True)
        side.start()
        torch.set_num_threads(1)
    try:
        for name, run in todo.items():
            echo(f"[{STEPS[name]}/5] training {WHAT[name]}, {iters} iterations ...")
            _train_run(data, run, run_overrides[name], device, progress)
        if side is not None:
            if side.is_alive():
                echo("      waiting for the baseline ...")
            side.join()
            if side.exitcode != 0:
                raise TrainingError(f"the baseline run failed (exit code {side.exitcode})",
                                    path=runs["pce"] / "demo.log",
                                    fix="read the log; re-running the demo continues where it stopped")
    finally:
        if side is not None and side.is_alive():
            side.terminate()
            side.join()
        torch.set_num_threads(threads)
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
