"""Images per second of the built-in benchmark scenes (``spml-deploy data synth``).

For object scenes and ``--parts`` figures at each size: the median over ``--repeats`` runs of
``synthesize`` (everything: drawing, weak-annotation derivation, PNG writing, annotations.json)
into a temporary folder, as images per second of wall-clock time and of this process's CPU
time (on a shared machine the second is the fairer one-core figure), plus a per-stage breakdown
(render / derive annotations / write the two PNGs) in CPU milliseconds per image. The texture
bank is loaded once before timing (it is loaded once per process).

    python benchmarks/synth_speed.py                               # 128 and 256 px
    python benchmarks/synth_speed.py --out benchmarks/results/synth_speed.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spml_deploy.data import synth
from spml_deploy.sysinfo import cpu_name


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def end_to_end(n: int, size: int, parts: bool, repeats: int) -> tuple[list[float], list[float]]:
    """(wall-clock, CPU-time) images per second of ``synthesize``, one entry per run."""
    wall, cpu = [], []
    for r in range(repeats):
        tmp = Path(tempfile.mkdtemp())
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            synth.synthesize(tmp / "ds", n_train=n, n_val=0, size=size, seed=r, parts=parts)
            wall.append(n / (time.perf_counter() - t0))
            cpu.append(n / (time.process_time() - c0))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return wall, cpu


def breakdown(n: int, size: int, parts: bool) -> dict[str, float]:
    """CPU milliseconds per image of each stage (PNGs written to a temporary folder)."""
    t = {"render": 0.0, "annotate": 0.0, "png": 0.0}
    tmp = Path(tempfile.mkdtemp())
    palette = synth._palette(len(synth.PART_CLASSES))
    for i in range(n):
        r_rng, a_rng = synth.image_rng(99, 0, i, parts)
        t0 = time.process_time()
        scene = synth.render_scene(size, r_rng, parts=parts)
        t1 = time.process_time()
        synth.scene_annotations(scene, a_rng)
        t2 = time.process_time()
        synth._write_rgb(tmp / "i.png", scene.image)
        synth._write_mask(tmp / "m.png", scene.mask, palette)
        t3 = time.process_time()
        t["render"] += t1 - t0
        t["annotate"] += t2 - t1
        t["png"] += t3 - t2
    shutil.rmtree(tmp, ignore_errors=True)
    return {k: v / n * 1000 for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--images", type=int, default=100, help="images per run at 128 px "
                    "(scaled by (128 / size)^2 at other sizes, at least 20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = ap.parse_args()

    synth.texture_bank()
    load_before = load()
    rows = []
    for size in args.sizes:
        n = max(20, round(args.images * (128 / size) ** 2))
        for parts in (False, True):
            wall, cpu = end_to_end(n, size, parts, args.repeats)
            ms = breakdown(max(10, n // 2), size, parts)
            rows.append((size, "parts" if parts else "scenes", n, statistics.median(wall),
                         statistics.median(cpu), ms))
            print(f"{size:4d} px {'parts' if parts else 'scenes':6s}: "
                  f"{statistics.median(wall):6.1f} images/s wall, {statistics.median(cpu):6.1f} "
                  f"per CPU second (median of {args.repeats} x {n}); render "
                  f"{ms['render']:.1f} ms, annotate {ms['annotate']:.1f} ms, png "
                  f"{ms['png']:.1f} ms per image (CPU)", flush=True)

    cmd = "python benchmarks/synth_speed.py " + " ".join(sys.argv[1:])
    lines = [
        "# Built-in benchmark scenes: generation speed",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs visible, Python "
        f"{platform.python_version()}, numpy {np.__version__}, OpenCV "
        f"{__import__('cv2').__version__}; one process (OpenCV may use its worker threads).  ",
        f"Load average before / after: {load_before} / {load()} (the machine is shared; "
        "other jobs running at the same time slow every figure below).",
        "",
        "End to end = `synthesize()` into a temporary folder (render, derive all four weak "
        "annotation kinds, write image and mask PNGs, annotations.json, splits), median of "
        f"{args.repeats} runs, as images per second of wall-clock time and per second of this "
        "process's CPU time (the fair one-core figure while other jobs share the machine). "
        "The per-stage columns are CPU milliseconds per image.",
        "",
        "| size | mode | images/run | images/s wall | images/s CPU | render ms | "
        "annotate ms | png ms |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, mode, n, wall, cpu, ms in rows:
        lines.append(f"| {size} | {mode} | {n} | {wall:.1f} | {cpu:.1f} | "
                     f"{ms['render']:.1f} | {ms['annotate']:.1f} | {ms['png']:.1f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
