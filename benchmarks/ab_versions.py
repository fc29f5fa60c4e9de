"""A/B wall time of the same commands under two installs of spml-deploy (e.g. before and after a
refactoring): each command runs under both, interleaved, ``--rounds`` times; the table gives the
median seconds of each and their ratio. The machine may be shared: interleaving keeps the load
drift out of the ratio, and the load average is printed with the table.

    python benchmarks/ab_versions.py --a OLD_VENV/bin/spml-deploy --b .venv/bin/spml-deploy \\
        --case "segment softmax=segment RUN IMAGES {out} --quiet --batch 8" \\
        --case "segment knn=segment RUN IMAGES {out} --quiet --batch 8 --classifier knn" \\
        --rounds 5 --out benchmarks/results/redesign_ab.md

``{out}`` in a case is replaced by a fresh temporary folder for every run. ``--prepare``
(repeatable, ``NAME=shell command`` with ``{out}``) runs before each timed command of case
NAME, untimed (e.g. copying a run folder whose later stages the command recomputes).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _run(exe: str, args: str, prepare: str | None, env: dict[str, str]) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="ab-"))
    try:
        out = tmp / "out"
        if prepare:
            subprocess.run(prepare.format(out=out), shell=True, check=True)
        cmd = [exe, *shlex.split(args.format(out=out))]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return dt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="spml-deploy executable of install A")
    ap.add_argument("--b", required=True, help="spml-deploy executable of install B")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default="B")
    ap.add_argument("--case", action="append", required=True, help="NAME=arguments")
    ap.add_argument("--prepare", action="append", default=[], help="NAME=shell command")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: unset)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cases = [c.split("=", 1) for c in args.case]
    prepare = dict(p.split("=", 1) for p in args.prepare)
    times: dict[tuple[str, str], list[float]] = {}
    load0 = os.getloadavg()[0]
    for name, cmd in cases:                                     # warm-up: file caches
        for exe in (args.a, args.b):
            _run(exe, cmd, prepare.get(name), env)
    for r in range(args.rounds):
        for name, cmd in cases:
            order = (args.a, args.b) if r % 2 == 0 else (args.b, args.a)
            for exe in order:
                times.setdefault((name, exe), []).append(_run(exe, cmd, prepare.get(name), env))
    load1 = os.getloadavg()[0]
    lines = [f"| command | {args.label_a} median s | {args.label_b} median s | "
             f"{args.label_b} / {args.label_a} |", "| --- | ---: | ---: | ---: |"]
    for name, cmd in cases:
        a = statistics.median(times[(name, args.a)])
        b = statistics.median(times[(name, args.b)])
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    text = "\n".join(lines) + (f"\n\n{args.rounds} interleaved rounds after one warm-up each; "
                               f"load average {load0:.1f} before, {load1:.1f} after.\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
