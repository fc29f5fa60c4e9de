"""The dataset contract: reading and validating a dataset folder.

::

    DATASET/
      images/              RGB images (png, jpg, bmp, webp, tiff; grayscale, RGBA, 16-bit and
                           EXIF-rotated images are accepted, see spml_deploy.data.imageio)
      annotations.json     weak annotations, COCO-style (always required; may hold no annotations)
      masks/<stem>.png     optional full label maps: uint8 class ids, 255 = ignore
      sparse/<stem>.png    optional sparse label maps: class ids, 255 = unlabeled
      splits/<name>.txt    optional lists of image stems, one per line (train.txt, val.txt)

``annotations.json``::

    {"categories": [{"id": 0, "name": "background"}, {"id": 1, "name": "cat"}],
     "images": [{"id": 1, "file_name": "0001.png", "width": 128, "height": 96, "tags": [1]}],
     "annotations": [
       {"image_id": 1, "category_id": 1, "bbox": [x, y, w, h]},
       {"image_id": 1, "category_id": 1, "point": [x, y]},
       {"image_id": 1, "category_id": 0, "scribble": [[x, y], [x, y], ...]}]}

Rules checked by :func:`load_dataset` (each failure is a :class:`DatasetError` naming the file,
the entry and the fix):

* Category ids are exactly ``0..C-1`` (any order in the file), ``0`` is background, ``C >= 2``,
  names are unique. Ids are JSON integers.
* Image ids are unique integers; ``file_name`` is a relative path under ``images/`` (subfolders
  allowed, no ``..``). The *stem* (file name without folders and extension) must be unique: it
  names ``masks/<stem>.png``, ``sparse/<stem>.png``, split entries and prediction files. A mask
  at ``masks/<file_name without extension>.png`` (mirroring subfolders) is also found.
* ``width``/``height`` are optional; when absent they are read from the image header. With
  ``check_files`` a declared size must equal the image's size after EXIF orientation.
* Coordinates are pixels of the EXIF-oriented image, ``x`` = column, ``y`` = row, floats
  allowed. A point (and every scribble vertex) names a pixel centre:
  ``0 <= x <= width - 1`` and ``0 <= y <= height - 1``. A box ``[x, y, w, h]`` is in pixel-edge
  coordinates (COCO): ``0 <= x``, ``0 <= y``, ``w > 0``, ``h > 0``, ``x + w <= width``,
  ``y + h <= height``. A tolerance of ``COORD_TOL`` pixels absorbs float rounding.
* Background (category 0) may be used by points and scribbles, never by boxes or tags.
  A scribble has at least 2 vertices. Each annotation has exactly one of bbox/point/scribble.
* ``tags`` (foreground class ids present in the image) are optional. When absent they are
  derived from the image's annotations (the foreground categories of its boxes, points and
  scribbles); an image with neither has no tags (``tags_source == "none"``). Given tags must
  include the category of every foreground annotation of the image.
* Masks and sparse maps must have their image's size and hold only ids ``< C`` or 255.
* Split files list stems (or file_name, with or without extension); unknown or repeated
  entries are errors. ``all`` is reserved: it names every image.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from spml_deploy.errors import DatasetError, ImageReadError
from spml_deploy.data.imageio import image_size, read_image, read_label_png

log = logging.getLogger(__name__)

__all__ = [
    "KINDS", "COORD_TOL", "Category", "Box", "Point", "Scribble", "ImageRecord", "Dataset",
    "load_dataset", "load_mask", "load_sparse",
]

KINDS = ("tags", "boxes", "points", "scribbles", "sparse", "masks")
COORD_TOL = 1e-3
IGNORE = 255
_ANN_KEYS = ("bbox", "point", "scribble")


# --------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixel-edge coordinates: columns x..x+w, rows y..y+h."""

    category: int
    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Point:
    """A labelled pixel centre: column x, row y."""

    category: int
    x: float
    y: float


