"""Building and extending a segment index: ``index build`` / ``index add``.

Every image of a collection is cut into segments (:func:`spml_deploy.serving.segments.segment_images`)
by a segmenter (this process, :func:`local_segmenter`, or Ray workers,
:func:`spml_deploy.serving.ray_job.ray_segmenter`); each batch's vectors go to a durable pending
file, then its images and segments to the store in one transaction, and the index file is
written at the end (:mod:`spml_deploy.serving.vectors`). An interrupted build or add loses
nothing it committed; ``index add`` resumes it (images already in the store are skipped).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from spml_deploy.artifacts import MANIFEST, Manifest, model_folder, sha256_file
from spml_deploy.data.imageio import IMAGE_EXTENSIONS
from spml_deploy.engine.backends import load_backend
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import ConfigError, SpmlError
from spml_deploy.serving.segment import discover, read_items
from spml_deploy.serving.segments import segment_images
from spml_deploy.serving.store import (MASK_ENCODING, STORE_FILE, STORE_SCHEMA_VERSION,
                                       ImageRecord, SegmentStore, StoreError, content_hash)
from spml_deploy.serving.vectors import (INDEX_TYPES, add_batch, exclusive, prepare_write,
                                         sync_index)

FAILED_FILE = "failed.txt"


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
