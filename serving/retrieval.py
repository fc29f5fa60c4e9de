"""Segment retrieval: a prototype index over an image collection, and queries against it.

``build_index`` / ``add_to_index`` turn every image of a collection into segments: the network's
unit embeddings (any backend; by default averaged with those of the mirror image, see
:func:`embed_images`), spherical k-means on the valid (non-padding) cells with the spec
7.3 test grid of the model's config (12x12 by default), one unit prototype per segment
(normalised sum of its embeddings), the predicted class per segment (majority of the softmax
argmax over its cells), and the segment's box, area and mask at the ORIGINAL image size. A
stride-4 cell covers the original pixels whose centre falls into it after the preprocessing
resize, so a segment may cover no original pixel at all (images upscaled to ``max_side``); such
segments are not indexed.

An index folder holds ``segments.sqlite`` (:mod:`spml_deploy.serving.store`: images, segments,
meta; no vectors) and ``prototypes.npz`` (the prototype index: the segments' vectors, ids = store
ids, labels = their classes). Each batch of images goes to a durable pending file (its vectors),
then to the store (one transaction); the index file is written last (atomically), so it may lag
behind the store after a crash but never holds an id the store lacks; every open completes it
from the pending files (:mod:`spml_deploy.serving.vectors`).

``query`` finds the segments most similar to a point (the query image's segment under it), a box
or a mask (the normalised pooled embedding of the cells they cover, each cell weighted by the
number of its original pixels inside), optionally keeping only one predicted class. By default
the query image's own segments are left out when the image is in the index (recognised by the
:func:`~spml_deploy.serving.store.content_hash` of its decoded pixels, stored per image):
otherwise its neighbouring segments fill the top of the list.

Hits name their image three ways: ``image`` the absolute path on the indexing machine (for
local use: drawing, the CLI), ``image_rel`` the path relative to the folder given to ``index
build`` (what the HTTP service returns, never the server's file system layout) and ``image_id``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spml_deploy.artifacts import MANIFEST, Manifest, model_folder, sha256_file
from spml_deploy.config import PreprocessConfig
from spml_deploy.errors import ConfigError, SpmlError
from spml_deploy.data.imageio import IMAGE_EXTENSIONS, atomic_write_bytes, read_image
from spml_deploy.engine.backends import load_backend
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.engine.forward import Engine
from spml_deploy.engine.prototypes import majority_label, segment_memory
from spml_deploy.serving.segment import discover, read_items
from spml_deploy.serving.store import (MASK_ENCODING, STORE_FILE, STORE_SCHEMA_VERSION,
                                       ImageRecord, SegmentRow, SegmentStore, StoreError,
                                       content_hash, rle_encode)
from spml_deploy.serving.vectors import (INDEX_TYPES, add_batch, exclusive, prepare_write,
                                         sync_index)

log = logging.getLogger(__name__)

FAILED_FILE = "failed.txt"
STRIDE = 4


class QueryError(SpmlError):
    """A retrieval query is malformed (point/box outside the image, empty mask, unknown class)."""


# --------------------------------------------------------------------------------------------
# the model side: embeddings -> segments with prototypes, classes, boxes, masks


def model_fingerprint(manifest: Manifest) -> str:
    """What identifies the embedding space: the weights' sha256 (a run and its bundles share
    it), else the ONNX file's, else the model config."""
    for role in ("weights", "onnx", "engine"):
        info = manifest.files.get(role)
        if info and info.get("sha256"):
            return f"{role}:{info['sha256']}"
    blob = json.dumps(manifest.to_dict()["model"], sort_keys=True).encode()
    return "config:" + hashlib.sha256(blob).hexdigest()


@dataclass
class SegmentedImage:
    """One image cut into segments.

    ``vectors`` [S, D] float32 unit prototypes; ``class_ids`` [S]; ``boxes`` [S, 4] (x, y, w, h)
    and ``areas`` [S] in original pixels; ``masks`` S RLE blobs (store format). For queries:
    ``phi`` [D, hv, wv] the unit embeddings of the valid cells, ``cells`` [hv, wv] the segment
    (0..S-1) of every valid cell (-1: a segment not indexed), ``row_cell`` [H] and ``col_cell``
    [W] the cell row / column of every original pixel row / column.
    """

    width: int
    height: int
    vectors: np.ndarray
    class_ids: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    masks: list[bytes]
    phi: torch.Tensor = field(repr=False)
    cells: np.ndarray = field(repr=False)
    row_cell: np.ndarray = field(repr=False)
    col_cell: np.ndarray = field(repr=False)

    @property
    def num_segments(self) -> int:
        return int(self.vectors.shape[0])

    def segment_map(self) -> np.ndarray:
        """Segment id of every original pixel, int32 [H, W] (-1: not indexed)."""
        return self.cells[self.row_cell[:, None], self.col_cell[None, :]]


