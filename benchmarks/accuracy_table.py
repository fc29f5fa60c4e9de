"""Weak vs full supervision: SPML from every annotation kind against full-mask cross-entropy.

One preset and one budget for every row (``--iters`` embedding iterations, ``--classifier-iters``
for the final classifier and ``--cam-iters`` for the CAM of boxes/tags, the preset's batch and
learning rate), on built-in scenes generated with a fixed seed (``spml-deploy data synth DIR
--n-train N --n-val M --size S --seed 0``, and ``--parts`` for the figures). Runs
(``--rows`` picks a subset; keys ``SCENES-SUPERVISION-METHOD``):

* ``objects-full-ce``: full-mask cross-entropy (``train --baseline ce``), the reference;
* ``objects-full-spml``: SPML from the full masks;
* ``objects-{scribbles,points,boxes,tags}-spml``: SPML, complete pipeline (embedding, pseudo
  labels, final classifier f1 (f2 for tags), prototype memory);
* ``objects-{scribbles,points}-pce``: partial cross-entropy (``--baseline pce``) on the same
  scribbles and points;
* ``parts-points-spml``, ``parts-points-pce`` and the reference ``parts-full-ce`` on the
  ``--parts`` scenes.

Every run is scored on the validation masks with three read-outs, through the segment job
(``spml-deploy segment``) and ``spml-deploy eval``'s scoring: ``f1`` (the softmax classifier: f1
for SPML, the network's own classifier for the baselines), ``knn`` (``--classifier knn``, vote
of the 20 most similar training segments) and ``refine`` (softmax + ``--refine``). The
baselines' training keeps no prototype memory: for the full-mask CE reference this script builds
one from its training images labelled by their masks (the same k-means segments, spec 7.3), so
its kNN row exists; partial CE gets none and its kNN rows say so in the table.
``ratio_to_full`` = mIoU / the same seed's full-mask CE mIoU (same scenes, same read-out).

    python benchmarks/accuracy_table.py --iters 1200 --seeds 0 1 --jobs 2
    python benchmarks/accuracy_table.py --iters 20 --seeds 0 --n-train 16 --n-val 8 --size 64 \\
        --rows objects-full-ce,objects-points-spml --work /tmp/acc-table --out /tmp/acc-table/res

Writes ``OUT/accuracy_table.md`` (table, command, machine, time) and ``OUT/accuracy_table.json``
(``{"rows": [{"scenes", "supervision", "method", "readout", "seed", "miou", "ratio_to_full"}]}``).
The work folder keeps scenes, runs and scores; re-running skips what is finished.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import logging
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READOUTS = ("f1", "knn", "refine")
# The paper's weak/full ratios (SPML, PASCAL VOC): what the ratio column is compared with.
PAPER_TARGETS = {"scribbles": 97.5, "points": 93.7, "boxes": 95.1, "tags": 89.9}
METHOD_NAMES = {"spml": "SPML", "pce": "partial CE", "ce": "full-mask CE"}
SCENE_SEED = 0
NO_MEMORY = "n/a: partial CE keeps no prototype memory"


@dataclass(frozen=True)
class Row:
    scenes: str          # "objects" | "parts"
    supervision: str     # "full" | "scribbles" | "points" | "boxes" | "tags"
    method: str          # "spml" | "pce" | "ce"

    @property
    def key(self) -> str:
        return f"{self.scenes}-{self.supervision}-{self.method}"


ROWS = tuple(Row(*k.split("-")) for k in (
    "objects-full-ce", "objects-full-spml", "objects-scribbles-spml", "objects-points-spml",
    "objects-boxes-spml", "objects-tags-spml", "objects-scribbles-pce", "objects-points-pce",
    "parts-full-ce", "parts-points-spml", "parts-points-pce"))


def select_rows(patterns: str | None) -> list[Row]:
    """``--rows``: comma-separated keys or shell patterns (``objects-*-spml``); all when None."""
    if not patterns:
        return list(ROWS)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in wanted:
        if not any(fnmatch.fnmatch(r.key, p) for r in ROWS):
            raise SystemExit(f"--rows: '{p}' matches no row; rows: "
                             f"{', '.join(r.key for r in ROWS)}")
    return [r for r in ROWS if any(fnmatch.fnmatch(r.key, p) for p in wanted)]


# ------------------------------------------------------------------------------------------
# one run: train (or resume), scores of every read-out; executed in a worker process


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _val_stems(data: Path) -> list[str]:
    return [s.strip() for s in (data / "splits" / "val.txt").read_text().splitlines() if s.strip()]


def add_label_memory(run: Path, data: Path, device: str = "cpu") -> None:
    """Give a full-mask CE run a prototype memory: k-means segments of its training images
    (spec 7.3) labelled by majority vote of their masks, saved as a prototype index file;
    listed in spml.json."""
    from spml_deploy.artifacts import read_manifest, write_manifest
    from spml_deploy.engine.bundle import load_bundle
    from spml_deploy.config import RunConfig, from_dict
    from spml_deploy.data.dataset import load_dataset
    from spml_deploy.engine.index import build_index
    from spml_deploy.training.pseudo import MEMORY, memory_from_labels

    manifest = read_manifest(run, verify=False)
    if "memory" in manifest.files:
        return
    cfg = from_dict(RunConfig, json.loads((run / "config.json").read_text()))
    model = load_bundle(run).segmentation_model()
    dataset = load_dataset(data)
    pairs = [(r.path, r.mask_path) for r in dataset.split(cfg.train.train_split)]
    protos, labels = memory_from_labels(model.net.to(device), pairs, cfg, device, progress=False)
    build_index(protos, labels, cfg.segmentation.memory_index).save(run / MEMORY)
    manifest.add_file(run, "memory", MEMORY)
    write_manifest(run, manifest)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run (resuming a partial one) and score its read-outs; returns
    ``{"key", "seed", "miou": {readout: % or None}, "train_s", "score_s", "error"}``."""
    run, data = Path(job["run"]), Path(job["data"])
    run.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=run / "bench.log", level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scores_path = run / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    out: dict[str, Any] = {"key": job["key"], "seed": job["seed"], "train_s": None,
                           "score_s": None, "error": None}
    try:
        t0 = time.perf_counter()
        if not (run / "spml.json").is_file():
            from spml_deploy.training.train import train

            overrides = {"train": {"iters": job["iters"], "seed": job["seed"],
                                   "classifier_iters": job["classifier_iters"],
                                   "cam_iters": job["cam_iters"],
                                   "ckpt_every": max(10, job["iters"] // 5), "val_every": 0,
                                   "pretrained": job["pretrained"]}}
            if job["method"] != "spml":
                overrides["train"]["baseline"] = job["method"]
            train(data, job["supervision"], run, preset_name=job["preset"], overrides=overrides,
                  device=job["device"], resume=(run / "config.json").is_file(), progress=False)
            out["train_s"] = time.perf_counter() - t0
        if job["method"] == "ce":
            add_label_memory(run, data, job["device"])
        t1 = time.perf_counter()
        todo = [readout for readout in READOUTS if readout not in scores]
        for readout in todo:
            scores[readout] = _score(run, data, readout, job["method"], job["device"])
            scores_path.write_text(json.dumps(scores, indent=1) + "\n")
        if todo:
            out["score_s"] = time.perf_counter() - t1
    except BaseException as exc:     # keep the other runs going; the report names the log
        logging.exception("run failed")
        out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    out["miou"] = scores
    return out


def _score(run: Path, data: Path, readout: str, method: str, device: str) -> float | None:
    """Val mIoU (%) of one read-out, through the segment job; None for kNN without memory."""
    from spml_deploy.artifacts import read_manifest
    from spml_deploy.evaluation.metrics import evaluate_folder
    from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline
    from spml_deploy.serving.segment import run_segment_job

    if readout == "knn" and "memory" not in read_manifest(run, verify=False).files:
        assert method == "pce", "SPML runs and the CE reference have a memory"
        return None
    options = PipelineOptions(classifier="knn" if readout == "knn" else "softmax",
                              refine=readout == "refine")
    dst = run / f"val-{readout}"
    pipe = load_pipeline(run, backend="torch", device=device, options=options)
    try:
        run_segment_job(pipe, data / "images", dst, batch=4, skip_existing=True, progress=False,
                        only=_val_stems(data))
    finally:
        pipe.close()
    return round(100 * evaluate_folder(dst / "labels", data, split="val").miou, 2)


# ------------------------------------------------------------------------------------------
# the table


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON rows, one per (run, seed, read-out) with a score; ``ratio_to_full`` = mIoU / the
    same seed's full-mask CE mIoU on the same scenes with the same read-out (None when that
    reference was not run or scored 0)."""
    ref = {}
    for r in results:
        scenes, _, method = r["key"].split("-")
        if method == "ce":
            for readout, v in r["miou"].items():
                ref[(scenes, r["seed"], readout)] = v
    rows = []
    for r in results:
        scenes, supervision, method = r["key"].split("-")
        for readout in READOUTS:
            miou = r["miou"].get(readout)
            if miou is None:
                continue
            full = ref.get((scenes, r["seed"], readout))
            rows.append({"scenes": scenes, "supervision": supervision, "method": method,
                         "readout": readout, "seed": r["seed"], "miou": miou,
                         "ratio_to_full": round(miou / full, 4) if full else None})
    return rows


def _fmt(values: list[float | None], spec: str) -> tuple[str, str]:
    got = [v for v in values if v is not None]
    if not got:
        return "-", "-"
    per = ", ".join("-" if v is None else format(v, spec) for v in values)
    return per, format(statistics.mean(got), spec)


def markdown(rows: list[dict[str, Any]], results: list[dict[str, Any]], selected: list[Row],
             seeds: list[int], args: argparse.Namespace, argv: list[str], total_s: float,
             batch: int | None, load0: float) -> str:
    lines = ["# Weak vs full supervision on the built-in scenes", ""]
    lines.append(f"* Command: `python benchmarks/accuracy_table.py {shlex.join(argv)}`")
    from spml_deploy.sysinfo import cpu_name, usable_cpus

    lines.append(f"* Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {cpu_name()}, "
                 f"{usable_cpus()} CPUs, {args.jobs} runs in parallel with one torch thread "
                 f"each, device {args.device}; load average at start / end {load0:.1f} / "
                 f"{os.getloadavg()[0]:.1f}; total {total_s / 60:.1f} min")
    lines.append(f"* Scenes: `spml-deploy data synth DIR --n-train {args.n_train} --n-val "
                 f"{args.n_val} --size {args.size} --seed {SCENE_SEED}` (objects) and the same "
                 "with `--parts` (figures); the synthesizer's own weak annotations")
    lines.append(f"* Every run: preset {args.preset}"
                 + (f" from {args.pretrained} weights" if args.pretrained else " from scratch")
                 + f", batch {batch}, {args.iters} iterations, "
                 f"final classifier {args.classifier_iters} iterations (SPML), CAM "
                 f"{args.cam_iters} iterations (boxes, tags); training seeds {seeds}")
    lines.append("* Score: val mIoU (%) through the segment job; f1 = softmax classifier (f1 for "
                 "SPML, the network's own classifier for the baselines), knn = `--classifier "
                 "knn`, refine = softmax + `--refine`. The full-mask CE reference's kNN memory is "
                 "built from its training masks by this script; partial CE has none.")
    lines.append("* Ratio = mIoU / the same seed's full-mask CE mIoU (same scenes, same "
                 "read-out); paper = SPML's weak/full ratio in the paper (PASCAL VOC)")
    lines += ["", "| scenes | supervision | method | read-out | mIoU per seed | mean | "
              "ratio per seed | mean ratio | paper |",
              "| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: |"]
    by = {(r["scenes"], r["supervision"], r["method"], r["readout"], r["seed"]): r for r in rows}
    for row in selected:
        for readout in READOUTS:
            found = [by.get((row.scenes, row.supervision, row.method, readout, s)) for s in seeds]
            head = f"| {row.scenes} | {row.supervision} | {METHOD_NAMES[row.method]} | {readout} |"
            if row.method == "pce" and readout == "knn":
                lines.append(f"{head} {NO_MEMORY} | | | | |")
                continue
            per, mean = _fmt([f and f["miou"] for f in found], ".2f")
            rper, rmean = _fmt([f and f["ratio_to_full"] for f in found], ".3f")
            paper = (f"{PAPER_TARGETS[row.supervision] / 100:.3f}"
                     if row.method == "spml" and row.supervision in PAPER_TARGETS else "")
            lines.append(f"{head} {per} | {mean} | {rper} | {rmean} | {paper} |")
    lines += ["", "| run | seed | train min | score min | status |",
              "| --- | ---: | ---: | ---: | --- |"]
    for r in results:
        t = "(earlier)" if r["train_s"] is None else f"{r['train_s'] / 60:.1f}"
        s = "(earlier)" if r["score_s"] is None else f"{r['score_s'] / 60:.1f}"
        lines.append(f"| {r['key']} | {r['seed']} | {t} | {s} | "
                     f"{'ok' if not r['error'] else 'FAILED: ' + r['error']} |")
    if not any(r.method == "ce" for r in selected):
        lines += ["", "No full-mask CE run was selected: every ratio is empty."]
    return "\n".join(lines) + "\n"


def _same_settings(record: Path, settings: dict[str, Any], what: Path) -> None:
    """Resuming reuses ``what`` only if it was made with the same settings (kept in ``record``)."""
    if record.is_file():
        before = json.loads(record.read_text())
        if before != settings:
            diff = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in settings.items()
                             if before.get(k) != v)
            also = "" if record.parent == what else f" and {record}"
            raise SystemExit(f"{what} was made with other settings ({diff}); use another --work "
                             f"folder, or delete {what}{also} to redo it")
    elif what.exists() and any(what.iterdir()):
        raise SystemExit(f"{what} exists without its settings record {record.name}; use another "
                         f"--work folder, or delete {what} to redo it")
    else:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(settings) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/spml-accuracy-table"),
                   help="scenes, runs and scores (re-running skips what is finished)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for accuracy_table.md and accuracy_table.json")
    p.add_argument("--rows", default=None,
                   help="comma-separated row keys or patterns, e.g. "
                        "'objects-full-ce,objects-*-spml' "
                        f"(default: all of {', '.join(r.key for r in ROWS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iters", type=int, default=1200, help="embedding iterations, every run")
    p.add_argument("--classifier-iters", type=int, default=200)
    p.add_argument("--cam-iters", type=int, default=200)
    p.add_argument("--preset", default="tiny", help="tiny | resnet18 | resnet50 | resnet101")
    p.add_argument("--pretrained", default="",
                   help="train.pretrained of every run: '' (scratch), imagenet, or a file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    args = p.parse_args(argv)
    if args.classifier_iters < 1:
        raise SystemExit("--classifier-iters must be at least 1 (SPML's f1 and memory need it)")
    selected = select_rows(args.rows)

    from spml_deploy.data.synth import synthesize

    work = args.work
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    data = {}
    for scenes in sorted({r.scenes for r in selected}):
        data[scenes] = work / f"scenes-{scenes}"
        settings = {"n_train": args.n_train, "n_val": args.n_val, "size": args.size,
                    "seed": SCENE_SEED, "parts": scenes == "parts"}
        _same_settings(work / f"scenes-{scenes}.json", settings, data[scenes])
        if not (data[scenes] / "annotations.json").is_file():
            synthesize(data[scenes], n_train=args.n_train, n_val=args.n_val, size=args.size,
                       seed=SCENE_SEED, parts=scenes == "parts", overwrite=data[scenes].exists())
    jobs = [{"key": r.key, "seed": s, "run": str(work / "runs" / f"{r.key}-s{s}"),
             "data": str(data[r.scenes]), "supervision": r.supervision, "method": r.method,
             "iters": args.iters, "classifier_iters": args.classifier_iters,
             "cam_iters": args.cam_iters, "preset": args.preset, "device": args.device,
             "pretrained": args.pretrained}
            for s in args.seeds for r in selected]
    for job in jobs:
        budget = {k: job[k] for k in ("iters", "classifier_iters", "cam_iters", "preset",
                                      "pretrained", "seed")}
        _same_settings(Path(job["run"]) / "bench_job.json", budget, Path(job["run"]))
    import multiprocessing as mp

    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        results = list(pool.map(run_job, jobs))
    total = time.perf_counter() - t0
    rows = table_rows(results)
    batch = None
    for job in jobs:
        cfg_file = Path(job["run"]) / "config.json"
        if cfg_file.is_file():
            batch = json.loads(cfg_file.read_text())["train"]["batch"]
            break
    text = markdown(rows, results, selected, args.seeds, args, argv, total, batch, load0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_table.md").write_text(text)
    (args.out / "accuracy_table.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(text)
    failed = [r for r in results if r["error"]]
    for r in failed:
        print(f"{r['key']} seed {r['seed']} failed: {r['error']} "
              f"(log: {Path(work / 'runs' / (r['key'] + '-s' + str(r['seed']))) / 'bench.log'})",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
