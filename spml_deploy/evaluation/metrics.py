"""Segmentation scores: confusion matrix, IoU per class, mIoU, pixel and class accuracy.

Conventions
-----------
* Ground-truth pixels equal to ``ignore`` (255) are not scored. Every other ground-truth value
  must be a class id ``0..C-1``; so must the prediction at every scored pixel (anything else is
  an error, not silently a wrong class).
* Confusion matrix: rows = ground truth, columns = prediction, pixel counts.
* A *missed* pixel is a scored ground-truth pixel with no prediction at all (its image's
  prediction file is absent and ``allow_missing`` was given). It counts as wrong: it adds to its
  ground-truth class's pixels (lowering that class's IoU and accuracy, and pixel accuracy) and to
  no class's predicted pixels - exactly as if it were predicted as a class that does not exist.
* ``IoU_c = TP_c / (GT_c + PRED_c - TP_c)``, with ``GT_c`` including missed pixels. A class that
  appears in neither ground truth nor prediction has IoU ``nan`` and is left out of the mean
  (mIoU = mean over the other classes). A class predicted but absent from the ground truth has
  IoU 0 and counts.
* Class accuracy ``TP_c / GT_c`` (``nan`` when ``GT_c = 0``, left out of the mean); pixel
  accuracy ``sum TP / sum GT``. Scores are fractions in [0, 1]; tables show percentages.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from spml_deploy.data.dataset import Dataset, ImageRecord, load_dataset
from spml_deploy.errors import DatasetError, SpmlError
from spml_deploy.data.imageio import read_label_png

log = logging.getLogger(__name__)

__all__ = ["confusion_matrix", "ConfusionMeter", "SegmentationScores", "evaluate_folder",
           "find_prediction"]

_MAX_PRINTED_CLASSES = 30


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore: int | None = 255) -> np.ndarray:
    """C x C int64 pixel counts, rows = ground-truth class, columns = predicted class.

    ``pred`` and ``gt`` are integer arrays of the same shape (any number of dimensions). Pixels
    where ``gt == ignore`` are skipped. Raises ``ValueError`` for different shapes, a ground-truth
    value outside ``0..C-1`` (other than ``ignore``) or a prediction outside ``0..C-1`` at a
    scored pixel.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    C = int(num_classes)
    g = gt.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    if ignore is not None:
        keep = g != ignore
        g, p = g[keep], p[keep]
    bad_g = (g < 0) | (g >= C)
    if bad_g.any():
        raise ValueError(f"ground truth holds values {np.unique(g[bad_g])[:10].tolist()} outside "
                         f"0..{C - 1} (ignore = {ignore})")
    bad_p = (p < 0) | (p >= C)
    if bad_p.any():
        raise ValueError(f"prediction holds values {np.unique(p[bad_p])[:10].tolist()} outside "
                         f"0..{C - 1} at scored pixels")
    return np.bincount(g * C + p, minlength=C * C).reshape(C, C).astype(np.int64)