def pixel_to_cell(n_orig: int, n_resized: int, n_cells: int) -> np.ndarray:
    """Cell index [n_orig] of every original pixel row (or column): the cell holding the pixel
    centre after resizing, ``min(floor((i + 0.5) * n_resized / n_orig / 4), n_cells - 1)``."""
    centre = (np.arange(n_orig, dtype=np.float64) + 0.5) * (n_resized / n_orig)
    return np.minimum(np.floor(centre / STRIDE).astype(np.int64), n_cells - 1)


def _cell_ranges(pixel_cell: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """First and end (exclusive) original pixel of every cell along one axis (``pixel_cell``
    is non-decreasing; a cell without pixels gets an empty range)."""
    cells = np.arange(n_cells)
    return (np.searchsorted(pixel_cell, cells, "left"),
            np.searchsorted(pixel_cell, cells, "right"))


def segment_geometry(local: np.ndarray, n: int, row_cell: np.ndarray, col_cell: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[bytes]]:
    """Segments of an image at its original size, computed from its cells.

    ``local`` [hv, wv]: the segment (0..n-1; n = none) of every valid cell; ``row_cell`` [H] /
    ``col_cell`` [W]: the cell row / column of every original pixel row / column
    (:func:`pixel_to_cell`). Returns (``keep`` [K] the segments covering at least one original
    pixel, their ``boxes`` [K, 4] (x, y, w, h), ``areas`` [K] and RLE ``masks`` cropped to the
    box), the same as reading them off the full-size map ``local[row_cell][:, col_cell]``, but
    without building it: the memory is that of the largest box (bool), not 4-8 bytes per pixel.
    """
    hv, wv = local.shape
    rows_n = np.bincount(row_cell, minlength=hv)              # original pixels per cell row
    cols_n = np.bincount(col_cell, minlength=wv)
    areas = np.bincount(local.reshape(-1), weights=np.outer(rows_n, cols_n).reshape(-1),
                        minlength=n + 1)[:n]
    areas = np.rint(areas).astype(np.int64)
    keep = np.flatnonzero(areas > 0)
    r_idx, c_idx = np.nonzero((rows_n > 0)[:, None] & (cols_n > 0)[None, :])
    rows_any = np.zeros((n + 1, hv), bool)
    cols_any = np.zeros((n + 1, wv), bool)
    rows_any[local[r_idx, c_idx], r_idx] = True
    cols_any[local[r_idx, c_idx], c_idx] = True
    row_start, row_end = _cell_ranges(row_cell, hv)
    col_start, col_end = _cell_ranges(col_cell, wv)
    y0 = row_start[rows_any[keep].argmax(1)]
    y1 = row_end[hv - 1 - rows_any[keep, ::-1].argmax(1)]
    x0 = col_start[cols_any[keep].argmax(1)]
    x1 = col_end[wv - 1 - cols_any[keep, ::-1].argmax(1)]
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], 1).astype(np.int64)
    masks = []
    for j, s in enumerate(keep):
        inside = local == s                                       # [hv, wv]
        masks.append(rle_encode(inside[row_cell[y0[j]:y1[j]]][:, col_cell[x0[j]:x1[j]]]))
    return keep, boxes, areas[keep], masks