@dataclass(frozen=True, eq=False)
class Scribble:
    """A polyline of K >= 2 vertices; ``points`` is a K x 2 float64 array of (x, y)."""

    category: int
    points: np.ndarray


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset with its annotations (coordinates of the EXIF-oriented image)."""

    id: int
    file_name: str
    path: Path
    stem: str
    width: int
    height: int
    tags: tuple[int, ...]
    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()
    scribbles: tuple[Scribble, ...] = ()
    mask_path: Path | None = None
    sparse_path: Path | None = None
    tags_source: str = "none"  # "given" (in annotations.json), "derived" or "none"

    def annotation_kinds(self) -> tuple[str, ...]:
        """The annotation kinds this image has, in :data:`KINDS` order."""
        have = {
            "tags": self.tags_source != "none" or bool(self.tags),
            "boxes": bool(self.boxes),
            "points": bool(self.points),
            "scribbles": bool(self.scribbles),
            "sparse": self.sparse_path is not None,
            "masks": self.mask_path is not None,
        }
        return tuple(k for k in KINDS if have[k])


def _describe(rec: ImageRecord) -> str:
    return f"image id {rec.id} ({rec.file_name!r})"


def _check_label_map(arr: np.ndarray, rec: ImageRecord, path: Path, what: str,
                     num_classes: int | None) -> np.ndarray:
    h, w = arr.shape
    if (w, h) != (rec.width, rec.height):
        raise DatasetError(
            f"{what} of {_describe(rec)} is {w}x{h} (width x height) but its image is "
            f"{rec.width}x{rec.height}", path=path,
            fix=f"save the {what} at the image's size (after EXIF orientation)")
    if num_classes is not None:
        values = np.unique(arr)
        bad = values[(values >= num_classes) & (values != IGNORE)]
        if bad.size:
            raise DatasetError(
                f"{what} of {_describe(rec)} holds class ids {bad.tolist()[:10]} that do not "
                f"exist: the dataset has {num_classes} categories (ids 0..{num_classes - 1}) "
                f"and {IGNORE} = ignore", path=path,
                fix="add the missing categories to annotations.json or relabel those pixels")
    return arr


def _read_label_map(rec: ImageRecord, path: Path | None, what: str,
                    num_classes: int | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        arr = read_label_png(path)
    except ImageReadError as exc:
        raise DatasetError(f"{what} of {_describe(rec)}: {exc.message}", path=path,
                           fix=exc.fix) from exc
    return _check_label_map(arr, rec, path, what, num_classes)


def load_mask(record: ImageRecord, num_classes: int | None = None) -> np.ndarray | None:
    """The full label map of ``record`` (height x width uint8, 255 = ignore), or None.

    Checks its size against the record, and its values against ``num_classes`` when given.
    """
    return _read_label_map(record, record.mask_path, "mask", num_classes)


def load_sparse(record: ImageRecord, num_classes: int | None = None) -> np.ndarray | None:
    """The sparse label map of ``record`` (height x width uint8, 255 = unlabeled), or None."""
    return _read_label_map(record, record.sparse_path, "sparse label map", num_classes)


# --------------------------------------------------------------------------------------------
# dataset


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: categories (index = class id), images, and named splits of stems."""

    root: Path
    categories: tuple[Category, ...]
    images: tuple[ImageRecord, ...]
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _by_stem: dict[str, ImageRecord] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_stem", {rec.stem: rec for rec in self.images})

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def by_stem(self, stem: str) -> ImageRecord:
        """The image whose stem is ``stem``; :class:`DatasetError` if there is none."""
        rec = self._by_stem.get(stem)
        if rec is None:
            raise DatasetError(f"no image with stem {stem!r}", path=self.root / "annotations.json",
                               fix="use the file name of an image without folders and extension")
        return rec

    def split(self, name: str) -> list[ImageRecord]:
        """Images of split ``name`` (``splits/<name>.txt``) in file order; ``all`` = every image."""
        if name == "all":
            return list(self.images)
        if name not in self.splits:
            available = ", ".join(["all", *sorted(self.splits)])
            raise DatasetError(f"unknown split {name!r}; available: {available}",
                               path=self.root / "splits",
                               fix=f"pick one of: {available}, or add splits/{name}.txt")
        return [self._by_stem[s] for s in self.splits[name]]

    def annotation_kinds(self) -> dict[str, int]:
        """Number of images having each annotation kind (every kind of :data:`KINDS`, maybe 0)."""
        counts = dict.fromkeys(KINDS, 0)
        for rec in self.images:
            for kind in rec.annotation_kinds():
                counts[kind] += 1
        return counts

    def has_kind(self, kind: str) -> bool:
        """Whether at least one image has annotation kind ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"unknown annotation kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self.annotation_kinds()[kind] > 0

    def load_mask(self, record: ImageRecord) -> np.ndarray | None:
        """:func:`load_mask` with this dataset's class count."""
        return load_mask(record, self.num_classes)

    def load_sparse(self, record: ImageRecord) -> np.ndarray | None:
        """:func:`load_sparse` with this dataset's class count."""
        return load_sparse(record, self.num_classes)

    def summary(self) -> dict[str, Any]:
        """Plain-dict summary: images, classes, kinds (images / annotations), masks, splits."""
        kinds = self.annotation_kinds()
        n_ann = {
            "tags": sum(len(r.tags) for r in self.images),
            "boxes": sum(len(r.boxes) for r in self.images),
            "points": sum(len(r.points) for r in self.images),
            "scribbles": sum(len(r.scribbles) for r in self.images),
            "sparse": kinds["sparse"],
            "masks": kinds["masks"],
        }
        return {
            "root": str(self.root),
            "images": len(self.images),
            "num_classes": self.num_classes,
            "classes": [{"id": c.id, "name": c.name} for c in self.categories],
            "annotation_kinds": {k: {"images": kinds[k], "annotations": n_ann[k]} for k in KINDS},
            "masks": kinds["masks"],
            "sparse": kinds["sparse"],
            "splits": {name: len(stems) for name, stems in sorted(self.splits.items())},
        }

    def format_summary(self) -> str:
        """Human-readable :meth:`summary` for the terminal."""
        s = self.summary()
        n = s["images"]
        lines = [f"dataset {s['root']}: {n} images, {s['num_classes']} classes",
                 "classes: " + ", ".join(f"{c['id']} {c['name']}" for c in s["classes"]),
                 "annotation kinds (images with it / annotations):"]
        unit = {"tags": "tags", "boxes": "boxes", "points": "points", "scribbles": "scribbles"}
        for kind in KINDS:
            k = s["annotation_kinds"][kind]
            extra = f"  ({k['annotations']} {unit[kind]})" if kind in unit else ""
            lines.append(f"  {kind:<10}{k['images']:>7} / {n}{extra}")
        if s["splits"]:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
        else:
            lines.append("splits: none (splits/<name>.txt); 'all' = every image")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# loading and validation