@dataclass
class ConfusionMeter:
    """Accumulates a confusion matrix (and missed pixels) over images."""

    num_classes: int
    ignore: int | None = 255
    confusion: np.ndarray = field(init=False)
    missed: np.ndarray = field(init=False)
    num_images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.missed = np.zeros(self.num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image (or a batch): same-shape integer arrays, see :func:`confusion_matrix`."""
        self.confusion += confusion_matrix(pred, gt, self.num_classes, self.ignore)
        self.num_images += 1

    def update_missing(self, gt: np.ndarray) -> None:
        """Add an image that has no prediction: its scored pixels count as missed (wrong)."""
        g = np.asarray(gt).reshape(-1).astype(np.int64)
        if self.ignore is not None:
            g = g[g != self.ignore]
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            raise ValueError(f"ground truth holds values outside 0..{self.num_classes - 1}")
        self.missed += np.bincount(g, minlength=self.num_classes).astype(np.int64)
        self.num_images += 1

    def scores(self, class_names: list[str] | None = None, **info: Any) -> SegmentationScores:
        """Scores of everything accumulated so far (``info`` fills SegmentationScores fields)."""
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        return SegmentationScores.from_confusion(self.confusion, names, missed=self.missed,
                                                 num_images=self.num_images, **info)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


@dataclass
class SegmentationScores:
    """Scores from a confusion matrix; every ratio is a fraction in [0, 1] (nan = undefined)."""

    class_names: list[str]
    confusion: np.ndarray          # C x C int64, rows = ground truth, columns = prediction
    missed: np.ndarray             # C int64: scored ground-truth pixels with no prediction
    iou: np.ndarray                # C float64, nan for classes in neither gt nor prediction
    class_acc: np.ndarray          # C float64, nan for classes absent from the ground truth
    miou: float
    pixel_acc: float
    mean_acc: float
    num_images: int = 0
    split: str | None = None
    missing: list[str] = field(default_factory=list)   # stems without a prediction

    @classmethod
    def from_confusion(cls, confusion: np.ndarray, class_names: list[str],
                       missed: np.ndarray | None = None, **info: Any) -> SegmentationScores:
        conf = np.asarray(confusion, dtype=np.int64)
        C = conf.shape[0]
        missed = np.zeros(C, np.int64) if missed is None else np.asarray(missed, np.int64)
        tp = np.diag(conf).astype(np.float64)
        gt_total = conf.sum(1) + missed
        pred_total = conf.sum(0)
        union = (gt_total + pred_total).astype(np.float64) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            class_acc = np.where(gt_total > 0, tp / gt_total, np.nan)
        total = gt_total.sum()
        return cls(class_names=list(class_names), confusion=conf, missed=missed, iou=iou,
                   class_acc=class_acc, miou=_nanmean(iou),
                   pixel_acc=float(tp.sum() / total) if total else float("nan"),
                   mean_acc=_nanmean(class_acc), **info)

    @property
    def num_pixels(self) -> int:
        """Scored ground-truth pixels (ignore excluded), missed ones included."""
        return int(self.confusion.sum() + self.missed.sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nan -> None)."""
        def num(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        gt_total = self.confusion.sum(1) + self.missed
        return {
            "split": self.split,
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "missing_predictions": list(self.missing),
            "miou": num(self.miou),
            "pixel_acc": num(self.pixel_acc),
            "mean_class_acc": num(self.mean_acc),
            "per_class": [
                {"id": c, "name": self.class_names[c], "iou": num(self.iou[c]),
                 "acc": num(self.class_acc[c]), "gt_pixels": int(gt_total[c]),
                 "pred_pixels": int(self.confusion[:, c].sum()),
                 "missed_pixels": int(self.missed[c])}
                for c in range(len(self.class_names))],
            "confusion": self.confusion.tolist(),
            "confusion_axes": "rows = ground truth, columns = prediction",
            "scale": "fractions in [0, 1]; null = undefined (class absent)",
        }

    def format_table(self, class_names: list[str] | None = None) -> str:
        """Aligned text table (percentages, 2 decimals) with the confusion matrix below it."""
        names = list(class_names) if class_names else self.class_names
        C = len(names)
        pct = lambda v: "n/a" if np.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
        gt_total = self.confusion.sum(1) + self.missed
        pred_total = self.confusion.sum(0)
        head = (f"{self.num_images} images, {self.num_pixels:,} scored pixels "
                "(ground truth 255 ignored)")
        lines = [(f"split {self.split!r}: " if self.split else "") + head]
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
            lines.append(f"{len(self.missing)} prediction(s) missing, counted as wrong: {shown}")
        nw = max(5, max(len(n) for n in names))
        idw = max(2, len(str(C - 1)))
        lines.append(f"{'id':>{idw}}  {'class':<{nw}}  {'IoU':>7}  {'Acc':>7}  {'GT px':>12}  "
                     f"{'pred px':>12}")
        for c in range(C):
            lines.append(f"{c:>{idw}}  {names[c]:<{nw}}  {pct(self.iou[c]):>7}  "
                         f"{pct(self.class_acc[c]):>7}  {int(gt_total[c]):>12,}  "
                         f"{int(pred_total[c]):>12,}")
        lines.append(f"mIoU {pct(self.miou)}   pixel acc {pct(self.pixel_acc)}   "
                     f"mean class acc {pct(self.mean_acc)}   (percent)")
        if np.isnan(self.iou).any():
            lines.append("n/a: class in neither ground truth nor prediction, left out of the mean")
        if C > _MAX_PRINTED_CLASSES:
            lines.append(f"confusion matrix: {C} x {C}, see the JSON output")
            return "\n".join(lines)
        cols = [str(c) for c in range(C)] + (["none"] if self.missed.any() else [])
        cells = np.concatenate([self.confusion, self.missed[:, None]], 1) if self.missed.any() \
            else self.confusion
        cw = max(max(len(s) for s in cols), len(f"{int(cells.max()):,}") if cells.size else 1)
        lines.append("")
        lines.append("confusion matrix (pixels; rows = ground truth, columns = predicted id"
                     + ("; none = no prediction" if self.missed.any() else "") + ")")
        rw = idw + 2 + nw
        lines.append(" " * rw + "  " + "  ".join(f"{s:>{cw}}" for s in cols))
        for c in range(C):
            lines.append(f"{c:>{idw}}  {names[c]:<{nw}}  "
                         + "  ".join(f"{int(v):>{cw},}" for v in cells[c]))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# folders


def find_prediction(pred_dir: Path, record: ImageRecord) -> Path | None:
    """``<pred_dir>/<file_name without extension>.png`` or ``<pred_dir>/<stem>.png``, if present."""
    rel = PurePosixPath(record.file_name.replace("\\", "/")).with_suffix(".png")
    for cand in (pred_dir / Path(*rel.parts), pred_dir / f"{record.stem}.png"):
        if cand.is_file():
            return cand
    return None


def evaluate_folder(pred_dir: str | Path, dataset: str | Path | Dataset, split: str = "val",
                    allow_missing: bool = False) -> SegmentationScores:
    """Score the label maps in ``pred_dir`` against the masks of ``split`` of ``dataset``.

    A prediction is a single-channel PNG of class ids named ``<stem>.png`` (or mirroring the
    image's subfolders, ``<file_name without extension>.png``) at the image's size (after EXIF
    orientation). Split ``all`` scores every image that has a mask; a named split must have a
    mask for every image. Missing predictions are an error listing them, unless
    ``allow_missing``: then their pixels count as wrong (see the module docstring).
    """
    pred_dir = Path(pred_dir)
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, check_files=False)
    if not pred_dir.is_dir():
        raise SpmlError("prediction folder not found", path=pred_dir,
                        fix="pass the folder holding <stem>.png label maps")
    records = ds.split(split)
    if split == "all":
        records = [r for r in records if r.mask_path is not None]
        if not records:
            raise DatasetError("no image has a mask (masks/<stem>.png); nothing to score",
                               path=ds.root / "masks", fix="add ground-truth masks")
    else:
        no_mask = [r.stem for r in records if r.mask_path is None]
        if no_mask:
            raise DatasetError(
                f"{len(no_mask)} image(s) of split {split!r} have no mask: "
                + ", ".join(no_mask[:5]) + (" ..." if len(no_mask) > 5 else ""),
                path=ds.root / "masks", fix="add masks/<stem>.png for them, or evaluate split "
                "'all' (every image with a mask)")
    if not records:
        raise DatasetError(f"split {split!r} is empty", path=ds.root / "splits",
                           fix="list image stems in the split file")
    found = {r.stem: find_prediction(pred_dir, r) for r in records}
    missing = [s for s, p in found.items() if p is None]
    if missing and not allow_missing:
        raise SpmlError(
            f"{len(missing)} of {len(records)} prediction(s) missing, e.g. "
            + ", ".join(f"{s}.png" for s in missing[:5]), path=pred_dir,
            fix="write <stem>.png for every image of the split, or pass --allow-missing to count "
                "them as wrong")
    meter = ConfusionMeter(ds.num_classes)
    for rec in records:
        gt = ds.load_mask(rec)
        assert gt is not None
        path = found[rec.stem]
        if path is None:
            meter.update_missing(gt)
            continue
        pred = read_label_png(path)
        if pred.shape != gt.shape:
            raise SpmlError(
                f"prediction is {pred.shape[1]}x{pred.shape[0]} (width x height) but the mask of "
                f"{rec.file_name!r} is {gt.shape[1]}x{gt.shape[0]}", path=path,
                fix="write predictions at the image's original size (after EXIF orientation)")
        scored = gt != 255
        bad = scored & (pred >= ds.num_classes)
        if bad.any():
            raise SpmlError(
                f"prediction holds values {np.unique(pred[bad])[:10].tolist()} that are not class "
                f"ids (0..{ds.num_classes - 1}) at {int(bad.sum())} scored pixel(s)", path=path,
                fix="write class ids of the dataset's categories")
        meter.update(pred, gt)
    if missing:
        log.warning("%d prediction(s) missing, counted as wrong", len(missing))
    return meter.scores(ds.class_names, split=split, missing=missing)
