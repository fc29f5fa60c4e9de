"""The records of a dataset (categories, boxes, points, scribbles, images), its label maps
(masks and sparse maps, read and checked on demand) and the validated :class:`Dataset`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spml_deploy.errors import DatasetError, ImageReadError
from spml_deploy.data.imageio import read_label_png

KINDS = ("tags", "boxes", "points", "scribbles", "sparse", "masks")
COORD_TOL = 1e-3
IGNORE = 255


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