class _Ctx:
    """Where errors point: the annotations file."""

    def __init__(self, ann_path: Path):
        self.path = ann_path

    def fail(self, where: str, message: str, fix: str) -> DatasetError:
        return DatasetError(f"{where}: {message}", path=self.path, fix=fix)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(ann_path: Path) -> dict:
    try:
        text = ann_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 text ({exc})", path=ann_path,
                           fix="save annotations.json as UTF-8") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read: {exc}", path=ann_path,
                           fix="check the file's permissions") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                           path=ann_path, fix="fix the JSON syntax there (a JSON linter helps)"
                           ) from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"top level is a JSON {type(doc).__name__}, expected an object",
                           path=ann_path, fix='use {"categories": [...], "images": [...], '
                                              '"annotations": [...]}')
    return doc


def _parse_categories(doc: dict, ctx: _Ctx) -> tuple[Category, ...]:
    cats = doc.get("categories")
    if not isinstance(cats, list):
        raise ctx.fail("categories", "missing or not a list",
                       'add "categories": [{"id": 0, "name": "background"}, {"id": 1, ...}]')
    seen: dict[int, int] = {}
    names: dict[str, int] = {}
    out = []
    for i, c in enumerate(cats):
        where = f"categories[{i}]"
        if not isinstance(c, dict):
            raise ctx.fail(where, f"is a {type(c).__name__}, expected an object",
                           'write it as {"id": 1, "name": "..."}')
        if not _is_int(c.get("id")):
            raise ctx.fail(where, f"'id' is missing or not an integer ({c.get('id')!r})",
                           "give every category an integer id")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise ctx.fail(where, "'name' is missing or not a non-empty string "
                           f"({c.get('name')!r})", "give every category a name")
        cid, name = c["id"], c["name"]
        if cid in seen:
            raise ctx.fail(where, f"duplicate category id {cid} (also categories[{seen[cid]}])",
                           "give every category a distinct id")
        if name in names:
            raise ctx.fail(where, f"duplicate category name {name!r} (also "
                           f"categories[{names[name]}])", "give every category a distinct name")
        seen[cid], names[name] = i, i
        out.append(Category(cid, name))
    ids = sorted(seen)
    if len(ids) < 2:
        raise ctx.fail("categories", f"{len(ids)} categories; at least background (id 0) and one "
                       "foreground class are needed", "add the classes of your dataset")
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))
        raise ctx.fail("categories", f"ids are {ids}; they must be 0..C-1 without gaps, with "
                       f"0 = background" + (f" (missing {missing})" if missing else ""),
                       "renumber the categories 0..C-1 (and the category_id of annotations)")
    return tuple(sorted(out, key=lambda c: c.id))


