"""Weak annotations derived from full label maps (the paper's protocol).

Given a full semantic label map (height x width, uint8 class ids, 0 = background,
255 = ignore), this module derives the four weak annotation kinds of the dataset contract:

* **tags**: the foreground classes present in the map (background and 255 never are tags);
* **boxes**: one tight box ``[x, y, w, h]`` per instance (pixels ``x <= px < x + w``);
* **points**: one central interior point per instance (the pixel deepest inside it, i.e. the
  maximum of its distance transform, ties broken towards its centroid), as the paper takes part
  centres, plus ``n_background`` points spread over the interior of the background;
* **scribbles**: one stroke per instance through its interior (at least 0.4 times the maximal
  inscribed radius from its border, along the region's longest straight or geodesic axis, so
  that bent and ring-shaped instances are followed, not cut across), plus ``n_background``
  strokes through the background. Every vertex lies on a pixel of the stroke's instance and
  every segment between two vertices stays on such pixels (sampled at quarter-pixel steps).

Instances are either given (the synthetic scenes know their true instance maps) or, for a user's
semantic masks, taken as connected components of each class (:func:`instances_from_semantic`);
two touching objects of one class are then one instance, which is the best a semantic map allows.

All functions are pure functions of arrays returning plain annotation dicts of the dataset
contract (``{"category_id": c, "bbox"|"point"|"scribble": ...}``); the caller adds ``image_id``.
:func:`weaken_dataset` applies them to a dataset folder (``spml-deploy data weaken``).
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from spml_deploy.data.dataset import load_dataset
from spml_deploy.data.imageio import atomic_write_text
from spml_deploy.data.kinds import SUPERVISION_KINDS, WEAK_KINDS
from spml_deploy.data.strokes import (_bbox, _central_point, _pad1, _stroke, central_point, spread_points,
                                      stroke)
from spml_deploy.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

KINDS = WEAK_KINDS
# annotations.json key of each derived kind held in annotation entries (tags live on the image)
KIND_KEY = {k.name: k.json_key for k in SUPERVISION_KINDS if k.derivable and k.json_key}
IGNORE = 255

Instance = tuple[int, np.ndarray]   # (class id, boolean mask of the image's height x width)


# --------------------------------------------------------------------------------------------
# pure derivations


def instances_from_semantic(mask: np.ndarray, min_area: int = 16, connectivity: int = 8,
                            include_background: bool = False) -> list[Instance]:
    """Split a semantic label map into instances: the connected components of each class.

    ``mask`` is height x width uint8 class ids; 255 (ignore) is skipped, and so is class 0
    unless ``include_background``. Components smaller than ``min_area`` pixels are dropped.
    Returns ``(class_id, boolean mask height x width)`` pairs ordered by class, then by the
    raster position of the component.
    """
    mask = _as_label_map(mask)
    out: list[Instance] = []
    for c in _present(mask):
        if c == IGNORE or (c == 0 and not include_background):
            continue
        n, lab, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8),
                                                            connectivity=connectivity)
        for j in range(1, n):
            if stats[j, cv2.CC_STAT_AREA] >= min_area:
                out.append((c, lab == j))
    return out


def derive_tags(mask: np.ndarray) -> list[int]:
    """Image tags: the sorted foreground class ids present in ``mask`` (no 0, no 255)."""
    return [c for c in _present(_as_label_map(mask)) if c not in (0, IGNORE)]


def derive_boxes(instances: Iterable[Instance]) -> list[dict[str, Any]]:
    """One tight ``[x, y, w, h]`` box per non-empty foreground instance (background never)."""
    out = []
    for cls, m in instances:
        if cls == 0:
            continue
        bb = _bbox(m)
        if bb is None:
            continue
        y0, y1, x0, x1 = bb
        out.append({"category_id": int(cls), "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return out


def derive_points(instances: Iterable[Instance], mask: np.ndarray, rng: np.random.Generator,
                  n_background: int = 2) -> list[dict[str, Any]]:
    """One central interior point ``[x, y]`` per instance plus background points.

    The instance point is the pixel farthest from the instance border (image borders count as
    border), ties broken towards the instance centroid; deterministic. Background points (class
    0, pixels where ``mask == 0``) are spread by farthest-point sampling over the background's
    interior (distance to its border at least half the maximum); the first one is random.
    """
    out = []
    for cls, m in instances:
        p = central_point(m)
        if p is not None:
            out.append({"category_id": int(cls), "point": p})
    return out + _background_points(mask, rng, n_background)


def derive_scribbles(instances: Iterable[Instance], mask: np.ndarray, rng: np.random.Generator,
                     n_background: int = 2) -> list[dict[str, Any]]:
    """One stroke (polyline ``[[x, y], ...]``, >= 2 vertices) per instance plus background strokes.

    Each stroke runs through the interior of its region (see the module docstring). Background
    strokes (class 0) are drawn one after the other, each in the background minus a band around
    the previous ones, so they cover different parts of it. Instances too small or thin to hold
    a stroke of two distinct pixels get none.
    """
    out = []
    for cls, m in instances:
        s = stroke(m, rng)
        if s is not None:
            out.append({"category_id": int(cls), "scribble": s})
    return out + _background_strokes(mask, rng, n_background)


def annotate_instance_map(ids: np.ndarray, classes: Sequence[int], mask: np.ndarray,
                          rng: np.random.Generator, min_area: int = 16,
                          n_background: int = 2) -> list[dict[str, Any]]:
    """Boxes, points and scribbles from an instance id map, without full-size instance masks.

    ``ids`` is height x width int (0 = no instance, k = instance k of class ``classes[k - 1]``),
    ``mask`` the semantic label map. Gives exactly what :func:`derive_boxes`,
    :func:`derive_points` and :func:`derive_scribbles` give (in that order, same ``rng`` use)
    for the instances' boolean masks, with points and scribbles only for instances of at least
    ``min_area`` pixels; faster because each instance is handled on its bounding box once.
    """
    from scipy.ndimage import find_objects

    crops = []
    for k, sl in enumerate(find_objects(ids, max_label=len(classes)), 1):
        if sl is None:
            continue
        crop = _pad1(ids[sl] == k)
        crops.append((int(classes[k - 1]), crop, sl[0].start - 1, sl[1].start - 1,
                      cv2.countNonZero(crop)))
    out: list[dict[str, Any]] = []
    for cls, crop, oy, ox, _ in crops:
        if cls != 0:
            h, w = crop.shape
            out.append({"category_id": cls, "bbox": [ox + 1, oy + 1, w - 2, h - 2]})
    big = [c for c in crops if c[4] >= min_area]
    out += [{"category_id": cls, "point": _central_point(crop, oy, ox)}
            for cls, crop, oy, ox, _ in big]
    out += _background_points(mask, rng, n_background)
    for cls, crop, oy, ox, _ in big:
        s = _stroke(crop, oy, ox, rng)
        if s is not None:
            out.append({"category_id": cls, "scribble": s})
    return out + _background_strokes(mask, rng, n_background)


def _background_points(mask: np.ndarray, rng: np.random.Generator,
                       n: int) -> list[dict[str, Any]]:
    if n <= 0:
        return []
    bg = _as_label_map(mask) == 0
    return [{"category_id": 0, "point": p} for p in spread_points(bg, n, rng)]


def _background_strokes(mask: np.ndarray, rng: np.random.Generator,
                        n: int) -> list[dict[str, Any]]:
    """Up to ``n`` strokes through the background, each away from the previous ones."""
    out: list[dict[str, Any]] = []
    if n <= 0:
        return out
    region = _as_label_map(mask) == 0
    band = max(2, round(min(region.shape) / 8))
    for _ in range(n):
        s = stroke(region, rng)
        if s is None:
            break
        out.append({"category_id": 0, "scribble": s})
        drawn = np.zeros(region.shape, np.uint8)
        cv2.polylines(drawn, [np.asarray(s, np.int32)], False, 1, thickness=2 * band + 1)
        region = region & (drawn == 0)
    return out


# --------------------------------------------------------------------------------------------
# internals


def _as_label_map(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a label map must be height x width, got shape {mask.shape}")
    return mask


def _present(mask: np.ndarray) -> list[int]:
    """Sorted values present in a label map (a histogram: faster than np.unique on uint8)."""
    if mask.dtype == np.uint8:
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist()
    return [int(v) for v in np.unique(mask)]


# --------------------------------------------------------------------------------------------
# dataset folders


def derive_annotations(mask: np.ndarray, kinds: Sequence[str], rng: np.random.Generator,
                       instances: list[Instance] | None = None, min_area: int = 16,
                       n_background: int = 2) -> tuple[list[int] | None, list[dict[str, Any]]]:
    """All requested kinds for one label map: ``(tags or None, annotation dicts)``.

    ``instances`` defaults to :func:`instances_from_semantic` of ``mask`` (``min_area``).
    Points and scribbles draw from ``rng`` in a fixed order, so a seed gives the same output.
    """
    if instances is None:
        instances = instances_from_semantic(mask, min_area=min_area)
    tags = derive_tags(mask) if "tags" in kinds else None
    anns: list[dict[str, Any]] = []
    if "boxes" in kinds:
        anns += derive_boxes(instances)
    if "points" in kinds:
        anns += derive_points(instances, mask, rng, n_background=n_background)
    if "scribbles" in kinds:
        anns += derive_scribbles(instances, mask, rng, n_background=n_background)
    return tags, anns


def weaken_dataset(root: str | Path, kinds: Sequence[str], seed: int = 0, replace: bool = False,
                   min_area: int = 16, n_background: int = 2) -> str:
    """Derive weak annotations of a dataset folder from its full masks (``masks/<stem>.png``).

    The dataset is first loaded and validated with :func:`spml_deploy.data.dataset.load_dataset` (the
    loader every command uses). For every image that has a mask, the requested ``kinds`` are
    derived (see the module docstring) and merged into ``annotations.json``. Without
    ``replace``, refuses when an image with a mask already has annotations of a requested kind;
    with it, those are dropped first. Images without a mask are left as they are. The file is
    rewritten atomically; the previous version is kept as ``annotations.json.bak``. Each
    image's random choices come from ``(seed, image id)``. Returns a short report.
    """

    kinds = _check_kinds(kinds)
    ds = load_dataset(root, check_files=True)
    ann_path = ds.root / "annotations.json"
    doc = json.loads(ann_path.read_text(encoding="utf-8"))     # valid: the loader read it
    doc.setdefault("annotations", [])
    todo = [rec for rec in ds.images if rec.mask_path is not None]
    if not todo:
        raise DatasetError("no image has a full mask to derive annotations from",
                           path=ds.root / "masks",
                           fix="put label maps as masks/<image stem>.png (uint8 class ids, "
                               "255 = ignore) next to annotations.json")
    ids = {rec.id for rec in todo}

    existing = _existing_counts(doc, ids, kinds)
    if not replace:
        for kind, n in existing.items():
            if n:
                raise DatasetError(
                    f"{n} image(s) with masks already have {kind} annotations", path=ann_path,
                    fix=f"pass --replace to drop and re-derive them, or leave out --kind {kind}")
    drop = {KIND_KEY[k] for k in kinds if k in KIND_KEY}
    anns = [a for a in doc["annotations"] if not (a["image_id"] in ids and drop & a.keys())]
    entry = {im["id"]: im for im in doc["images"]}
    annotated: dict[int, set[int]] = {}
    for a in anns:
        annotated.setdefault(a["image_id"], set()).add(a["category_id"])

    added = dict.fromkeys(kinds, 0)
    for rec in todo:
        mask = ds.load_mask(rec)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(rec.id)]))
        tags, new = derive_annotations(mask, kinds, rng, min_area=min_area,
                                       n_background=n_background)
        if tags is not None:
            _check_tags_cover(tags, rec.id, annotated.get(rec.id, set()), ann_path,
                              rec.mask_path)
            entry[rec.id]["tags"] = tags
            added["tags"] += 1
        elif "tags" in entry[rec.id]:
            missing = sorted({a["category_id"] for a in new} - {0} - set(entry[rec.id]["tags"]))
            if missing:
                raise DatasetError(
                    f"image id {rec.id} has tags {entry[rec.id]['tags']} but its mask "
                    f"({rec.mask_path}) holds classes {missing} too, so the derived annotations "
                    "would contradict its tags", path=ann_path,
                    fix="derive the tags as well (--kind tags --replace) or fix the mask")
        for a in new:
            anns.append({"image_id": rec.id, **a})
            for k in kinds:
                if k in KIND_KEY and KIND_KEY[k] in a:
                    added[k] += 1
    doc["annotations"] = anns

    backup = ann_path.with_name("annotations.json.bak")
    shutil.copy2(ann_path, backup)
    atomic_write_text(ann_path, format_annotations(doc))
    try:
        load_dataset(ds.root, check_files=False)    # the result must pass the loader too
    except DatasetError:
        shutil.copy2(backup, ann_path)              # put the previous version back
        raise
    lines = [f"derived {', '.join(kinds)} from masks for {len(todo)} of {len(ds.images)} "
             f"image(s) in {ds.root}"]
    for k in kinds:
        what = "images tagged" if k == "tags" else f"{k} added"
        rep = f" (replaced those of {existing[k]} image(s))" if existing[k] else ""
        lines.append(f"  {k}: {added[k]} {what}{rep}")
    if len(todo) < len(ds.images):
        lines.append(f"  {len(ds.images) - len(todo)} image(s) without a mask left unchanged")
    lines.append(f"wrote {ann_path} (previous version kept as annotations.json.bak)")
    return "\n".join(lines)


def _check_kinds(kinds: Sequence[str]) -> list[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    out: list[str] = []
    for k in kinds:
        if k not in KINDS:
            raise ConfigError(f"unknown annotation kind {k!r}",
                              fix=f"use one of: {', '.join(KINDS)}")
        if k not in out:
            out.append(k)
    if not out:
        raise ConfigError("no annotation kind requested", fix=f"pass --kind ({'|'.join(KINDS)})")
    return out


def _existing_counts(doc: dict[str, Any], ids: set[int], kinds: Sequence[str]) -> dict[str, int]:
    """Per kind: how many of the images ``ids`` already hold annotations of it."""
    out = {}
    for k in kinds:
        if k == "tags":
            have = {im["id"] for im in doc["images"] if "tags" in im}
        else:
            have = {a["image_id"] for a in doc["annotations"] if KIND_KEY[k] in a}
        out[k] = len(have & ids)
    return out


def _check_tags_cover(tags: list[int], image_id: int, annotated: set[int], ann_path: Path,
                      mask_path: Path | None) -> None:
    """Tags from the mask must include every foreground class annotated on the image."""
    missing = sorted(annotated - {0} - set(tags))
    if missing:
        raise DatasetError(
            f"image id {image_id} has annotations of classes {missing} that its mask "
            f"({mask_path}) does not contain, so tags from the mask would contradict them",
            path=ann_path, fix="fix the mask or those annotations (or derive their kinds "
                               "from the mask too, with --replace)")


def format_annotations(doc: dict[str, Any]) -> str:
    """``annotations.json`` text: the top-level lists with one entry per line (diff friendly)."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            body = "[\n" + ",\n".join("  " + json.dumps(x) for x in value) + "\n]"
        else:
            body = json.dumps(value)
        parts.append(f"{json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"
