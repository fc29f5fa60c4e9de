"""Weak annotations -> pixel label maps ``Y`` (spec section 1 and 1.1).

Label codes of every map built here (uint8, image size):

* ``0 .. C-1`` labelled pixel (0 = background);
* ``UNL`` (default ``C``, any value in ``C .. 254``) unlabelled pixel that still takes part in
  clustering and in the label-free relationships (spec pitfall 1: never 255);
* ``VOID = 255`` pixel removed from everything (only the ignore pixels of full masks here; the
  training crops add padding VOID later).

The rules for each kind (and the coordinate convention of the annotations) are in
:mod:`spml_deploy.training.label_rules`; this module picks the rule for an image and a
supervision kind (:func:`weak_label_map`) and gives the tag vector ``t(I)``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from spml_deploy.data.kinds import SUPERVISIONS, kind as supervision_kind, kinds_of, preferred
from spml_deploy.errors import TrainingError
from spml_deploy.training.label_rules import (CamSource, _check_class, labels_from_boxes,
                                              labels_from_boxes_nocam, labels_from_sparse,
                                              labels_from_tags, rasterize_points,
                                              rasterize_scribbles, resolve_unl)

__all__ = [
    "record_kinds", "dataset_kinds", "check_supervision", "weak_label_map", "tags_vector",
    "weak_tags",
]


# ----------------------------------------------------------------------------------------------
# dispatch


def record_kinds(record: Any) -> tuple[str, ...]:
    """Supervision kinds one image (an ``ImageRecord``) has, in :data:`SUPERVISIONS` order.

    A sparse PNG counts as both scribbles and points (it is accepted for either); an image whose
    tags were given (even empty: background only) or derived has tags.
    """
    return kinds_of(record.annotation_kinds())


def dataset_kinds(records: Iterable[Any]) -> tuple[str, ...]:
    """Annotation kinds present in any image of ``records``, in :data:`SUPERVISIONS` order."""
    found: set[str] = set()
    for r in records:
        found.update(record_kinds(r))
    return tuple(k for k in SUPERVISIONS if k in found)


def check_supervision(records: Sequence[Any], kind: str, name: str = "dataset") -> None:
    """Raise :class:`TrainingError` when no image of ``records`` has annotations of ``kind``.

    The message names the kinds the dataset has and the ``--supervision`` choice to use, e.g.
    ``dataset has no scribbles; it has: points, boxes, tags (use --supervision points)``.
    """
    if kind not in SUPERVISIONS:
        raise TrainingError(f"unknown supervision '{kind}'", fix=f"choose one of {', '.join(SUPERVISIONS)}")
    kinds = dataset_kinds(records)
    if kind in kinds:
        return
    if kinds:
        raise TrainingError(f"{name} has no {supervision_kind(kind).phrase}; it has: "
                            f"{', '.join(kinds)} (use --supervision {preferred(kinds)[0]})")
    raise TrainingError(f"{name} has no {supervision_kind(kind).phrase} and no other "
                        "annotations either",
                        fix="add annotations.json entries (points, scribbles, boxes, tags) or masks/")


def weak_label_map(record: Any, kind: str, num_classes: int, cfg: Any = None,
                   cams: CamSource | None = None, *, unl: int | None = None, strict: bool = True,
                   allow_nocam: bool = False) -> np.ndarray:
    """The weak label map ``Y`` of one image for one supervision kind (uint8, image size).

    * ``full``: the mask itself (its 255 stays VOID).
    * ``scribbles`` / ``points``: the record's scribbles / points rasterised; when it has none
      but has a sparse PNG, the PNG (255 -> ``UNL``).
    * ``boxes``: :func:`labels_from_boxes` with ``cams`` (or :func:`labels_from_boxes_nocam`
      when ``cams`` is None and ``allow_nocam``; a deviation for tests / quick runs).
    * ``tags``: :func:`labels_from_tags` with ``cams`` ([C-1, H, W]).

    Args:
        record: a ``spml_deploy.data.dataset.ImageRecord``.
        kind: one of ``full, scribbles, points, boxes, tags``.
        num_classes: ``C``.
        cfg: a ``TrainConfig`` (scribble_width, point_dilation, cam_alpha, cam_threshold,
            box_threshold); None uses the defaults.
        cams: CAM source for boxes/tags (see :data:`CamSource`; tags need an array).
        strict: if the image lacks the kind, raise (naming the kinds it has); if False, return the
            label map of an image annotated with nothing of that kind (all ``UNL`` for scribbles /
            points, all background for boxes / tags). Full masks are always required. An image
            whose given tags are empty (background only) counts as having (zero) boxes. A trainer
            should call :func:`check_supervision` on the whole split once and then use
            ``strict=False``: a single image without annotations is not an error.
    """
    from spml_deploy.config import TrainConfig

    cfg = cfg if cfg is not None else TrainConfig()
    unl = resolve_unl(num_classes, unl)
    h, w = int(record.height), int(record.width)
    name = getattr(record, "file_name", None) or str(getattr(record, "id", "?"))
    if kind not in SUPERVISIONS:
        raise TrainingError(f"unknown supervision '{kind}'", fix=f"choose one of {', '.join(SUPERVISIONS)}")
    kinds = record_kinds(record)
    # an image explicitly tagged as background only (given, empty tags) is box-annotated too
    empty_ok = (kind == "boxes" and getattr(record, "tags_source", "none") == "given"
                and not tuple(getattr(record, "tags", ()) or ()))
    if kind not in kinds and not empty_ok and (strict or kind == "full"):
        have = ", ".join(kinds) if kinds else "nothing"
        raise TrainingError(f"image '{name}' has no {supervision_kind(kind).phrase}; it has: "
                            f"{have}",
                            fix="choose a --supervision kind the dataset has (spml-deploy data check)")
    if kind == "full":
        from spml_deploy.data.dataset import load_mask

        mask = np.asarray(load_mask(record, num_classes))   # checks size and class ids
        return mask.astype(np.uint8, copy=True)
    if kind in ("scribbles", "points"):
        items = list(getattr(record, kind, ()) or ())
        if not items and getattr(record, "sparse_path", None) is not None:
            from spml_deploy.data.dataset import load_sparse

            return labels_from_sparse(load_sparse(record, num_classes), num_classes, unl,
                                      path=str(record.sparse_path))
        if kind == "scribbles":
            return rasterize_scribbles(items, h, w, num_classes, cfg.scribble_width, unl)
        return rasterize_points(items, h, w, num_classes, cfg.point_dilation, unl)
    if kind == "boxes":
        boxes = list(getattr(record, "boxes", ()) or ())
        if not boxes:
            return np.zeros((h, w), dtype=np.uint8)
        if cams is None:
            if not allow_nocam:
                raise TrainingError(f"box supervision of image '{name}' needs CAMs",
                                    fix="train the CAM classifier first (training.cam.train_cam)")
            return labels_from_boxes_nocam(boxes, h, w, num_classes, unl=unl)
        return labels_from_boxes(boxes, cams, h, w, num_classes, cfg.box_threshold, unl)
    # tags
    tags = tuple(getattr(record, "tags", ()) or ())
    if not tags:
        return np.zeros((h, w), dtype=np.uint8)
    if cams is None:
        raise TrainingError(f"tag supervision of image '{name}' needs CAMs",
                            fix="train the CAM classifier first (training.cam.train_cam)")
    arr = np.asarray(cams)
    if arr.ndim != 3 or arr.shape[1:] != (h, w):
        raise TrainingError(f"tag CAMs of image '{name}' have shape {arr.shape}, expected "
                            f"[C-1, {h}, {w}]", fix="upsample CAMs to the image size")
    return labels_from_tags(arr, tags, num_classes, cfg.cam_alpha, cfg.cam_threshold, unl)


# ----------------------------------------------------------------------------------------------
# tags t(I)


def tags_vector(source: Any, num_classes: int) -> np.ndarray:
    """Multi-hot tag vector ``t(I)`` of length C (float32); column 0 (background) is always 0.

    Args:
        source: a label map (H x W integer array; the **un-augmented** one, spec pitfall 9) whose
            values ``1 .. C-1`` count as present (``UNL`` and VOID ignored), or an image record
            (its ``tags``), or a sequence of foreground class ids.
    """
    t = np.zeros(num_classes, dtype=np.float32)
    if isinstance(source, np.ndarray) and source.ndim == 2:
        vals = np.unique(source)
        vals = vals[(vals >= 1) & (vals < num_classes)]
        t[vals.astype(np.int64)] = 1.0
        return t
    ids = getattr(source, "tags", source)
    for c in ids:
        t[_check_class(c, num_classes, "an image tag", allow_background=False)] = 1.0
    return t


def weak_tags(record: Any, kind: str, label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """``t(I)`` for a supervision kind (spec 1, item 4), before any augmentation.

    ``tags``: the image tags; ``boxes``: the classes of its boxes; ``full``, ``scribbles``,
    ``points``: the foreground classes of the label map.
    """
    if kind == "tags":
        return tags_vector(record, num_classes)
    if kind == "boxes":
        return tags_vector([b.category for b in (getattr(record, "boxes", ()) or ())], num_classes)
    return tags_vector(label_map, num_classes)
