"""Throughput and memory for 10M images and 1B prototypes, from measured per-unit costs.

Measures here, on small data:

* the index build per image (the code behind ``index build``: embedding, k-means segments,
  store records): seconds per image, segments per image, bytes of the SQLite store (metadata
  and masks; the vectors live in the index files) per segment;
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
from spml_deploy.engine.index import PrototypeIndex, load_index  # noqa: E402
from spml_deploy.serving.ingest import build_index  # noqa: E402
from spml_deploy.serving.store import ImageRecord, SegmentStore  # noqa: E402
from spml_deploy.serving.vectors import INDEX_FILE, add_batch  # noqa: E402
from spml_deploy.data.synth import synthesize  # noqa: E402


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 200), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_bytes(kind: str, x: np.ndarray, folder: Path) -> tuple[float, float]:
    """(bytes per prototype in memory: the FAISS structure, ids and labels; on disk: the index
    file, which also keeps the exact vectors)."""
    index = PrototypeIndex(x.shape[1], kind)
    index.add(x)
    raw = faiss.serialize_index(index._index)
    index.save(folder / f"{kind}.npz")
    disk = (folder / f"{kind}.npz").stat().st_size
    return (raw.nbytes + index.ids.nbytes + index.labels.nbytes) / len(x), disk / len(x)


def store_inserts_per_s(built: Path, folder: Path, n: int = 256, batch: int = 16) -> float:
    """Images/s that the store takes in (per batch one pending vector file and one SQLite
    transaction, as the build does), with records copied from one image of the built index
    folder ``built``."""
    import json
    import sqlite3

    with sqlite3.connect(built / "segments.sqlite") as db:
        rows = db.execute("SELECT id, x, y, w, h, area, class_id, mask_rle FROM segments "
                          "WHERE image_id = (SELECT MIN(image_id) FROM segments) "
                          "ORDER BY id").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta"))
    ids = np.array([r[0] for r in rows], np.int64)
    boxes = np.array([r[1:5] for r in rows], np.int64)
    areas = np.array([r[5] for r in rows], np.int64)
    classes = np.array([r[6] for r in rows], np.int64)
    masks = [bytes(r[7]) for r in rows]
    index = load_index(built / INDEX_FILE)
    vectors = index.vectors()[np.searchsorted(index.ids, ids)]
    out = folder / "inserts"
    out.mkdir()
    store = SegmentStore(out / "segments.sqlite", create=True)
    try:
        store.set_meta({k: json.loads(v) for k, v in meta.items()})
        records = [ImageRecord(f"/data/{i}.png", f"{i}.png", 256, 256, boxes, areas, classes, masks,
                               vectors, f"{i:064x}") for i in range(n)]
        t = time.perf_counter()
        for a in range(0, n, batch):
            add_batch(out, store, records[a:a + batch])
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
        index_file_bytes = (tmp / "idx" / INDEX_FILE).stat().st_size
        inserts = store_inserts_per_s(tmp / "idx", tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s_per_image = build_s / rep.added_images
    segs_per_image = rep.added_segments / rep.added_images
    store_per_seg = store_bytes / rep.added_segments
    index_file_per_seg = index_file_bytes / rep.added_segments

    x = clustered(args.n_protos, args.dim)
    files = Path(tempfile.mkdtemp(prefix="spml-scale-index-"))
    try:
        sizes = {k: index_bytes(k, x, files) for k in ("flat", "ivf", "ivfpq")}
    finally:
        shutil.rmtree(files, ignore_errors=True)
    per_proto = {k: ram for k, (ram, _) in sizes.items()}
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
             f"**{store_per_seg:.0f} bytes per segment** (RLE mask, box, class; no vector), the flat "
             f"index file {index_file_per_seg:.0f} bytes per segment (the D=32 vector, id, "
             "label); "
             f"the store takes in **{inserts:,.0f} images/s** (batches of 16, one transaction "
             "each).",
             f"* FAISS, D={args.dim}, {args.n_protos:,} prototypes: "
             + ", ".join(f"{k} {ram:.0f} bytes/prototype in memory ({disk:.0f} in its file, "
                         "with the exact vectors)" for k, (ram, disk) in sizes.items())
             + f"; ivfpq search {pq_ms:.2f} ms per query (nprobe default).", "",
             "## Estimate (linear in the collection)", "",
             "| | value |", "|---|---:|",
             f"| prototypes | {n_protos:,.0f} |",
             f"| SQLite store (metadata, masks) | {gib(n_protos * store_per_seg)} |",
             "| index files on disk (flat / ivf / ivfpq) | "
             + " / ".join(gib(n_protos * disk) for _, disk in sizes.values()) + " |"]
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
              "`index_scale.md`). The SQLite store holds metadata and masks (the vectors live only in "
              "the index files): at this size it "
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
