"""``spml-deploy demo``: the whole flow on the built-in scenes, on a CPU, in minutes.

Generates a small set of benchmark scenes and trains three runs of the tiny preset with the same
network, recipe and iteration budget: SPML from point labels, the partial cross-entropy baseline
on the same points, and cross-entropy on the full masks as the reference of what the network can
reach. SPML and the partial cross-entropy baseline both go on through the same stages — pseudo
labels, final classifier f1 (same iterations), prototype memory — while the full-mask run,
which has no weak labels to complete, keeps its own classifier. Every run then segments the
validation images through the same segment job, and the demo prints, for every run, the score
of the classifier trained with the embedding (f0) and of the finished run.

This module belongs to the command-line layer (like the command modules): it composes the stages and
imports them inside :func:`run_demo` only.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

# The demo's budget (benchmarks/results/recipe_search.md).
DEMO_TRAIN, DEMO_VAL = 96, 32
DEMO_ITERS = 600
DEMO_LR = 0.03
DEMO_CLASSIFIER_ITERS = 150


# the runs: step number, what the output calls them, supervision and baseline
STEPS = {"spml": 2, "pce": 3, "ce": 3}
WHAT = {"spml": "SPML (points)", "pce": "partial cross-entropy baseline (points)",
        "ce": "full-mask cross-entropy reference"}
ROWS = {"spml": "SPML, points", "pce": "partial CE, points", "ce": "full-mask CE (reference)"}
KIND = {"spml": ("points", ""), "pce": ("points", "pce"), "ce": ("full", "ce")}


def _train_run(data: Path, run: Path, name: str, overrides: dict[str, Any], device: str,
               progress: bool) -> None:
    """Train (or resume) one run of the demo: tiny preset, its supervision and baseline."""
    from spml_deploy.training.train import train

    supervision, baseline = KIND[name]
    overrides = json.loads(json.dumps(overrides))
    overrides["train"]["baseline"] = baseline
    train(data, supervision, run, preset_name="tiny", overrides=overrides, device=device,
          resume=(run / "config.json").is_file(), progress=progress)


def _train_logged(data: Path, runs: dict[str, Path], overrides: dict[str, Any],
                  device: str) -> None:
    """Train runs one after the other in a child process: one torch thread, messages to
    ``run/demo.log``."""
    import logging

    import torch

    torch.set_num_threads(1)
    for name, run in runs.items():
        logging.basicConfig(filename=run / "demo.log", level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            _train_run(data, run, name, overrides, device, progress=False)
        except BaseException:
            logging.exception("training failed")
            raise


def _f0_score(run: Path) -> float | None:
    """The last val mIoU (%) of f0 in the run's training log (None if never measured)."""
    scores = [json.loads(line).get("val_miou") for line in
              (run / "train_log.jsonl").read_text().splitlines() if "val_miou" in line]
    return 100 * scores[-1] if scores else None


