"""First accuracy evidence: SPML vs partial cross-entropy, both from the same point annotations.

On the built-in scenes (``spml-deploy data synth``), trains for every seed

* SPML with point supervision (``spml-deploy train --supervision points``), and
* the partial cross-entropy baseline on the same points (``--baseline pce``),

with the same network (tiny preset), the same optimiser, learning rate, batch and iteration
budget, and scores f0 on the validation masks during training (``--val-every``; the same scoring
code as ``spml-deploy eval``). The runs go through the real command line, two at a time (one
torch thread each), and the report lists the validation mIoU curve of every run, the final
values and the SPML - pCE difference per seed.

    python benchmarks/accuracy_points.py --out benchmarks/results/accuracy_points.md
    python benchmarks/accuracy_points.py --iters 600 --seeds 0 --work /tmp/acc   # quicker look

The work folder keeps the scenes and the runs; re-running skips finished runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spml_deploy.sysinfo import cpu_name, usable_cpus

CLI = [sys.executable, "-m", "spml_deploy.cli"]


def run_one(work: Path, scenes: Path, name: str, extra: list[str], args: argparse.Namespace) -> dict:
    """One training run through the CLI; returns its validation curve and wall time."""
    run = work / "runs" / name
    log = run / "train_log.jsonl"
    done = run / "weights.pt"
    t0 = time.perf_counter()
    reused = done.is_file()
    if not reused:
        cmd = CLI + ["train", str(scenes), "--supervision", "points", "--out", str(run),
                     "--iters", str(args.iters), "--lr", str(args.lr), "--val-every",
                     str(args.val_every), "--set", "train.classifier_iters=0", "--quiet",
                     *extra]
        if run.is_dir():
            cmd.append("--resume")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(work / f"{name}.log", "w") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            raise SystemExit(f"{name}: training failed (exit {rc}); see {work / (name + '.log')}")
    wall = None if reused else time.perf_counter() - t0
    curve = [(r["step"], 100 * r["val_miou"]) for r in map(json.loads, log.read_text().splitlines())
             if "val_miou" in r]
    return {"name": name, "curve": curve, "final": curve[-1][1], "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/spml-accuracy"))
    p.add_argument("--out", type=Path, default=None, help="markdown report to write")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iters", type=int, default=1200)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    args = p.parse_args(argv)

    work = args.work
    scenes = work / "scenes"
    if not (scenes / "annotations.json").is_file():
        subprocess.check_call(CLI + ["data", "synth", str(scenes), "--n-train", str(args.n_train),
                                     "--n-val", str(args.n_val), "--size", str(args.size)])
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    jobs = []
    for seed in args.seeds:
        jobs.append((f"spml-s{seed}", ["--seed", str(seed)]))
        jobs.append((f"pce-s{seed}", ["--seed", str(seed), "--baseline", "pce"]))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(work, scenes, j[0], j[1], args), jobs))
    total = time.perf_counter() - t0
    by = {r["name"]: r for r in results}
    diffs = [by[f"spml-s{s}"]["final"] - by[f"pce-s{s}"]["final"] for s in args.seeds]

    lines = ["# SPML vs partial cross-entropy from the same points (built-in scenes)", ""]
    lines.append(f"* Command: `python benchmarks/accuracy_points.py {shlex.join(argv or sys.argv[1:])}`")
    lines.append(f"* Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {cpu_name()}, "
                 f"{usable_cpus()} CPUs, {args.jobs} runs in parallel with one torch thread each; "
                 f"load average at start / end {load0[0]:.1f} / {os.getloadavg()[0]:.1f}; total {total / 60:.1f} min")
    lines.append(f"* Data: `spml-deploy data synth --n-train {args.n_train} --n-val {args.n_val} --size {args.size}` "
                 "(9 classes incl. background); point annotations of the synthesizer")
    batch = json.loads((work / "runs" / f"spml-s{args.seeds[0]}" / "config.json").read_text())["train"]["batch"]
    lines.append(f"* Both: tiny preset, SGD lr {args.lr} (poly, warm-up), batch {batch}, {args.iters} iterations; "
                 "score = val mIoU (%) of f0 (the classifier trained with the embedding; for the baseline "
                 "the network's own classifier)")
    lines += ["", "| seed | run | val mIoU by step | final | wall min |", "| ---: | --- | --- | ---: | ---: |"]
    for seed in args.seeds:
        for kind in ("spml", "pce"):
            r = by[f"{kind}-s{seed}"]
            curve = ", ".join(f"{s}: {v:.1f}" for s, v in r["curve"])
            wall = "(earlier run)" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f}"
            lines.append(f"| {seed} | {'SPML' if kind == 'spml' else 'partial CE'} | {curve} | "
                         f"{r['final']:.2f} | {wall} |")
    lines += ["", "SPML - partial CE (final val mIoU): "
              + ", ".join(f"seed {s}: {d:+.2f}" for s, d in zip(args.seeds, diffs))
              + f"; mean {statistics.mean(diffs):+.2f}, min {min(diffs):+.2f} "
              f"(target: at least +5)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
