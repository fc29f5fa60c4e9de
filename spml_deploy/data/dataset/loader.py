""":func:`load_dataset`: a dataset folder read and validated into a :class:`Dataset` (image sizes,
records with their coordinates checked, label maps, splits)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np

from spml_deploy.errors import DatasetError, ImageReadError
from spml_deploy.data.dataset.annotations import (_Ctx, _parse_annotations, _parse_categories,
                                                  _parse_images, _read_json)
from spml_deploy.data.dataset.records import (COORD_TOL, Box, Dataset, ImageRecord, Point, Scribble,
                                              load_mask, load_sparse)
from spml_deploy.data.imageio import image_size, read_image

log = logging.getLogger(__name__)


def load_dataset(root: str | Path, check_files: bool = True,
                 decode_images: bool = False) -> Dataset:
    """Load and validate the dataset at ``root`` (see :mod:`spml_deploy.data.dataset` for the contract).

    ``check_files``: read every image header (existence, readability, declared size), every
    mask and sparse map fully (size and class ids). ``decode_images``: also decode every image
    fully to catch truncated files (slow; implies ``check_files``). Without ``check_files`` only
    annotations.json and the splits are validated (image headers are still read for images
    whose width/height are not declared). Raises :class:`DatasetError` on the first problem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("dataset folder not found" if not root.exists() else "not a folder",
                           path=root, fix="pass the folder holding images/ and annotations.json")
    ann_path = root / "annotations.json"
    if not ann_path.is_file():
        raise DatasetError("annotations.json not found", path=ann_path,
                           fix="create it (it may list images with no annotations); "
                               "see the dataset contract in README")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DatasetError("images/ folder not found", path=images_dir,
                           fix="put the images under DATASET/images/")
    ctx = _Ctx(ann_path)
    doc = _read_json(ann_path)
    categories = _parse_categories(doc, ctx)
    C = len(categories)

    raw_images = doc.get("images")
    if not isinstance(raw_images, list):
        raise ctx.fail("images", "missing or not a list",
                       'add "images": [{"id": 1, "file_name": "0001.png"}, ...]')
    raw_anns = doc.get("annotations", [])
    if not isinstance(raw_anns, list):
        raise ctx.fail("annotations", "not a list", 'use "annotations": [] when there are none')

    entries = _parse_images(raw_images, C, ctx, root)
    per_image = _parse_annotations(raw_anns, entries, C, ctx)
    _resolve_sizes(entries, ctx, check_files or decode_images, decode_images)
    records = _build_records(entries, per_image, ctx, root)
    if check_files or decode_images:
        _check_label_maps(records, C)
    splits = _parse_splits(root, records)
    ds = Dataset(root=root, categories=categories, images=tuple(records), splits=splits)
    log.info("loaded %s: %d images, %d classes", root, len(records), C)
    return ds


def _progress(items: list, desc: str) -> Iterable:
    if len(items) < 200 or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", leave=False)


def _resolve_sizes(entries: list[dict], ctx: _Ctx, check_files: bool, decode: bool) -> None:
    todo = [e for e in entries if check_files or e["width"] is None]
    for e in _progress(todo, "checking images"):
        try:
            if decode:
                h, w = read_image(e["path"]).shape[:2]
            else:
                w, h = image_size(e["path"])
        except ImageReadError as exc:
            raise DatasetError(f"{e['where']}: {exc.message}", path=e["path"],
                               fix=exc.fix) from exc
        if e["width"] is not None and (e["width"], e["height"]) != (w, h):
            raise ctx.fail(e["where"], f"declares {e['width']}x{e['height']} (width x height) but "
                           f"the image file is {w}x{h} (after EXIF orientation)",
                           f"set width {w} and height {h} (or drop both to read them from "
                           "the file)")
        e["width"], e["height"] = w, h


def _find_label(folder: Path, rel: PurePosixPath, stem: str) -> Path | None:
    if not folder.is_dir():
        return None
    for cand in (folder / Path(*rel.with_suffix(".png").parts), folder / f"{stem}.png"):
        if cand.is_file():
            return cand
    return None


