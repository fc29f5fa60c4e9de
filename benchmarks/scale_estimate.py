"""Throughput and memory for 10M images and 1B prototypes, from measured per-unit costs.

Measures here, on small data:

* the index build per image (the code behind ``index build``: embedding, k-means segments,
  store records): seconds per image, segments per image, bytes of the SQLite store per segment;
* FAISS bytes per prototype for ``flat``, ``ivf`` and ``ivfpq`` (serialised index + the int64
  ids kept beside it) and the ivfpq search time per query, on ``--n-protos`` clustered unit
  vectors of dimension ``--dim``;

then scales them linearly to ``--images`` images (prototypes = images x segments per image) and
writes the estimate: store and index sizes, how many shards fit a node of ``--node-ram-gb``, and
the index-build time for a number of nodes at the measured CPU rate. GPU rates are not measured
here: the table quotes them only where given with ``--gpu-images-per-s`` (from
``benchmarks/segment_speed.py --device cuda``).

    .venv/bin/python benchmarks/scale_estimate.py --out benchmarks/results/scale_estimate.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import faiss  # noqa: E402
import torch  # noqa: E402

from runs import make_run  # noqa: E402
from spml_deploy.engine.index import PrototypeIndex  # noqa: E402
from spml_deploy.serving.retrieval import build_index  # noqa: E402
from spml_deploy.serving.store import ImageRecord, SegmentStore  # noqa: E402
from spml_deploy.data.synth import synthesize  # noqa: E402


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 200), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_bytes(kind: str, x: np.ndarray) -> float:
    index = PrototypeIndex(x.shape[1], kind)
    index.add(x)
    raw = faiss.serialize_index(index._index)
    return (raw.nbytes + index.ids.nbytes) / len(x)


def store_inserts_per_s(built: Path, folder: Path, n: int = 256, batch: int = 16) -> float:
    """Images/s that the SQLite store takes in (one transaction per batch, as the build does),
    with records copied from one image of the built store ``built``."""
    import sqlite3

    with sqlite3.connect(built) as db:
        rows = db.execute("SELECT x, y, w, h, area, class_id, mask_rle, vector FROM segments "
                          "WHERE image_id = (SELECT MIN(image_id) FROM segments)").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta"))
    boxes = np.array([r[:4] for r in rows], np.int64)
    areas = np.array([r[4] for r in rows], np.int64)
    classes = np.array([r[5] for r in rows], np.int64)
    masks = [bytes(r[6]) for r in rows]
    vectors = np.stack([np.frombuffer(r[7], "<f4") for r in rows])
    store = SegmentStore(folder / "s.sqlite", create=True)
    try:
        import json

        store.set_meta({k: json.loads(v) for k, v in meta.items()})
        records = [ImageRecord(f"/data/{i}.png", f"{i}.png", 256, 256, boxes, areas, classes, masks,
                               vectors, f"{i:064x}") for i in range(n)]
        t = time.perf_counter()
        for a in range(0, n, batch):
            store.add_images(records[a:a + batch])
        return n / (time.perf_counter() - t)
    finally:
        store.close()


def gib(b: float) -> str:
    return f"{b / 2**30:,.1f} GiB" if b < 2**40 else f"{b / 2**40:,.2f} TiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=32, help="images indexed for the per-image costs")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-protos", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--images", type=float, default=10e6, help="collection size to estimate")
    ap.add_argument("--node-ram-gb", type=float, default=128)
    ap.add_argument("--nodes", default="1,10,100")
    ap.add_argument("--gpu-images-per-s", type=float, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="spml-scale-"))
    try:
        synthesize(tmp / "data", n_train=args.n_images, n_val=0, size=args.size, seed=0)
        run = make_run(tmp / "run", num_classes=6)
        t = time.perf_counter()
        rep = build_index(run, tmp / "data" / "images", tmp / "idx", progress=False)
        build_s = time.perf_counter() - t
        store_bytes = (tmp / "idx" / "segments.sqlite").stat().st_size
        inserts = store_inserts_per_s(tmp / "idx" / "segments.sqlite", tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s_per_image = build_s / rep.added_images
    segs_per_image = rep.added_segments / rep.added_images
    store_per_seg = store_bytes / rep.added_segments

    x = clustered(args.n_protos, args.dim)
    per_proto = {k: index_bytes(k, x) for k in ("flat", "ivf", "ivfpq")}
    pq = PrototypeIndex(args.dim, "ivfpq")
    pq.add(x)
    q = clustered(1000, args.dim, seed=1)
    t = time.perf_counter()
    pq.search(q, 10)
    pq_ms = 1000 * (time.perf_counter() - t) / len(q)
    load_after = os.getloadavg()

    n_protos = args.images * segs_per_image
    node_bytes = args.node_ram_gb * 2**30 * 0.7           # leave 30% for the process and the OS
    lines = [f"# Scale estimate: {args.images:,.0f} images, {n_protos:,.0f} prototypes", "",
             "Command: `python benchmarks/scale_estimate.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"{platform.platform()}; torch {torch.__version__}, faiss {faiss.__version__}; one "
             f"thread. Date: {dt.date.today()}. Load average before: "
             + " ".join(f"{v:.2f}" for v in load_before) + ", after: "
             + " ".join(f"{v:.2f}" for v in load_after) + " (a shared machine: times are "
             "upper bounds).", "",
             "## Measured per-unit costs", "",
             f"* index build (untrained tiny model, {args.size}x{args.size} scenes, flip averaging, "
             f"{args.n_images} images, one process, one thread): **{s_per_image:.3f} s per image**, "
             f"**{segs_per_image:.0f} segments per image** (the 12x12 test grid), SQLite store "
             f"**{store_per_seg:.0f} bytes per segment** (RLE mask, box, class, the D=32 vector); "
             f"the store takes in **{inserts:,.0f} images/s** (batches of 16, one transaction "
             "each).",
             f"* FAISS, D={args.dim}, {args.n_protos:,} prototypes: "
             + ", ".join(f"{k} {v:.0f} bytes/prototype" for k, v in per_proto.items())
             + f"; ivfpq search {pq_ms:.2f} ms per query (nprobe default).", "",
             "## Estimate (linear in the collection)", "",
             "| | value |", "|---|---:|",
             f"| prototypes | {n_protos:,.0f} |",
             f"| SQLite store (metadata, masks, vectors) | {gib(n_protos * store_per_seg)} |"]
    for k, v in per_proto.items():
        total = n_protos * v
        shards = max(1, int(np.ceil(total / node_bytes)))
        lines.append(f"| FAISS {k} | {gib(total)}: {shards} shard(s) of "
                     f"{gib(total / shards)} on {args.node_ram_gb:.0f} GB nodes |")
    for n in (int(v) for v in args.nodes.split(",")):
        cpu_h = args.images * s_per_image / n / 3600
        lines.append(f"| index build, {n} node(s) x 1 CPU worker at the measured rate | "
                     f"{cpu_h:,.1f} h |")
        if args.gpu_images_per_s:
            lines.append(f"| index build, {n} GPU node(s) at {args.gpu_images_per_s:.0f} images/s "
                         f"each (given) | {args.images / args.gpu_images_per_s / n / 3600:,.1f} h |")
    lines += ["", "Reading: the FAISS flat index of 1B+ prototypes does not fit one node; "
              "`index build --shards N` splits it by id into N files that can be searched on N "
              "machines or GPUs (queries merge the shards' top-k). ivfpq keeps the whole "
              "collection in a few nodes' memory at the price of recall (see "
              "`index_scale.md`). The SQLite store holds masks and vectors: at this size it "
              "belongs on disk, not in memory (it is read per hit, not per query). The build "
              "itself scales with the workers: `index build --ray` runs one model replica per "
              "worker; the store is written by the driver alone, so its insert rate above bounds "
              "the build however many workers run (beyond it, one store per shard of images "
              "would be the next step; not built)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
