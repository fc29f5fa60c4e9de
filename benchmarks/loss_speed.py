"""Time of the SPML loss of one training step: fused vs generic contrastive primitive.

Builds a batch like a ``points`` / ``tiny`` training step (B=8 images of 128x128, a 32x32x32
embedding from the tiny network, ~2% of the pixels labelled with points, ~32 regions per image,
a two-entry memory bank: ~1200 current segments + ~2400 memory prototypes), then times, with
both implementations of ``training.losses`` interleaved in the same process:

* ``spml_losses`` forward (k-means, segments, prototypes and the relationships I, A, C) and the
  backward of its total loss into the embedding;
* the contrastive terms alone (``image_similarity_loss``, ``segsort_plus_loss``,
  ``set_segsort_loss`` replayed on the arguments the step passed them), forward + backward;
* the tiny network's forward + backward on the same batch, for scale.

Tags: ``shared`` gives every image foreground tags 1..4 (the pool then has no co-occurrence
negative and L_C = 0, as in the profiling script this benchmark replaces); ``mixed`` gives each
image 1-3 of 8 foreground tags (L_C has negatives).

    python benchmarks/loss_speed.py                       # CPU, 2 threads, both tag modes
    python benchmarks/loss_speed.py --device cuda
    python benchmarks/loss_speed.py --out benchmarks/results/loss_speed.md [--append]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
from spml_deploy.training import spml_loss as spml_loss_module
from spml_deploy.training.spml_loss import MemoryBank, spml_losses

from spml_deploy.config import preset
from spml_deploy.engine.model import build_model
from spml_deploy.sysinfo import cpu_name

log = logging.getLogger("loss_speed")
IMPLS = ("generic", "fused")
PRIMITIVES = ("image_similarity_loss", "segsort_plus_loss", "set_segsort_loss")


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_batch(b: int, h: int, w: int, num_classes: int, tags_mode: str, seed: int,
               device: torch.device) -> Batch:
    """Input images [B, 3, 4h, 4w], point labels [B, h, w] (``num_classes`` = unlabelled),
    Voronoi regions [B, h, w] (32 per image) and multi-hot tags [B, num_classes]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 4 * h, 4 * w, generator=g)
    fg = num_classes - 1
    tags = torch.zeros(b, num_classes)
    if tags_mode == "shared":
        tags[:, 1:5] = 1
    else:
        for i in range(b):
            k = int(torch.randint(1, 4, (1,), generator=g))
            tags[i, 1 + torch.randperm(fg, generator=g)[:k]] = 1
    tags[:, 0] = 1
    seeds = torch.rand(b, 32, 2, generator=g) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([yy, xx], -1).reshape(1, h * w, 2).float()
    regions = torch.cdist(grid.expand(b, -1, -1), seeds).argmin(2).view(b, h, w)
    labels = torch.full((b, h, w), num_classes, dtype=torch.long)
    for i in range(b):
        present = torch.nonzero(tags[i]).squeeze(1)
        pick = torch.rand(h, w, generator=g) < 0.02
        labels[i][pick] = present[torch.randint(0, len(present), (int(pick.sum()),), generator=g)]
    return x.to(device), labels.to(device), regions.to(device), tags.to(device)


def clocks(sync: Callable[[], None]) -> tuple[float, float]:
    sync()
    return time.perf_counter(), time.process_time()