def _safe_rel(file_name: str) -> PurePosixPath | None:
    rel = PurePosixPath(file_name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.name or file_name.startswith("/"):
        return None
    return rel


def load_dataset(root: str | Path, check_files: bool = True,
                 decode_images: bool = False) -> Dataset:
    """Load and validate the dataset at ``root`` (see the module docstring for the contract).

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


def _parse_images(raw: list, C: int, ctx: _Ctx, root: Path) -> list[dict]:
    entries: list[dict] = []
    ids: dict[int, int] = {}
    files: dict[str, int] = {}
    stems: dict[str, int] = {}
    for i, e in enumerate(raw):
        where = f"images[{i}]"
        if not isinstance(e, dict):
            raise ctx.fail(where, f"is a {type(e).__name__}, expected an object",
                           'write it as {"id": 1, "file_name": "0001.png"}')
        if not _is_int(e.get("id")):
            raise ctx.fail(where, f"'id' is missing or not an integer ({e.get('id')!r})",
                           "give every image a distinct integer id")
        iid = e["id"]
        if iid in ids:
            raise ctx.fail(where, f"duplicate image id {iid} (also images[{ids[iid]}])",
                           "give every image a distinct id")
        fn = e.get("file_name")
        if not isinstance(fn, str) or not fn:
            raise ctx.fail(f"{where} (id {iid})",
                           f"'file_name' is missing or not a string ({fn!r})",
                           "set file_name to the image's path relative to images/")
        where = f"images[{i}] (id {iid}, file_name {fn!r})"
        rel = _safe_rel(fn)
        if rel is None:
            raise ctx.fail(where, "file_name must be a relative path inside images/ (no leading "
                           "'/', no '..')", "write the path relative to DATASET/images/")
        if str(rel) in files:
            raise ctx.fail(where, f"same file as images[{files[str(rel)]}]",
                           "list every image file once")
        stem = rel.stem
        if stem in stems:
            raise ctx.fail(where, f"duplicate stem {stem!r} (also images[{stems[stem]}]); stems "
                           "name masks/<stem>.png, split entries and predictions, so they must "
                           "be unique", "rename one of the files")
        size = []
        for key in ("width", "height"):
            v = e.get(key)
            if v is not None and (not _is_int(v) or v < 1):
                raise ctx.fail(where, f"'{key}' must be a positive integer, got {v!r}",
                               f"set {key} to the image's size in pixels (or leave it out)")
            size.append(v)
        if (size[0] is None) != (size[1] is None):
            raise ctx.fail(where, "give both 'width' and 'height' or neither",
                           "add the missing one (or drop both to read them from the file)")
        tags = e.get("tags")
        if tags is not None:
            if not isinstance(tags, list) or not all(_is_int(t) for t in tags):
                raise ctx.fail(where, f"'tags' must be a list of category ids, got {tags!r}",
                               "list the foreground category ids present in the image")
            for t in tags:
                if t == 0:
                    raise ctx.fail(where, "tags contain 0 (background); tags list foreground "
                                   "classes only", "remove 0 from tags")
                if not 0 < t < C:
                    raise ctx.fail(where, f"tag {t} is not in categories (ids 0..{C - 1})",
                                   "use ids from categories or add the category")
            tags = tuple(sorted(set(tags)))
        ids[iid], files[str(rel)], stems[stem] = i, i, i
        entries.append(dict(index=i, where=where, id=iid, file_name=fn, rel=rel, stem=stem,
                            path=root / "images" / Path(*rel.parts), width=size[0],
                            height=size[1], tags=tags))
    return entries


def _parse_annotations(raw: list, entries: list[dict], C: int, ctx: _Ctx) -> dict[int, list]:
    by_id = {e["id"]: e for e in entries}
    per_image: dict[int, list] = {e["id"]: [] for e in entries}
    for j, a in enumerate(raw):
        where = f"annotations[{j}]"
        if not isinstance(a, dict):
            raise ctx.fail(where, f"is a {type(a).__name__}, expected an object",
                           'write it as {"image_id": 1, "category_id": 1, "point": [x, y]}')
        iid, cid = a.get("image_id"), a.get("category_id")
        if not _is_int(iid):
            raise ctx.fail(where, f"'image_id' is missing or not an integer ({iid!r})",
                           "set image_id to the id of an entry in images")
        where = f"annotations[{j}] (image_id {iid})"
        if iid not in by_id:
            raise ctx.fail(where, f"unknown image_id {iid}: no entry in images has this id",
                           "fix image_id or add the image to images")
        if not _is_int(cid):
            raise ctx.fail(where, f"'category_id' is missing or not an integer ({cid!r})",
                           "set category_id to an id from categories")
        if not 0 <= cid < C:
            raise ctx.fail(where, f"category_id {cid} is not in categories (ids 0..{C - 1})",
                           "use an id from categories or add the category")
        kinds = [k for k in _ANN_KEYS if k in a]
        if len(kinds) != 1:
            raise ctx.fail(where, f"has {kinds or 'none'} of 'bbox', 'point', 'scribble'; "
                           "exactly one is needed", "split it into one annotation per shape")
        kind = kinds[0]
        v = a[kind]
        if kind == "bbox":
            if not (isinstance(v, list) and len(v) == 4 and all(_is_num(t) for t in v)):
                raise ctx.fail(where, f"'bbox' must be [x, y, w, h] (4 finite numbers), got {v!r}",
                               "write the box as [x, y, width, height] in pixels")
            if cid == 0:
                raise ctx.fail(where, "a bbox uses category 0 (background); boxes mark "
                               "foreground objects only", "use a foreground category_id")
            shape = [float(t) for t in v]
        elif kind == "point":
            if not (isinstance(v, list) and len(v) == 2 and all(_is_num(t) for t in v)):
                raise ctx.fail(where, f"'point' must be [x, y] (2 finite numbers), got {v!r}",
                               "write the point as [column, row] in pixels")
            shape = [float(t) for t in v]
        else:
            if not (isinstance(v, list) and all(isinstance(p, list) and len(p) == 2
                                                and all(_is_num(t) for t in p) for p in v)):
                raise ctx.fail(where, "'scribble' must be a list of [x, y] pairs of finite numbers",
                               "write the scribble as [[x, y], [x, y], ...]")
            if len(v) < 2:
                raise ctx.fail(where, f"scribble has {len(v)} point(s); at least 2 are needed",
                               "add vertices, or use a 'point' annotation for a single pixel")
            shape = np.asarray(v, dtype=np.float64).reshape(-1, 2)
        per_image[iid].append((j, where, kind, cid, shape))
    return per_image


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
