"""CPU (or CUDA) time of segment formation: kmeans_clusters + form_segments + pool_prototypes.

Compares the batched implementation with a slow reference written from the spec (per image,
per iteration, a Python loop over clusters for the M-step, a numpy argmax for the E-step, a
dict over pixels for the segments, a loop over segments for the prototypes) and checks that
both give the same segments.

    python benchmarks/kmeans_speed.py                      # B=8, D=64, 64x64 and 128x128, grid 6x6
    python benchmarks/kmeans_speed.py --sizes 64 --repeats 3 --out benchmarks/results/kmeans_speed.md
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from spml_deploy.engine.kmeans import (
    clustering_features,
    grid_init,
    kmeans_clusters,
    l2_normalize,
)
from spml_deploy.engine.prototypes import form_segments, pool_prototypes
from spml_deploy.sysinfo import cpu_name

log = logging.getLogger("kmeans_speed")
VOID = 255


def make_batch(b: int, d: int, h: int, w: int, seed: int = 0, device: str = "cpu"):
    """Random embeddings with spatially smooth structure, scribble-like labels, blocky regions
    and a void padding band on half of the images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, d, max(2, h // 16), max(2, w // 16), generator=g)
    phi = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    phi = phi + 0.3 * torch.randn(b, d, h, w, generator=g)
    labels = torch.full((b, h, w), 21, dtype=torch.long)
    labels[:, ::7, :] = torch.randint(0, 21, (b, 1, w), generator=g)
    labels[: b // 2, int(h * 0.8):, :] = VOID
    labels[: b // 2, :, int(w * 0.85):] = VOID
    regions = (torch.arange(h)[:, None] // 8 * 32 + torch.arange(w)[None, :] // 8).expand(b, h, w).clone()
    return phi.to(device), labels.to(device), regions.to(device)


def fast(phi, labels, regions, grid, iters):
    z = kmeans_clusters(phi, labels != VOID, grid, iters)
    seg = form_segments(z, labels, regions)
    protos = pool_prototypes(l2_normalize(phi, dim=1), seg.index, seg.num_segments)
    return seg, protos


def slow(phi, labels, regions, grid, iters):
    """Reference loop. Returns the per-pixel segment index [B, h, w] and prototypes [S, D]."""
    b, d, h, w = phi.shape
    psi = clustering_features(phi.double()).permute(0, 2, 3, 1).reshape(b, h * w, -1).cpu().numpy()
    unit = l2_normalize(phi.double(), dim=1).permute(0, 2, 3, 1).reshape(b, h * w, d).cpu().numpy()
    init = grid_init(grid[0], grid[1], h, w).reshape(-1).numpy()
    k = int(init.max()) + 1
    lab = labels.reshape(b, -1).cpu().numpy()
    reg = regions.reshape(b, -1).cpu().numpy()
    keys: dict[tuple[int, int, int, int], list[int]] = {}
    for i in range(b):
        valid = lab[i] != VOID
        x = psi[i][valid]
        z = init[valid].copy()
        for _ in range(iters):
            cent = np.zeros((k, x.shape[1]))
            for j in range(k):
                s = x[z == j].sum(0)
                cent[j] = s / max(np.linalg.norm(s), 1e-12)
            z = np.argmax(x @ cent.T, axis=1)
        for p, zz in zip(np.flatnonzero(valid), z):
            keys.setdefault((i, int(zz), int(lab[i, p]), int(reg[i, p])), []).append(i * h * w + p)
    rows = sorted(keys)
    index = np.full(b * h * w, -1, np.int64)
    protos = np.zeros((len(rows), d))
    flat = unit.reshape(-1, d)
    for s, key in enumerate(rows):
        members = keys[key]
        index[members] = s
        v = flat[members].sum(0)
        protos[s] = v / max(np.linalg.norm(v), 1e-12)
    return index.reshape(b, h, w), protos


def timed(fn, repeats: int, sync) -> tuple[float, float, object]:
    """Median wall-clock and median process CPU seconds of ``repeats`` calls, and the last output."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def machine() -> str:
    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads; python {platform.python_version()}; "
            f"load average at start {load:.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--grid", type=int, nargs=2, default=[6, 6])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--ref-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write a markdown report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    grid = tuple(args.grid)
    lines = ["| grid size | pixels | segments | batched wall (s) | batched CPU (s) | reference wall (s) | "
             "reference CPU (s) | speed-up (CPU) | same segments | max prototype diff |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size in args.sizes:
        phi, labels, regions = make_batch(args.batch, args.dim, size, size, device=args.device)
        fast(phi, labels, regions, grid, args.iters)                 # warm-up
        sync()
        t_fast, c_fast, (seg, protos) = timed(lambda: fast(phi, labels, regions, grid, args.iters),
                                              args.repeats, sync)
        t_slow, c_slow, (ref_index, ref_protos) = timed(lambda: slow(phi, labels, regions, grid, args.iters),
                                                        args.ref_repeats, lambda: None)
        same = bool(np.array_equal(seg.index.cpu().numpy(), ref_index))
        diff = float(np.abs(protos.double().cpu().numpy() - ref_protos).max()) if same else float("nan")
        line = (f"| {size}x{size} | {args.batch * size * size} | {seg.num_segments} | {t_fast:.3f} | "
                f"{c_fast:.3f} | {t_slow:.3f} | {c_slow:.3f} | {c_slow / c_fast:.1f}x | {same} | {diff:.1e} |")
        log.info(line)
        lines.append(line)
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))
    report = "\n".join([
        "# k-means + segments + prototypes speed",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {machine()}; device {args.device}",
        "",
        f"Batch B={args.batch}, D={args.dim}, grid {grid[0]}x{grid[1]}, {args.iters} iterations, "
        f"median of {args.repeats} runs (reference: {args.ref_repeats}). Batched = kmeans_clusters + "
        "form_segments + pool_prototypes (float32, input dtype); reference = per-image numpy loop "
        "over clusters (float64) + Python dict over pixels + loop over segments. "
        "'same segments' compares the per-pixel segment maps exactly (float32 vs float64 may differ "
        "at near ties).",
        "",
        *lines,
        "",
    ])
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