@torch.no_grad()
def segment_images(backend, pp: PreprocessConfig, images: Sequence[np.ndarray],
                   grid: tuple[int, int], iters: int, num_classes: int, flip: bool = False
                   ) -> list[SegmentedImage]:
    """Segments, prototypes, classes, boxes, areas and masks of a batch of images (``flip``: of
    the flip-averaged embeddings and logits, :attr:`Forward.phi` / :attr:`Forward.logits`)."""
    fw = Engine(backend, pp).run(list(images), flip=flip)
    phi, logits, valid, preps = fw.phi, fw.logits, fw.valid, fw.prepped
    protos, _, batch, pix = segment_memory(phi, None, valid, grid, iters=iters, return_index=True)
    m = int(protos.shape[0])
    classes = majority_label(logits.argmax(1), pix, m, num_classes)          # [M]
    protos_np = protos.float().cpu().numpy()
    classes_np = classes.cpu().numpy()
    batch_np = batch.cpu().numpy()
    pix_np = pix.cpu().numpy()
    first = np.searchsorted(batch_np, np.arange(len(images)))
    out = []
    for i, prep in enumerate(preps):                        # loop over the images of a batch
        H, W = prep.orig_hw
        rh, rw = prep.resized_hw
        hv, wv = -(-rh // STRIDE), -(-rw // STRIDE)
        n_i = int((batch_np == i).sum())
        # segment of every valid cell (n_i: none), then of every original pixel [H, W]
        local = np.where(pix_np[i, :hv, :wv] >= 0, pix_np[i, :hv, :wv] - first[i], n_i)
        local = local.astype(np.int32)
        row_cell, col_cell = pixel_to_cell(H, rh, hv), pixel_to_cell(W, rw, wv)
        keep, boxes, areas, masks = segment_geometry(local, n_i, row_cell, col_cell)
        renum = np.full(n_i + 1, -1, np.int64)
        renum[keep] = np.arange(keep.size)
        cells = renum[local]
        out.append(SegmentedImage(
            width=W, height=H, vectors=protos_np[first[i] + keep].astype(np.float32),
            class_ids=classes_np[first[i] + keep].astype(np.int64), boxes=boxes,
            areas=areas, masks=masks,
            phi=phi[i, :, :hv, :wv].float().cpu(), cells=cells, row_cell=row_cell,
            col_cell=col_cell))
    return out


# --------------------------------------------------------------------------------------------
# building and extending


@dataclass
class IndexReport:
    """What an index build/add did."""

    added_images: int = 0
    added_segments: int = 0
    skipped_images: int = 0            # already in the index
    failed: list[tuple[str, str]] = field(default_factory=list)
    total_images: int = 0
    total_segments: int = 0
    seconds: float = 0.0
    index_dir: str = ""

    def format(self) -> str:
        lines = [f"index {self.index_dir}: {self.added_images} images added "
                 f"({self.added_segments} segments), {self.skipped_images} already indexed, "
                 f"{len(self.failed)} failed, in {self.seconds:.1f} s",
                 f"  now {self.total_images} images, {self.total_segments} segments"]
        for path, why in self.failed[:10]:
            lines.append(f"  failed: {path}: {why}")
        if len(self.failed) > 10:
            lines.append(f"  ... {len(self.failed) - 10} more in {FAILED_FILE}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"added_images": self.added_images, "added_segments": self.added_segments,
                "skipped_images": self.skipped_images, "failed": [list(f) for f in self.failed],
                "total_images": self.total_images, "total_segments": self.total_segments,
                "seconds": self.seconds, "index_dir": self.index_dir}


def open_model(model_path: str | Path | Bundle, verify: bool = True) -> Bundle:
    """The run folder or bundle of ``model_path`` (the folder, a file inside it), verified
    when ``verify``; an opened :class:`Bundle` is returned unchanged."""
    if isinstance(model_path, Bundle):
        return model_path
    return load_bundle(model_folder(model_path), verify=verify)


@contextlib.contextmanager
def _backend(model_path: str | Path | Bundle, backend: Any, device: str, **backend_options: Any):
    """A backend kind (opened here, closed after) or a ready Backend object (used as is)."""
    if not isinstance(backend, str):
        yield backend
        return
    be = load_backend(open_model(model_path), kind=backend, device=device, **backend_options)
    try:
        yield be
    finally:
        be.close()


def build_index(model_path: str | Path | Bundle, images_source: str | Path, out_dir: str | Path,
                index_type: str = "flat", backend: str = "torch", device: str = "cpu",
                batch: int = 4, progress: bool = True, index_options: dict[str, Any] | None = None,
                flip: bool = True, segmenter=None, **backend_options: Any) -> IndexReport:
    """Index every image of ``images_source`` (folder, glob or .txt list) into ``out_dir``.

    ``index_type``: flat (exact), ivf, ivfpq (trained on the collection's prototypes at the end
    of the build), hnsw. ``index_options`` go to ``PrototypeIndex`` (e.g. nlist, nprobe, m);
    ``shards`` > 1 splits the index into that many shards (:class:`~spml_deploy.engine.index.ShardedIndex`).
    ``segmenter``: who segments the images (default: this process, :func:`local_segmenter`;
    :func:`spml_deploy.serving.ray_job.ray_segmenter` for Ray workers).
    ``flip``: segment the flip-averaged embeddings (two network passes per image); stored in the
    index, so ``index add`` and every query embed the same way.
    Refuses a folder that already holds an index (extend it with :func:`add_to_index`).
    """
    out = Path(out_dir)
    if (out / STORE_FILE).exists():
        raise SpmlError("this folder already holds an index", path=out,
                        fix="extend it with 'spml-deploy index add', or choose another --out")
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"unknown index type '{index_type}'",
                          fix=f"choose one of {', '.join(INDEX_TYPES)}")
    bundle = open_model(model_path)
    folder, manifest = bundle.folder, bundle.manifest
    grid, iters = tuple(bundle.segmentation.test_grid), int(bundle.segmentation.kmeans_iters)
    items = _discover(images_source)          # before anything is written
    root = images_root(images_source, items)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        store = SegmentStore(out / STORE_FILE, create=True)
        try:
            store.set_meta({
                "schema_version": STORE_SCHEMA_VERSION,
                "model_fingerprint": model_fingerprint(manifest),
                "manifest_sha256": sha256_file(folder / MANIFEST),
                "model_path": str(folder.resolve()),
                "embed_dim": int(manifest.model.embed_dim),
                "index_type": index_type,
                "index_options": dict(index_options or {}),
                "classes": list(manifest.classes),
                "test_grid": list(grid),
                "kmeans_iters": iters,
                "flip": bool(flip),
                "max_side": int(manifest.preprocess.max_side),
                "mask_encoding": MASK_ENCODING,
                "images_root": str(root),
            })
            prepare_write(out, store)          # leftovers of a deleted store: not its batches
            if segmenter is not None:
                return _ingest(out, store, segmenter, items, progress)
            with _backend(bundle, backend, device, **backend_options) as be:
                return _ingest(out, store, local_segmenter(be, manifest, batch), items, progress)
        finally:
            store.close()