def _build_records(entries: list[dict], per_image: dict[int, list], ctx: _Ctx,
                   root: Path) -> list[ImageRecord]:
    tol = COORD_TOL
    records = []
    for e in entries:
        W, H = e["width"], e["height"]
        boxes, points, scribbles = [], [], []
        for j, where, kind, cid, s in per_image[e["id"]]:
            if kind == "bbox":
                x, y, w, h = s
                if not (x >= -tol and y >= -tol and w > 0 and h > 0
                        and x + w <= W + tol and y + h <= H + tol):
                    raise ctx.fail(where, f"bbox {s} is outside image {e['file_name']!r} of size "
                                   f"{W}x{H}; need 0 <= x, 0 <= y, w > 0, h > 0, x + w <= {W}, "
                                   f"y + h <= {H}", "clip the box to the image")
                boxes.append(Box(cid, x, y, w, h))
            else:
                pts = np.asarray(s, dtype=np.float64).reshape(-1, 2)
                bad = ((pts[:, 0] < -tol) | (pts[:, 0] > W - 1 + tol)
                       | (pts[:, 1] < -tol) | (pts[:, 1] > H - 1 + tol))
                if bad.any():
                    k = int(np.argmax(bad))
                    what = "point" if kind == "point" else f"scribble vertex {k}"
                    raise ctx.fail(where, f"{what} {pts[k].tolist()} is outside image "
                                   f"{e['file_name']!r} of size {W}x{H}; need 0 <= x <= {W - 1} "
                                   f"and 0 <= y <= {H - 1} (pixel centres)",
                                   "move it inside the image")
                if kind == "point":
                    points.append(Point(cid, float(pts[0, 0]), float(pts[0, 1])))
                else:
                    scribbles.append(Scribble(cid, pts))
        fg = sorted({b.category for b in boxes} | {p.category for p in points if p.category}
                    | {s.category for s in scribbles if s.category})
        if e["tags"] is not None:
            extra = sorted(set(fg) - set(e["tags"]))
            if extra:
                raise ctx.fail(e["where"], f"tags {list(e['tags'])} miss categories {extra} that "
                               "its annotations use", "add them to tags, or drop 'tags' to derive "
                               "them from the annotations")
            tags, source = e["tags"], "given"
        elif per_image[e["id"]]:
            tags, source = tuple(fg), "derived"
        else:
            tags, source = (), "none"
        records.append(ImageRecord(
            id=e["id"], file_name=e["file_name"], path=e["path"], stem=e["stem"], width=W,
            height=H, tags=tags, boxes=tuple(boxes), points=tuple(points),
            scribbles=tuple(scribbles), mask_path=_find_label(root / "masks", e["rel"], e["stem"]),
            sparse_path=_find_label(root / "sparse", e["rel"], e["stem"]), tags_source=source))
    for sub, attr in (("masks", "mask_path"), ("sparse", "sparse_path")):
        folder = root / sub
        if folder.is_dir():
            used = {getattr(r, attr) for r in records}
            orphans = [p for p in folder.rglob("*.png") if p not in used]
            if orphans:
                log.warning("%d file(s) in %s match no image (e.g. %s); they are ignored",
                            len(orphans), folder, orphans[0].name)
    return records


def _check_label_maps(records: list[ImageRecord], C: int) -> None:
    todo = [r for r in records if r.mask_path is not None or r.sparse_path is not None]
    for rec in _progress(todo, "checking masks"):
        load_mask(rec, C)
        load_sparse(rec, C)


def _parse_splits(root: Path, records: list[ImageRecord]) -> dict[str, tuple[str, ...]]:
    folder = root / "splits"
    if not folder.is_dir():
        return {}
    lookup: dict[str, str] = {}
    for rec in records:
        rel = PurePosixPath(rec.file_name.replace("\\", "/"))
        for key in (rec.stem, str(rel), str(rel.with_suffix("")), rel.name):
            lookup.setdefault(key, rec.stem)
    splits: dict[str, tuple[str, ...]] = {}
    for path in sorted(folder.glob("*.txt")):
        name = path.stem
        if name == "all":
            raise DatasetError("'all' is reserved for every image", path=path,
                               fix="rename the file (or delete it: 'all' already means "
                                   "every image)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read split file: {exc}", path=path,
                               fix="save it as UTF-8 text, one image stem per line") from exc
        stems: list[str] = []
        first_line: dict[str, int] = {}
        for lineno, line in enumerate(lines, 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            stem = lookup.get(entry)
            if stem is None:
                raise DatasetError(f"line {lineno}: {entry!r} is not an image of the dataset",
                                   path=path, fix="remove the line, or add the image to "
                                   "annotations.json (lines name image stems, e.g. '0001')")
            if stem in first_line:
                raise DatasetError(f"line {lineno}: {entry!r} is listed twice (also line "
                                   f"{first_line[stem]})", path=path, fix="remove one of them")
            first_line[stem] = lineno
            stems.append(stem)
        splits[name] = tuple(stems)
    return splits