def replay_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh leaves for the floating tensors (keeping requires_grad), other values as they are."""
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().clone().requires_grad_(v.requires_grad)
        return v
    return tuple(leaf(a) for a in args), {k: leaf(v) for k, v in kwargs.items()}


def run_scenario(tags_mode: str, args: argparse.Namespace, device: torch.device,
                 sync: Callable[[], None]) -> list[str]:
    cfg = preset("points", "tiny", args.classes)
    torch.manual_seed(0)
    net, _ = build_model(cfg.model)
    net = net.to(device).train()
    x, labels, regions, tags = make_batch(args.batch, args.grid, args.grid, args.classes,
                                          tags_mode, 0, device)
    memory = MemoryBank(cfg.segmentation.memory_size)
    with torch.no_grad():                                   # memory from two earlier batches
        for seed in (1, 2):
            xm = make_batch(args.batch, args.grid, args.grid, args.classes, tags_mode, seed, device)
            spml_losses(net(xm[0]), *xm[1:], cfg.loss, cfg.segmentation, cfg.compat, memory,
                        args.classes)
        emb = net(x).detach()

    def step(impl: str) -> tuple[list[float], dict, torch.Tensor]:
        e = emb.clone().requires_grad_(True)
        t0, c0 = clocks(sync)
        r = spml_losses(e, labels, regions, tags, cfg.loss, cfg.segmentation, cfg.compat, memory,
                        args.classes, update_memory=False, loss_impl=impl)
        t1, c1 = clocks(sync)
        r["loss"].backward()
        t2, c2 = clocks(sync)
        return [t1 - t0, c1 - c0, t2 - t1, c2 - c1], r, e.grad

    def network() -> list[float]:
        t0, c0 = clocks(sync)
        out = net(x)
        out.square().mean().backward()
        t1, c1 = clocks(sync)
        net.zero_grad(set_to_none=True)
        return [t1 - t0, c1 - c0]

    # capture the primitive calls of one step, for the replay
    calls: list[tuple[str, Callable, tuple, dict]] = []
    originals = {name: getattr(spml_loss_module, name) for name in PRIMITIVES}

    def recorder(name: str) -> Callable:
        def wrapped(*a, **k):
            calls.append((name, originals[name], a, k))
            return originals[name](*a, **k)
        return wrapped
    for name in PRIMITIVES:
        setattr(spml_loss_module, name, recorder(name))
    try:
        _, first, _ = step("fused")
    finally:
        for name, fn in originals.items():
            setattr(spml_loss_module, name, fn)

    def primitives(impl: str) -> list[float]:
        total = [0.0, 0.0]
        for _, fn, a, k in calls:
            a, k = replay_args(a, {**k, "impl": impl})
            t0, c0 = clocks(sync)
            loss = fn(*a, **k)
            if loss.requires_grad:
                loss.backward()
            t1, c1 = clocks(sync)
            total[0] += t1 - t0
            total[1] += c1 - c0
        return total

    times: dict[str, list[list[float]]] = {k: [] for k in
                                           ("net", *IMPLS, *(f"prim_{i}" for i in IMPLS))}
    results = {}
    for rep in range(args.warmup + args.repeats):
        keep = rep >= args.warmup
        for impl in IMPLS:
            t, r, grad = step(impl)
            results[impl] = (r, grad)
            p = primitives(impl)
            if keep:
                times[impl].append(t)
                times[f"prim_{impl}"].append(p)
        n = network()
        if keep:
            times["net"].append(n)

    def med(key: str, j: int) -> float:
        return statistics.median(t[j] for t in times[key])

    (r_g, g_g), (r_f, g_f) = results["generic"], results["fused"]
    loss_diff = max(abs(float(r_f[k].detach()) - float(r_g[k].detach()))
                    / max(abs(float(r_g[k].detach())), 1e-12)
                    for k in ("L_I", "L_A", "L_C"))
    grad_diff = float((g_f - g_g).norm() / g_g.norm())
    rows = []
    for impl in IMPLS:
        fw, fc, bw, bc = (med(impl, j) for j in range(4))
        pw, pc = med(f"prim_{impl}", 0), med(f"prim_{impl}", 1)
        rows.append((impl, fw, fc, bw, bc, fw + bw, fc + bc, pw, pc))
    g, f = rows
    lines = [
        f"### tags: {tags_mode}",
        "",
        f"{first['num_segments']} segments + {first['num_memory']} memory prototypes, "
        f"{first['num_pixels']} pixels ({first['num_labelled_pixels']} labelled); "
        f"L_I {float(r_f['L_I'].detach()):.4f}, L_A {float(r_f['L_A'].detach()):.4f}, "
        f"L_C {float(r_f['L_C'].detach()):.4f}. "
        f"Fused vs generic: max relative loss difference {loss_diff:.1e}, relative gradient "
        f"difference (L2) {grad_diff:.1e}.",
        "",
        "| implementation | loss fwd wall | loss fwd CPU | loss bwd wall | loss bwd CPU | "
        "fwd+bwd wall | fwd+bwd CPU | primitives fwd+bwd wall | primitives fwd+bwd CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |" for r in rows),
        f"| speed-up | {g[1] / f[1]:.1f}x | {g[2] / f[2]:.1f}x | {g[3] / f[3]:.1f}x | "
        f"{g[4] / f[4]:.1f}x | {g[5] / f[5]:.1f}x | {g[6] / f[6]:.1f}x | {g[7] / f[7]:.1f}x | "
        f"{g[8] / f[8]:.1f}x |",
        "",
        f"Network forward + backward (tiny, same batch): wall {med('net', 0):.3f} s, "
        f"CPU {med('net', 1):.3f} s.",
        "",
    ]
    for line in lines:
        log.info(line)
    return lines


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    if device.type == "cuda":
        cpu += f"; GPU {torch.cuda.get_device_name(device)}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads; OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; python {platform.python_version()}; "
            f"load average at start {load:.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", type=int, default=32, help="embedding grid side (input: 4x)")
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--tags", nargs="+", default=["shared", "mixed"], choices=["shared", "mixed"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write a markdown report here")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    header = machine(device)
    log.info(header)
    body = []
    for mode in args.tags:
        body += run_scenario(mode, args, device, sync)
    given = argv if argv is not None else sys.argv[1:]
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + given)
    section = [
        f"## {args.device}, {args.threads} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {header}; load average at end "
        f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f}",
        "",
        f"Batch B={args.batch}, {args.grid}x{args.grid} embedding grid; seconds, median of "
        f"{args.repeats} interleaved runs after {args.warmup} warm-up runs. CPU = this process's "
        "CPU time (all threads; spin-waiting threads count).",
        "",
        *body,
    ]
    if args.out:
        fresh = not (args.append and os.path.exists(args.out))
        with open(args.out, "w" if fresh else "a") as f:
            if fresh:
                f.write("# SPML loss speed: fused vs generic contrastive primitive\n\n")
            f.write("\n".join(section) + "\n")
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