def add_to_index(index_dir: str | Path, images_source: str | Path,
                 model_path: str | Path | Bundle | None = None, backend: Any = "torch",
                 device: str = "cpu", batch: int = 4, progress: bool = True, segmenter=None,
                 **backend_options: Any) -> IndexReport:
    """Add the images of ``images_source`` not yet indexed (same path) to ``index_dir``.

    ``model_path`` defaults to the model the index was built with; another folder must hold the
    same weights (e.g. the run's bundle), else :class:`StoreError`. Rerunning an interrupted
    ``add`` resumes it (images already in the store are skipped).
    """
    index_dir = Path(index_dir)
    store = SegmentStore(index_dir / STORE_FILE)
    try:
        meta = store.meta()
        bundle = open_model(model_path or meta["model_path"])
        folder, manifest = bundle.folder, bundle.manifest
        check_model(meta, manifest, folder)
        items = _discover(images_source)
        with exclusive(index_dir):
            prepare_write(index_dir, store)
            if segmenter is not None:
                return _ingest(index_dir, store, segmenter, items, progress)
            with _backend(bundle, backend, device, **backend_options) as be:
                return _ingest(index_dir, store, local_segmenter(be, manifest, batch), items,
                               progress)
    finally:
        store.close()


def index_model(index_dir: str | Path) -> Path:
    """The model folder the index in ``index_dir`` was built with (kept in its store)."""
    store = SegmentStore(Path(index_dir) / STORE_FILE)
    try:
        return Path(store.meta()["model_path"])
    finally:
        store.close()


def stored_flip(meta: dict[str, Any]) -> bool:
    """Whether the index embeds with flip averaging (indexes from before the option: no)."""
    return bool(meta.get("flip", False))


def check_model(meta: dict[str, Any], manifest: Manifest, folder: Path) -> None:
    """Refuse a model whose embedding space is not the index's: other weights, or the same
    weights deployed at another input size (``export --max-side``)."""
    fp = model_fingerprint(manifest)
    if fp != meta.get("model_fingerprint"):
        raise StoreError(f"the model in {folder} ({fp[:24]}...) is not the one this index was built "
                         f"with ({str(meta.get('model_fingerprint'))[:24]}...): its embeddings "
                         "are not comparable", path=folder,
                         fix=f"use the index's model ({meta.get('model_path')}) or its bundle, or "
                             "build a new index with this model")
    side = int(manifest.preprocess.max_side)
    if meta.get("max_side", side) != side:       # indexes from before the key: not checked
        raise StoreError(f"the model in {folder} resizes images to {side} px but this index was "
                         f"built at {meta['max_side']} px: its embeddings are not comparable",
                         path=folder, fix="use the model folder or bundle the index was built with "
                                          f"({meta.get('model_path')}), or build a new index")


def images_root(source: str | Path, items: Sequence) -> Path:
    """The folder the relative names of ``items = discover(source)`` start from (absolute): the
    folder itself, else the common folder of the listed / matched images."""
    p = Path(str(source))
    if p.is_dir() or not items:
        return p.resolve() if p.is_dir() else p.parent.resolve()
    return Path(os.path.commonpath([str(it.path.resolve().parent) for it in items]))


def _relative_name(path: Path, root: str | None, fallback: str) -> str:
    """``path`` relative to the index's images root when it lies under it, else ``fallback``
    (the name relative to the folder given to ``index add``; indexes from before the root)."""
    if root:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return fallback


def _discover(source: str | Path) -> list:
    items = discover(source)
    if not items:
        raise SpmlError("no images found", path=source,
                        fix=f"image extensions: {', '.join(IMAGE_EXTENSIONS)}")
    return items


@dataclass(frozen=True)
class IngestSettings:
    """How the images of one index are segmented (from its stored meta)."""

    grid: tuple[int, int]
    kmeans_iters: int
    flip: bool
    images_root: str | None

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "IngestSettings":
        return cls(tuple(meta["test_grid"]), int(meta["kmeans_iters"]), stored_flip(meta),
                   meta.get("images_root"))


# A segmenter turns the images still to index into ImageRecords, batch by batch: it yields, per
# batch, (records of the images segmented, (path, reason) of those that failed, images handled).
Segmented = tuple[list[ImageRecord], list[tuple[str, str]], int]


def records_of(settings: IngestSettings, be, manifest: Manifest, items: Sequence,
               images: Sequence[np.ndarray]) -> list[ImageRecord]:
    """The store records of ``images`` (decoded, of ``items``): k-means segments of the
    (flip-averaged) embeddings on the index's grid, with prototype, class, box, area and mask."""
    segs = segment_images(be, manifest.preprocess, images, settings.grid, settings.kmeans_iters,
                          manifest.num_classes, settings.flip)  # type: ignore[arg-type]
    records = []
    for it, im, seg in zip(items, images, segs):
        path = it.path.resolve()
        records.append(ImageRecord(
            str(path), _relative_name(path, settings.images_root, it.rel), seg.width, seg.height,
            seg.boxes, seg.areas, seg.class_ids, seg.masks, seg.vectors, content_hash(im)))
    return records