def run_demo(out: Path, n_train: int = DEMO_TRAIN, n_val: int = DEMO_VAL, size: int = 128,
             iters: int = DEMO_ITERS, classifier_iters: int = DEMO_CLASSIFIER_ITERS,
             lr: float = DEMO_LR, seed: int = 0, device: str = "cpu",
             echo: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out`` (re-running continues where it stopped); returns the scores."""
    import multiprocessing as mp

    import torch

    from spml_deploy.errors import TrainingError
    from spml_deploy.evaluation.metrics import evaluate_folder
    from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline
    from spml_deploy.serving.segment import run_segment_job
    from spml_deploy.data.synth import synthesize

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
                           "seed": seed, "ckpt_every": max(10, iters // 5),
                           "val_every": max(iters, 1)}}
    runs = {"spml": out / "runs" / "spml-points", "pce": out / "runs" / "pce-points",
            "ce": out / "runs" / "ce-full"}
    todo = {name: run for name, run in runs.items() if not (run / "spml.json").is_file()}
    for name, run in runs.items():
        if name not in todo:
            echo(f"[{STEPS[name]}/5] {WHAT[name]}: already trained in {run}")
    side = None
    baselines = {name: todo.pop(name) for name in ("pce", "ce") if name in todo}
    if baselines and device == "cpu" and (os.cpu_count() or 1) >= 2:
        # Two CPU cores: the two cross-entropy runs train one after the other in a second
        # process (one thread each; one SPML step costs about two of theirs), which is faster
        # than two threads on one run; their output goes to a log file in their run folders.
        for run in baselines.values():
            run.mkdir(parents=True, exist_ok=True)
        echo(f"[3/5] training the {' and the '.join(WHAT[n] for n in baselines)}, {iters} "
             f"iterations each, meanwhile in a second process "
             f"(logs: {', '.join(str(r / 'demo.log') for r in baselines.values())})")
        side = mp.get_context("spawn").Process(
            target=_train_logged, args=(data, baselines, overrides, device), daemon=True)
        side.start()
        torch.set_num_threads(1)
    else:
        todo.update(baselines)
    try:
        for name, run in todo.items():
            echo(f"[{STEPS[name]}/5] training {WHAT[name]}, {iters} iterations ...")
            _train_run(data, run, name, overrides, device, progress)
        if side is not None:
            if side.is_alive():
                echo("      waiting for the baselines ...")
            side.join()
            if side.exitcode != 0:
                raise TrainingError(f"a baseline run failed (exit code {side.exitcode})",
                                    path=out / "runs",
                                    fix="read demo.log in the run folders; re-running the demo "
                                        "continues where it stopped")
    finally:
        if side is not None and side.is_alive():
            side.terminate()
            side.join()
        torch.set_num_threads(threads)
    seg_out = out / "segment-val"
    final, first = {}, {}
    val_stems = [line.strip() for line in (data / "splits" / "val.txt").read_text().splitlines()
                 if line.strip()]
    echo("[4/5] segmenting the validation images with every run ...")
    for name, run in runs.items():
        dst = seg_out if name == "spml" else out / f"segment-val-{name}"
        pipe = load_pipeline(run, backend="torch", device=device, options=PipelineOptions())
        try:
            job = run_segment_job(pipe, data / "images", dst, batch=4, overlay=name == "spml",
                                  skip_existing=True, progress=False, only=val_stems)
        finally:
            pipe.close()
        if name == "spml":
            echo("      " + job.format().replace("\n", "\n      "))
        final[name] = 100 * evaluate_folder(dst / "labels", data, split="val").miou
        first[name] = _f0_score(run)
    echo(f"[5/5] validation mIoU over 9 classes (%); every run: tiny preset, {iters} iterations, "
         f"lr {lr:g}, seed {seed}")
    echo(f"      {'':28} {'f0':>8} {'finished run':>14}")

    def cell(v: float | None, sign: str = "") -> str:
        return "-" if v is None else f"{v:{sign}.2f}"

    for name in runs:
        note = {"spml": "(pseudo labels + f1)", "pce": "(pseudo labels + f1)",
                "ce": "(its f0: full masks need no pseudo labels)"}[name]
        echo(f"      {ROWS[name]:28} {cell(first[name]):>8} {cell(final[name]):>14}   {note}")
    diff_f0 = (None if first["spml"] is None or first["pce"] is None
               else first["spml"] - first["pce"])
    echo(f"      {'SPML - partial CE':28} {cell(diff_f0, '+'):>8} "
         f"{cell(final['spml'] - final['pce'], '+'):>14}")
    echo("      f0: the classifier trained with the embedding (scored by the training run); "
         "finished run: its final classifier through the segment job")
    echo(f"label maps: {seg_out / 'labels'}   overlays: {seg_out / 'overlays'}")
    echo(f"per-class table: spml-deploy eval {seg_out / 'labels'} {data} --split val")
    echo(f"total time {time.perf_counter() - t0:.0f} s")
    result = {"spml_miou": final["spml"], "pce_miou": final["pce"], "ce_miou": final["ce"],
              "f0_miou": first, "iters": iters, "classifier_iters": classifier_iters, "lr": lr,
              "seconds": time.perf_counter() - t0, "labels": str(seg_out / "labels")}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
