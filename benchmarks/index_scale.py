"""Prototype index at scale: 1,000,000 unit prototypes, D = 64, CPU.

Target (issue 6): an approximate index with recall@10 >= 0.95 against exact search
(``IndexFlatIP``) and at least 10x the exact queries/s; memory per prototype reported.

Data: synthetic clustered unit vectors, like segment prototypes of a collection (many segments
of few kinds): ``n_centers`` random unit centres with a log-normal popularity, every vector =
normalise(centre + noise); queries are fresh draws from the same distribution (not database
rows). Exact search is :class:`spml_deploy.engine.index.PrototypeIndex` ``flat`` (FAISS IndexFlatIP);
the approximate indexes are the same class with ``ivf`` (IndexIVFFlat, trained by k-means on a
sample) at several ``nprobe`` and, with ``--hnsw``, ``hnsw``. Queries/s = all queries in one
``search`` call (FAISS parallelises over queries), best of ``--repeats``; a single-query loop
is reported as well (latency). Memory = the serialised FAISS index plus the int64 id map, per
prototype.

    .venv/bin/python benchmarks/index_scale.py [--n 1000000] [--dim 64] [--hnsw]
        [--out benchmarks/results/index_scale.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spml_deploy.engine.index import PrototypeIndex  # noqa: E402
from spml_deploy.sysinfo import cpu_name


def clustered(n: int, dim: int, n_centers: int, noise: float, rng: np.random.Generator,
              centers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors [n, dim] around ``n_centers`` unit centres (log-normal popularity)."""
    if centers is None:
        centers = rng.standard_normal((n_centers, dim)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    pop = rng.lognormal(0.0, 1.0, len(centers))
    which = rng.choice(len(centers), n, p=pop / pop.sum())
    out = np.empty((n, dim), np.float32)
    step = 200_000
    for s in range(0, n, step):
        v = centers[which[s:s + step]] + (noise / np.sqrt(dim)) * \
            rng.standard_normal((min(step, n - s), dim)).astype(np.float32)
        out[s:s + step] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, centers


def timed_search(index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Best-of-``repeats`` seconds for one batched search, and its results."""
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return best, res[0], res[1]


def single_latency(index, queries: np.ndarray, k: int, n: int) -> float:
    """Median milliseconds of one-query searches."""
    times = []
    for q in queries[:n]:
        t = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def memory_bytes(index: PrototypeIndex) -> int:
    import faiss

    return int(faiss.serialize_index(index._index).nbytes) + int(index.ids.nbytes)


def recall_at(got: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), ref.tolist())]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--centers", type=int, default=5000)
    ap.add_argument("--noise", type=float, default=0.6)
    ap.add_argument("--nlist", type=int, default=2048)
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--train-sample", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hnsw", action="store_true", help="also build HNSW (slow to build on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/index_scale.md")
    args = ap.parse_args()
    import faiss

    load_before = os.getloadavg()
    t_all = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    data, centers = clustered(args.n, args.dim, args.centers, args.noise, rng)
    queries, _ = clustered(args.queries, args.dim, args.centers, args.noise, rng, centers)
    print(f"data {data.shape}, queries {queries.shape}", flush=True)

    rows = []
    exact = PrototypeIndex(args.dim, "flat")
    t = time.perf_counter()
    exact.add(data)
    build = time.perf_counter() - t
    secs, ref_s, ref_i = timed_search(exact, queries, args.k, 1)   # long enough to be stable
    exact_qps = args.queries / secs
    rows.append({"index": "flat (IndexFlatIP, exact)", "params": "-", "build_s": build,
                 "qps": exact_qps, "speedup": 1.0, "recall": 1.0,
                 "latency_ms": single_latency(exact, queries, args.k, 50),
                 "bytes": memory_bytes(exact) / args.n})
    print(rows[-1], flush=True)
    del exact

    ivf = PrototypeIndex(args.dim, "ivf", nlist=args.nlist)
    t = time.perf_counter()
    sample = data[rng.choice(args.n, min(args.train_sample, args.n), replace=False)]
    ivf.train(sample)
    ivf.add(data)
    build = time.perf_counter() - t
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        ivf.set_search_params(nprobe=nprobe)
        secs, _, got = timed_search(ivf, queries, args.k, args.repeats)
        rows.append({"index": f"ivf (IndexIVFFlat, nlist {ivf.params['nlist']})",
                     "params": f"nprobe {nprobe}", "build_s": build, "qps": args.queries / secs,
                     "speedup": args.queries / secs / exact_qps, "recall": recall_at(got, ref_i),
                     "latency_ms": single_latency(ivf, queries, args.k, 200),
                     "bytes": memory_bytes(ivf) / args.n})
        print(rows[-1], flush=True)
    del ivf

    if args.hnsw:
        hnsw = PrototypeIndex(args.dim, "hnsw", hnsw_m=32, ef_construction=64)
        t = time.perf_counter()
        hnsw.add(data)
        build = time.perf_counter() - t
        for ef in (32, 64, 128):
            hnsw.set_search_params(ef_search=ef)
            secs, _, got = timed_search(hnsw, queries, args.k, args.repeats)
            rows.append({"index": "hnsw (IndexHNSWFlat, M 32)", "params": f"efSearch {ef}",
                         "build_s": build, "qps": args.queries / secs,
                         "speedup": args.queries / secs / exact_qps,
                         "recall": recall_at(got, ref_i),
                         "latency_ms": single_latency(hnsw, queries, args.k, 200),
                         "bytes": memory_bytes(hnsw) / args.n})
            print(rows[-1], flush=True)
        del hnsw

    ok = [r for r in rows[1:] if r["recall"] >= 0.95 and r["speedup"] >= 10]
    best = max(ok, key=lambda r: r["qps"]) if ok else None
    total = time.perf_counter() - t_all
    load_after = os.getloadavg()
    cmd = "python benchmarks/index_scale.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Prototype index at scale: {args.n:,} prototypes, D = {args.dim}, CPU",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs available to the process, "
        f"Linux {platform.release()}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"faiss {faiss.__version__} (CPU, {faiss.omp_get_max_threads()} OpenMP threads). "
        f"Date: {dt.date.today().isoformat()}. Load average before: "
        f"{' '.join(f'{v:.2f}' for v in load_before)}, after: "
        f"{' '.join(f'{v:.2f}' for v in load_after)} (shared machine: absolute numbers are noisy). "
        f"Total run time {total:.0f} s.",
        "",
        f"Data: {args.n:,} synthetic clustered unit vectors ({args.centers} centres, log-normal "
        f"popularity, noise {args.noise}), {args.queries} fresh queries from the same "
        f"distribution, k = {args.k}. Queries/s: all queries in one search call (best of "
        f"{args.repeats}); latency: median of single-query calls. Recall@{args.k}: overlap with the "
        "exact top-k. Memory: serialised FAISS index + int64 ids, per prototype. IVF trained on "
        f"{min(args.train_sample, args.n):,} sampled vectors; build time includes training.",
        "",
        "| index | search params | build s | queries/s | x exact | recall@10 | 1-query latency ms "
        "| bytes / prototype |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['qps']:,.0f} | "
                     f"{r['speedup']:.1f} | {r['recall']:.4f} | {r['latency_ms']:.2f} | "
                     f"{r['bytes']:.0f} |")
    lines.append("")
    if best:
        lines.append(f"Result: **{best['index']}, {best['params']}** meets the target: recall@10 "
                     f"{best['recall']:.4f} (>= 0.95) at {best['speedup']:.0f}x the exact "
                     f"queries/s (>= 10x), {best['bytes']:.0f} bytes per prototype (exact: "
                     f"{rows[0]['bytes']:.0f}).")
    else:
        lines.append("Result: no approximate setting met recall@10 >= 0.95 at >= 10x exact "
                     "queries/s in this run.")
    lines.append("")
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