def local_segmenter(be, manifest: Manifest, batch: int):
    """The segmenter of one process: reader threads one batch ahead, the network here."""
    def segment(todo: list, settings: IngestSettings) -> Iterator[Segmented]:
        with ThreadPoolExecutor(max_workers=2) as readers:
            for group in read_items(todo, max(1, int(batch)), readers):
                good = [r for r in group if r.error is None]
                failed = [(str(r.item.path), r.error) for r in group if r.error is not None]
                records: list[ImageRecord] = []
                if good:
                    try:
                        records = records_of(settings, be, manifest, [r.item for r in good],
                                             [r.image for r in good])
                    except SpmlError as exc:          # e.g. an image too large for the engine
                        failed += [(str(r.item.path), exc.message) for r in good]
                yield records, failed, len(group)
    return segment


def _ingest(index_dir: Path, store: SegmentStore, segmenter, items: list,
            progress: bool) -> IndexReport:
    """Segment the new images of ``items`` into ``store`` (one pending file and one transaction
    per batch, :func:`~spml_deploy.serving.vectors.add_batch`) with ``segmenter``
    (:func:`local_segmenter`, or the Ray one), then bring the index file up to date (written
    once, at the end). The caller holds the folder's lock."""
    settings = IngestSettings.of(store.meta())
    t0 = time.perf_counter()
    report = IndexReport(index_dir=str(index_dir))
    known = store.image_paths()
    todo = []
    for it in items:
        if str(it.path.resolve()) in known:
            report.skipped_images += 1
        else:
            todo.append(it)
            known.add(str(it.path.resolve()))        # a path listed twice is indexed once
    bar = tqdm(total=len(items), initial=report.skipped_images, desc="index", unit="img",
               disable=not progress, dynamic_ncols=True)
    try:
        if todo:
            for records, failed, handled in segmenter(todo, settings):
                report.failed += failed
                if records:
                    ids = add_batch(index_dir, store, records)
                    report.added_images += len(records)
                    report.added_segments += int(ids.size)
                bar.update(handled)
    finally:
        bar.close()
        if report.failed:
            with open(index_dir / FAILED_FILE, "a") as f:
                f.write("".join(f"{p}\t{why}\n" for p, why in report.failed))
        # also after an interruption: the committed batches get into the index file
        if store.count() > 0:
            sync_index(index_dir, store, save=True, warn_lag=False)
    report.total_images = store.num_images()
    report.total_segments = store.count()
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------------
# queries


@dataclass
class Hit:
    """One retrieved segment."""

    score: float                    # cosine similarity to the query prototype
    image: str                      # indexed image: absolute path on the indexing machine
    segment_id: int                 # store/FAISS id
    box: tuple[int, int, int, int]  # x, y, w, h in original pixels
    class_id: int
    class_name: str
    area: int
    row: SegmentRow = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    image_rel: str = ""             # path relative to the images root of 'index build'
    image_id: int = -1              # the store's id of the image

    def to_dict(self, local_paths: bool = False) -> dict[str, Any]:
        """JSON form: ``image`` is the relative name; ``local_paths`` adds ``path`` (absolute,
        for a local user; the HTTP service never sends it)."""
        out = {"score": round(float(self.score), 6), "image": self.image_rel,
               "image_id": self.image_id, "segment_id": self.segment_id, "box": list(self.box),
               "class_id": self.class_id, "class": self.class_name, "area": self.area}
        if local_paths:
            out["path"] = self.image
        return out


def parse_coords(value: Any, n: int, what: str) -> tuple[int, ...]:
    """``"x,y"`` / ``"x,y,w,h"`` (or a sequence) -> ``n`` whole pixel numbers.

    Fractional values are refused (:class:`QueryError` naming ``what``), not rounded: a point
    query is the segment under one pixel, and silently moving it could pick another segment.
    ``"12.0"`` is accepted as 12."""
    form = "X,Y" if n == 2 else "X,Y,W,H"
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    else:
        parts = list(value)
    try:
        nums = tuple(float(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"{what} must be {n} numbers, got {value!r}",
                         fix=f"write it as {form}") from exc
    if len(nums) != n or not all(math.isfinite(v) for v in nums):
        raise QueryError(f"{what} must be {n} finite numbers, got {value!r}",
                         fix=f"write it as {form}")
    if not all(float(v).is_integer() for v in nums):
        raise QueryError(f"{what} must be whole pixels, got {value!r}",
                         fix=f"round the coordinates yourself, e.g. {what} "
                             + ",".join(str(int(math.floor(v))) for v in nums))
    return tuple(int(v) for v in nums)


def read_mask(path: str | Path) -> np.ndarray:
    """A query mask file -> bool [H, W]: every non-black pixel is inside (0/1 or 0/255 grey
    masks, white-on-black colour masks, label maps whose class 0 is black). Use a lossless
    format (PNG): JPEG noise turns black pixels grey."""
    return read_image(path).max(axis=2) > 0


def query_vector(seg: SegmentedImage, point: Any = None, box: Any = None,
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The query prototype [D] (unit) of exactly one of point / box / mask, plus a description.

    Point (x, y): the prototype of the segment under the pixel. Box (x, y, w, h) or mask (bool
    [H, W]): normalise(sum over cells of n_c * phi_c) with n_c the original pixels of the cell
    inside the box / mask. Coordinates are original pixels; anything outside raises QueryError.
    """
    given = [v is not None for v in (point, box, mask)]
    if sum(given) != 1:
        raise QueryError("give exactly one of point, box or mask",
                         fix="e.g. --point 120,80 or --box 100,60,40,40 or --mask m.png")
    H, W = seg.height, seg.width
    hv, wv = seg.cells.shape
    if point is not None:
        x, y = parse_coords(point, 2, "point")
        if not (0 <= x < W and 0 <= y < H):
            raise QueryError(f"point ({x}, {y}) lies outside the {W}x{H} image",
                             fix=f"use 0 <= x < {W} and 0 <= y < {H} (pixels of the image)")
        s = int(seg.cells[seg.row_cell[y], seg.col_cell[x]])
        assert s >= 0, "a pixel's own segment always covers it"
        return seg.vectors[s], {"point": [x, y], "segment": s, "box": seg.boxes[s].tolist(),
                                "class_id": int(seg.class_ids[s])}
    if box is not None:
        x, y, w, h = parse_coords(box, 4, "box")
        if w < 1 or h < 1 or x < 0 or y < 0 or x + w > W or y + h > H:
            raise QueryError(f"box ({x}, {y}, {w}, {h}) is empty or not inside the {W}x{H} image",
                             fix="give X,Y,W,H with W,H >= 1, X+W <= width and Y+H <= height")
        rows = np.bincount(seg.row_cell[y:y + h], minlength=hv)
        cols = np.bincount(seg.col_cell[x:x + w], minlength=wv)
        weight = np.outer(rows, cols).astype(np.float64)
        desc: dict[str, Any] = {"box": [x, y, w, h]}
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (H, W):
            raise QueryError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {W}x{H}",
                             fix="draw the mask at the query image's size")
        inside = int(np.count_nonzero(mask))
        if inside == 0:
            raise QueryError("mask is empty (no pixel inside)",
                             fix="mark the region with non-zero (white) pixels")
        weight = _cell_counts(mask, seg.row_cell, seg.col_cell, hv, wv)
        desc = {"mask_pixels": inside}
    wt = torch.from_numpy(weight).to(seg.phi.dtype)
    pooled = (seg.phi * wt).flatten(1).sum(1)
    return F.normalize(pooled, dim=0, eps=1e-12).numpy().astype(np.float32), desc


def _cell_counts(mask: np.ndarray, row_cell: np.ndarray, col_cell: np.ndarray, hv: int, wv: int
                 ) -> np.ndarray:
    """Pixels of the bool ``mask`` [H, W] inside every cell, float64 [hv, wv], one cell row at a
    time (no per-pixel index arrays: the memory is a few rows of the mask)."""
    row_start, row_end = _cell_ranges(row_cell, hv)
    cols, col_first = np.unique(col_cell, return_index=True)
    out = np.zeros((hv, wv), np.float64)
    for r in range(hv):
        if row_end[r] > row_start[r]:
            per_column = mask[row_start[r]:row_end[r]].sum(axis=0, dtype=np.int64)
            out[r, cols] = np.add.reduceat(per_column, col_first)
    return out


def query_region(seg: SegmentedImage, point: Any = None, box: Any = None,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """The query's pixels, bool [H, W] (for drawing): the segment under the point, the box, or
    the mask. Arguments as in :func:`query_vector` (validated there)."""
    if point is not None:
        x, y = parse_coords(point, 2, "point")
        return seg.segment_map() == seg.cells[seg.row_cell[y], seg.col_cell[x]]
    if box is not None:
        x, y, w, h = parse_coords(box, 4, "box")
        out = np.zeros((seg.height, seg.width), bool)
        out[y:y + h, x:x + w] = True
        return out
    return np.asarray(mask, dtype=bool)


class Retriever:
    """An opened index (store + prototype index) and its model, for repeated queries.

    Thread-safe for concurrent queries when the backend is (the HTTP service serialises the
    network calls with a lock).
    """

    def __init__(self, index_dir: str | Path, model_path: str | Path | Bundle | None = None,
                 backend: str = "torch", device: str = "cpu", backend_obj=None,
                 **backend_options: Any):
        """``model_path`` (default: the index's model) is opened and verified here unless
        ``backend_obj``, an opened backend of that model, is given."""
        self.index_dir = Path(index_dir)
        self._own_backend = backend_obj is None
        self.store = SegmentStore(self.index_dir / STORE_FILE)
        try:
            self.meta = self.store.meta()
            model = model_path or self.meta["model_path"]
            if backend_obj is None:
                bundle = open_model(model)
                folder, self.manifest = bundle.folder, bundle.manifest
            else:
                folder = model.folder if isinstance(model, Bundle) else model_folder(model)
                self.manifest = backend_obj.manifest
            check_model(self.meta, self.manifest, folder)
            with exclusive(self.index_dir, required=False) as writer:   # no add running
                self.index = sync_index(self.index_dir, self.store, save=writer)
            if backend_obj is None:
                backend_obj = load_backend(bundle, kind=backend, device=device, **backend_options)
            self.backend = backend_obj
        except BaseException:
            self.store.close()
            raise
        self.grid = tuple(self.meta["test_grid"])
        self.iters = int(self.meta["kmeans_iters"])
        self.flip = stored_flip(self.meta)
        self.classes = list(self.meta["classes"])
        self.unhashed_images = self.store.images_without_hash()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def segment(self, image: np.ndarray) -> SegmentedImage:
        """The query image's segments (same grid, iterations and flip averaging as the index)."""
        return segment_images(self.backend, self.manifest.preprocess, [image], self.grid,
                              self.iters, len(self.classes), self.flip)[0]  # type: ignore[arg-type]

    def class_id(self, class_name: str | None) -> int | None:
        if class_name is None:
            return None
        if class_name in self.classes:
            return self.classes.index(class_name)
        raise QueryError(f"unknown class '{class_name}'",
                         fix=f"choose one of {', '.join(self.classes)}")

    def search(self, vector: np.ndarray, k: int = 10, class_id: int | None = None,
               exclude_images: dict[int, int] | None = None) -> list[Hit]:
        """Top-``k`` segments by cosine similarity to ``vector`` [D]; with ``class_id`` only
        segments predicted as that class; ``exclude_images`` ({image id: its segment count}, see
        :meth:`self_images`) leaves out the segments of those images. The search goes deeper
        until k segments pass the filters (or the index is exhausted)."""
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}", fix="e.g. -k 10")
        n = len(self)
        if n == 0:
            return []
        skip = dict(exclude_images or {})
        depth = min(n, (k if class_id is None else max(4 * k, 64)) + sum(skip.values()))
        q = np.ascontiguousarray(vector, np.float32).reshape(1, -1)
        while True:
            scores, ids = self.index.search(q, depth)
            scores, ids = np.asarray(scores)[0], np.asarray(ids)[0]
            ok = ids >= 0
            rows = self.store.segments(ids[ok].tolist())
            hits = [Hit(float(s), r.image_path, r.id, tuple(r.box), r.class_id,
                        self._name(r.class_id), r.area, r, r.image_rel, r.image_id)
                    for s, r in zip(scores[ok], rows) if r.image_id not in skip]
            if class_id is not None:
                hits = [h for h in hits if h.class_id == class_id]
            if len(hits) >= k or depth >= n:
                return hits[:k]
            depth = min(n, depth * 4)

    def self_images(self, image: np.ndarray) -> tuple[dict[int, int], bool | None]:
        """The indexed copies of ``image`` (same decoded pixels): ({image id: segment count},
        whether the image is in the index: True, False, or None when it is not found but some
        images were indexed before content hashes were stored, so it cannot be told)."""
        found = self.store.images_with_hash(content_hash(image))
        if found:
            return found, True
        return found, (None if self.unhashed_images else False)

    def query(self, image: np.ndarray | str | Path, point: Any = None, box: Any = None,
              mask: np.ndarray | str | Path | None = None, k: int = 10,
              class_name: str | None = None, exclude_self: bool = True,
              seg: SegmentedImage | None = None) -> tuple[list[Hit], dict[str, Any]]:
        """Hits for a point / box / mask on ``image`` (array or path), and the query's description.

        ``exclude_self``: leave out the segments of the query image itself when it is in the
        index (same decoded pixels). The description says so: ``in_index`` (True / False / None:
        cannot be told, see :meth:`self_images`) and ``excluded_images`` (how many indexed
        images were left out). ``seg``: the query image's :meth:`segment`, when the caller has it.
        """
        class_id = self.class_id(class_name)
        if not isinstance(image, np.ndarray):
            image = read_image(image)
        if mask is not None and not isinstance(mask, np.ndarray):
            mask = read_mask(mask)
        seg = self.segment(image) if seg is None else seg
        vec, desc = query_vector(seg, point=point, box=box, mask=mask)
        if "class_id" in desc:
            desc["class"] = self._name(desc["class_id"])
        copies, in_index = self.self_images(image)
        skip = copies if exclude_self else {}
        desc.update(in_index=in_index, excluded_images=len(skip))
        return self.search(vec, k, class_id, exclude_images=skip), desc

    def _name(self, class_id: int) -> str:
        return self.classes[class_id] if 0 <= class_id < len(self.classes) else str(class_id)

    def info(self) -> dict[str, Any]:
        return {"index_dir": str(self.index_dir), "segments": len(self),
                "images": self.store.num_images(), "index_type": self.meta["index_type"],
                "embed_dim": self.meta["embed_dim"], "flip": self.flip, "classes": self.classes}

    def close(self) -> None:
        self.store.close()
        if self._own_backend:
            self.backend.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(index_dir: str | Path, model_path: str | Path | None, image: str | Path | np.ndarray,
          point: Any = None, box: Any = None, mask: str | Path | np.ndarray | None = None,
          k: int = 10, class_name: str | None = None, backend: str = "torch",
          device: str = "cpu", exclude_self: bool = True) -> list[Hit]:
    """Top-``k`` indexed segments most similar to a point / box / mask on ``image``.

    ``model_path`` None: the model the index was built with. ``class_name``: keep only hits
    predicted as that class. ``exclude_self``: see :meth:`Retriever.query`. Raises
    :class:`QueryError` for out-of-image points/boxes.
    """
    with Retriever(index_dir, model_path, backend=backend, device=device) as r:
        hits, _ = r.query(image, point=point, box=box, mask=mask, k=k, class_name=class_name,
                          exclude_self=exclude_self)
    return hits


# --------------------------------------------------------------------------------------------
# drawing


def render_hits(hits: Sequence[Hit], out_png: str | Path, *, tile: int = 192, cols: int = 5,
                query_image: np.ndarray | None = None, query_mask: np.ndarray | None = None,
                store: SegmentStore | None = None) -> Path:
    """Grid of the retrieved segments highlighted in their images (PNG, written atomically).

    Each tile: the image region around the segment's box (with a margin), the segment tinted and
    outlined, the rank, score and class. ``query_image`` (+ bool ``query_mask``) adds the query
    as the first tile. Unreadable hit images become grey tiles.
    """
    import cv2
    from PIL import Image
    import io

    tiles = []
    if query_image is not None:
        qm = query_mask if query_mask is not None else np.zeros(query_image.shape[:2], bool)
        tiles.append(_tile(query_image, qm, None, "query", tile, (255, 80, 80)))
    for rank, h in enumerate(hits, 1):
        row = h.row if h.row is not None else (store.segments([h.segment_id])[0] if store else None)
        label = f"#{rank} {h.score:.2f} {h.class_name}"
        try:
            img = read_image(h.image)
            m = row.full_mask() if row is not None else np.zeros(img.shape[:2], bool)
            if m.shape != img.shape[:2]:
                raise SpmlError("image changed since it was indexed", path=h.image)
            tiles.append(_tile(img, m, h.box, label, tile, (80, 255, 80)))
        except SpmlError as exc:
            log.warning("render_hits: %s", exc)
            blank = np.full((tile, tile, 3), 96, np.uint8)
            cv2.putText(blank, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
            tiles.append(blank)
    if not tiles:
        tiles.append(np.full((tile, tile, 3), 96, np.uint8))
    ncol = max(1, min(cols, len(tiles)))
    nrow = -(-len(tiles) // ncol)
    grid = np.full((nrow * tile, ncol * tile, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncol)
        grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = t
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return atomic_write_bytes(out_png, buf.getvalue())


def _tile(image: np.ndarray, mask: np.ndarray, box, label: str, size: int,
          colour: tuple[int, int, int]) -> np.ndarray:
    import cv2

    H, W = image.shape[:2]
    if box is None:
        ys, xs = np.nonzero(mask)
        box = (0, 0, W, H) if ys.size == 0 else (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                  ys.max() - ys.min() + 1)
    x, y, w, h = (int(v) for v in box)
    side = int(max(w, h) * 1.6) + 8
    cx, cy = x + w / 2, y + h / 2
    x0 = int(np.clip(cx - side / 2, 0, max(0, W - side)))
    y0 = int(np.clip(cy - side / 2, 0, max(0, H - side)))
    x1, y1 = min(W, x0 + side), min(H, y0 + side)
    img = image.astype(np.float32)
    tint = np.asarray(colour, np.float32)
    img[mask] = 0.55 * img[mask] + 0.45 * tint
    img = img.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    img = np.ascontiguousarray(img)
    cv2.drawContours(img, contours, -1, colour, max(1, int(round(max(W, H) / 256))))
    crop = img[y0:y1, x0:x1]
    ch, cw = crop.shape[:2]
    s = size / max(ch, cw)
    crop = cv2.resize(crop, (max(1, int(round(cw * s))), max(1, int(round(ch * s)))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST)
    out = np.full((size, size, 3), 32, np.uint8)
    out[: crop.shape[0], : crop.shape[1]] = crop[:size, :size]
    cv2.rectangle(out, (0, 0), (size - 1, 16), (0, 0, 0), -1)
    cv2.putText(out, label[:32], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out
