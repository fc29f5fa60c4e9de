"""The label rules of spec 1.1: each weak annotation kind turned into a pixel label map
(scribbles and points rasterised, boxes with or without CAMs, tags with CAMs, sparse label PNGs),
in the label codes of :mod:`spml_deploy.training.weak_labels`.

Coordinate convention: annotations are in pixels of the original image. A point or scribble
vertex ``(x, y)`` addresses the pixel in column ``round(x)``, row ``round(y)`` (pixel centres at
integer coordinates; halves round up). A box ``[x, y, w, h]`` (COCO) covers columns
``floor(x) .. ceil(x + w) - 1`` and rows ``floor(y) .. ceil(y + h) - 1`` (clipped to the image), so an
integer box covers exactly ``w`` columns and ``h`` rows.

Everything here is pure numpy / OpenCV; the CAMs used by the box and tag rules come from
:mod:`spml_deploy.training.cam` (or any other source) as arrays.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import cv2
import numpy as np

from spml_deploy.errors import DatasetError, TrainingError

__all__ = [
    "CamSource", "resolve_unl", "rasterize_scribbles", "point_footprint", "rasterize_points",
    "box_extent", "normalize_in_box", "labels_from_boxes", "labels_from_boxes_nocam",
    "labels_from_tags", "labels_from_sparse",
]

# A CAM source for the box rule: foreground CAMs [C-1, H, W] (class c at index c-1), a mapping
# class id -> [H, W] CAM, or a callable class id -> [H, W] CAM. All at image size.
CamSource = Union[np.ndarray, Mapping[int, np.ndarray], Callable[[int], np.ndarray]]


def resolve_unl(num_classes: int, unl: int | None = None) -> int:
    """The code used for unlabelled pixels: ``unl`` if given (must lie in ``C .. 254``), else ``C``."""
    if num_classes < 1 or num_classes > 255:
        raise TrainingError(f"num_classes must lie in 1..255 (uint8 label maps), got {num_classes}")
    if unl is None:
        unl = num_classes
    if not (num_classes <= unl <= 254):
        raise TrainingError(f"unlabelled code {unl} must lie in {num_classes}..254",
                            fix="leave it unset (defaults to the number of classes)")
    return int(unl)


def _check_class(cat: int, num_classes: int, what: str, allow_background: bool = True) -> int:
    cat = int(cat)
    low = 0 if allow_background else 1
    if not (low <= cat < num_classes):
        raise TrainingError(f"{what} has category {cat}, outside {low}..{num_classes - 1}",
                            fix="check annotations.json categories against the model's num_classes")
    return cat


def _round_xy(xy: np.ndarray) -> np.ndarray:
    """Pixel indices of float ``(x, y)`` coordinates: ``floor(v + 0.5)`` (halves round up)."""
    return np.floor(np.asarray(xy, dtype=np.float64) + 0.5).astype(np.int64)


def _fg_last(items: Iterable[Any]) -> list[Any]:
    """Background annotations first, then foreground, each group in annotation order (stable)."""
    items = list(items)
    return [a for a in items if int(a.category) == 0] + [a for a in items if int(a.category) != 0]


# ----------------------------------------------------------------------------------------------
# scribbles and points


def rasterize_scribbles(scribbles: Sequence[Any], height: int, width: int, num_classes: int,
                        width_px: int = 3, unl: int | None = None) -> np.ndarray:
    """Scribble polylines -> label map (spec 1.1): class id on the stroke, ``UNL`` elsewhere.

    Each stroke is drawn as a 1-pixel, 8-connected polyline without anti-aliasing
    (``cv2.polylines``, thickness 1, ``LINE_8``) through its rounded vertices, then dilated by a
    ``width_px x width_px`` square (anchor at the centre; for even widths the extra pixel goes
    to the top/left). A horizontal or vertical stroke of width 3 therefore covers exactly 3 rows
    (columns) and extends 1 pixel past its end points. OpenCV's own ``thickness=3`` is not used:
    it draws 5-pixel-wide lines.

    Overlaps: background strokes (category 0) are drawn first, then foreground strokes, each
    group in annotation order; a later stroke overwrites an earlier one, so foreground wins over
    background and, among foreground strokes, the later annotation wins.

    Args:
        scribbles: objects with ``category`` (int) and ``points`` (array of K x 2 float ``(x, y)``).
        height, width: image size in pixels.
        num_classes: ``C`` (classes including background).
        width_px: stroke width in pixels (spec: 3).
        unl: code of unlabelled pixels (default ``C``).

    Returns:
        uint8 array of shape height x width.
    """
    unl = resolve_unl(num_classes, unl)
    if width_px < 1:
        raise TrainingError(f"scribble width must be >= 1 pixel, got {width_px}")
    out = np.full((height, width), unl, dtype=np.uint8)
    before = (width_px - 1) - (width_px - 1) // 2  # pixels added above/left of the centre line
    after = (width_px - 1) // 2
    kernel = np.ones((width_px, width_px), np.uint8)
    for s in _fg_last(scribbles):
        cat = _check_class(s.category, num_classes, "a scribble")
        pts = _round_xy(np.asarray(s.points, dtype=np.float64).reshape(-1, 2))
        if len(pts) == 0:
            continue
        # draw inside the stroke's bounding box (plus the dilation margin), clipped to the image
        x0 = max(int(pts[:, 0].min()) - before, 0)
        y0 = max(int(pts[:, 1].min()) - before, 0)
        x1 = min(int(pts[:, 0].max()) + after + 1, width)
        y1 = min(int(pts[:, 1].max()) + after + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue  # entirely outside the image
        # local canvas with the margin on every side so the dilation sees clipped strokes too
        ox, oy = int(pts[:, 0].min()) - before, int(pts[:, 1].min()) - before
        cw = int(pts[:, 0].max()) - int(pts[:, 0].min()) + width_px
        ch = int(pts[:, 1].max()) - int(pts[:, 1].min()) + width_px
        canvas = np.zeros((ch, cw), np.uint8)
        local = (pts - np.array([ox, oy])).astype(np.int32)
        if len(local) == 1:
            canvas[local[0, 1], local[0, 0]] = 1
        else:
            cv2.polylines(canvas, [local.reshape(-1, 1, 2)], False, 1, thickness=1,
                          lineType=cv2.LINE_8)
        if width_px > 1:
            canvas = cv2.dilate(canvas, kernel, anchor=(after, after),
                                borderType=cv2.BORDER_CONSTANT, borderValue=0)
        crop = canvas[y0 - oy:y1 - oy, x0 - ox:x1 - ox].astype(bool)
        out[y0:y1, x0:x1][crop] = cat
    return out


def point_footprint(dilation: int = 6) -> np.ndarray:
    """Structuring element of a dilated point: the disk ``dx^2 + dy^2 <= (dilation / 2)^2``.

    The official data name ``dilate_6`` does not say which element was used; we take a disk of
    diameter ``dilation`` around the pixel centre. For ``dilation = 6`` (radius 3) it is 7 pixels
    wide and tall and holds 29 pixels (rows: 1, 5, 5, 7, 5, 5, 1). ``dilation = 0`` gives the
    single pixel.

    Returns:
        bool array of shape (2r+1) x (2r+1), ``r = floor(dilation / 2)``, centred.
    """
    if dilation < 0:
        raise TrainingError(f"point dilation must be >= 0, got {dilation}")
    r = int(dilation // 2)
    d = np.arange(-r, r + 1)
    return (d[:, None] ** 2 + d[None, :] ** 2) * 4 <= dilation * dilation


def rasterize_points(points: Sequence[Any], height: int, width: int, num_classes: int,
                     dilation: int = 6, unl: int | None = None) -> np.ndarray:
    """Annotated points -> label map (spec 1.1): each point dilated by :func:`point_footprint`.

    Overlaps: background points first, then foreground, each in annotation order; later wins.

    Args:
        points: objects with ``category``, ``x``, ``y`` (pixel coordinates).
        height, width: image size. num_classes: ``C``. dilation: footprint diameter (spec: 6).
        unl: code of unlabelled pixels (default ``C``).

    Returns:
        uint8 array height x width: the point class on each footprint, ``UNL`` elsewhere.
    """
    unl = resolve_unl(num_classes, unl)
    out = np.full((height, width), unl, dtype=np.uint8)
    fp = point_footprint(dilation)
    r = fp.shape[0] // 2
    for p in _fg_last(points):
        cat = _check_class(p.category, num_classes, "a point")
        cx, cy = (int(v) for v in _round_xy(np.array([p.x, p.y])))
        y0, y1 = max(cy - r, 0), min(cy + r + 1, height)
        x0, x1 = max(cx - r, 0), min(cx + r + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        sub = fp[y0 - (cy - r):y1 - (cy - r), x0 - (cx - r):x1 - (cx - r)]
        out[y0:y1, x0:x1][sub] = cat
    return out


# ----------------------------------------------------------------------------------------------
# boxes


def box_extent(box: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel extent ``(y0, y1, x0, x1)`` (end exclusive) of a COCO box, clipped to the image."""
    x0 = int(np.floor(box.x))
    y0 = int(np.floor(box.y))
    x1 = int(np.ceil(box.x + box.w))
    y1 = int(np.ceil(box.y + box.h))
    return max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)


def normalize_in_box(cam: np.ndarray, extent: tuple[int, int, int, int]) -> np.ndarray:
    """The CAM inside a box, ReLU'd and divided by its maximum within the box.

    Args:
        cam: one class's CAM at image size (H x W, any real values).
        extent: ``(y0, y1, x0, x1)`` from :func:`box_extent`.

    Returns:
        float32 array (y1-y0) x (x1-x0) in [0, 1]; all zeros where the box's CAM has no positive
        value (no evidence: every pixel of that box becomes ``UNL``).
    """
    y0, y1, x0, x1 = extent
    crop = np.maximum(np.asarray(cam, dtype=np.float32)[y0:y1, x0:x1], 0.0)
    peak = float(crop.max()) if crop.size else 0.0
    return crop / peak if peak > 0 else np.zeros_like(crop)


def _cam_getter(cams: CamSource, num_classes: int, height: int, width: int
                ) -> Callable[[int], np.ndarray]:
    if callable(cams) and not isinstance(cams, np.ndarray):
        get = cams
    elif isinstance(cams, Mapping):
        def get(c: int) -> np.ndarray:
            if c not in cams:
                raise TrainingError(f"no CAM given for box class {c}",
                                    fix="compute CAMs for every class that has a box")
            return cams[c]
    else:
        arr = np.asarray(cams)
        if arr.ndim != 3 or arr.shape[0] != num_classes - 1:
            raise TrainingError(f"box CAMs must have shape [C-1={num_classes - 1}, H, W], "
                                f"got {tuple(arr.shape)}")

        def get(c: int) -> np.ndarray:
            return arr[c - 1]

    def checked(c: int) -> np.ndarray:
        m = np.asarray(get(c))
        if m.shape != (height, width):
            raise TrainingError(f"CAM of class {c} has shape {m.shape}, image is {(height, width)}",
                                fix="upsample CAMs to the image size (cam.compute_cams does)")
        return m

    return checked


def _by_area_desc(boxes: Sequence[Any], height: int, width: int) -> list[tuple[Any, tuple]]:
    ext = [(b, box_extent(b, height, width)) for b in boxes]
    # large -> small so that the smaller box is drawn last and wins; ties keep annotation order
    return sorted(ext, key=lambda be: -(max(be[1][1] - be[1][0], 0) * max(be[1][3] - be[1][2], 0)))


def labels_from_boxes(boxes: Sequence[Any], cams: CamSource, height: int, width: int,
                      num_classes: int, threshold: float = 0.5, unl: int | None = None
                      ) -> np.ndarray:
    """Boxes + CAMs -> label map (spec 1.1, boxes).

    Inside each box the CAM of the box class is normalised to [0, 1] within the box
    (:func:`normalize_in_box`); pixels with score ``>= threshold`` get the box class, the other
    pixels of the box ``UNL``. Pixels outside all boxes are background (0). Overlapping boxes:
    boxes are drawn from the largest area to the smallest, each overwriting the whole box area,
    so in an overlap the smaller box decides (its class or ``UNL``).

    Args:
        boxes: objects with ``category`` (1..C-1), ``x, y, w, h``.
        cams: foreground CAMs ``[C-1, H, W]`` (class c at index c-1), a mapping class -> H x W,
            or a callable class -> H x W; image-normalised or raw (max normalisation within the
            box is scale invariant).
        height, width: image size. num_classes: ``C``. threshold: spec 0.5.

    Returns:
        uint8 array height x width.
    """
    unl = resolve_unl(num_classes, unl)
    get = _cam_getter(cams, num_classes, height, width)
    out = np.zeros((height, width), dtype=np.uint8)
    for b, ext in _by_area_desc(boxes, height, width):
        cat = _check_class(b.category, num_classes, "a box", allow_background=False)
        y0, y1, x0, x1 = ext
        if y0 >= y1 or x0 >= x1:
            continue
        score = normalize_in_box(get(cat), ext)
        out[y0:y1, x0:x1] = np.where(score >= threshold, cat, unl).astype(np.uint8)
    return out


def labels_from_boxes_nocam(boxes: Sequence[Any], height: int, width: int, num_classes: int,
                            core: float = 0.5, unl: int | None = None) -> np.ndarray:
    """Boxes without CAMs -> label map. DEVIATION for tests and quick runs only.

    Inside each box the inscribed ellipse scaled by ``core`` (normalised radius
    ``((x - cx) / (w/2))^2 + ((y - cy) / (h/2))^2 <= core^2``, pixel centres) gets the box class;
    the rest of the box is ``UNL``; outside all boxes background. Overlaps as in
    :func:`labels_from_boxes` (smaller box wins). The spec's rule needs CAMs
    (:func:`labels_from_boxes`); use this only where no CAM can be trained.
    """
    unl = resolve_unl(num_classes, unl)
    out = np.zeros((height, width), dtype=np.uint8)
    for b, ext in _by_area_desc(boxes, height, width):
        cat = _check_class(b.category, num_classes, "a box", allow_background=False)
        y0, y1, x0, x1 = ext
        if y0 >= y1 or x0 >= x1:
            continue
        cx, cy = b.x + b.w / 2.0, b.y + b.h / 2.0
        ys = (np.arange(y0, y1) + 0.5 - cy) / max(b.h / 2.0, 1e-6)
        xs = (np.arange(x0, x1) + 0.5 - cx) / max(b.w / 2.0, 1e-6)
        inside = ys[:, None] ** 2 + xs[None, :] ** 2 <= core * core
        out[y0:y1, x0:x1] = np.where(inside, cat, unl).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# tags


def labels_from_tags(cams: np.ndarray, tags: Iterable[int], num_classes: int, alpha: float = 6.0,
                     threshold: float = 0.2, unl: int | None = None) -> np.ndarray:
    """Image tags + CAMs -> label map (spec 1.1, image tags).

    For every present class c its CAM is ReLU'd and divided by its maximum over the image
    (all zeros if it has no positive value). Background score ``bg = (1 - max_c CAM_c)^alpha``
    over the present classes. ``Y = argmax`` over ``{bg, present classes}`` (ties: background,
    then the smaller class id); a pixel whose winning score is ``< threshold`` becomes ``UNL``.
    With no present class every pixel is background.

    Note: with the spec's ``alpha = 6, threshold = 0.2`` the winning score
    ``max((1 - m)^6, m)`` never drops below about 0.2219, so the threshold marks no pixel as
    ``UNL`` there; it does for other (alpha, threshold) pairs.

    Args:
        cams: ``[C-1, H, W]`` foreground CAMs (class c at index c-1) or ``[C, H, W]`` with
            channel 0 ignored. Raw or already normalised (normalisation is repeated).
        tags: foreground class ids present in the image (1..C-1).
        num_classes: ``C``. alpha, threshold: spec 6 and 0.2.

    Returns:
        uint8 array H x W.
    """
    unl = resolve_unl(num_classes, unl)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] not in (num_classes - 1, num_classes):
        raise TrainingError(f"tag CAMs must have shape [C-1 or C, H, W] with C={num_classes}, "
                            f"got {tuple(cams.shape)}")
    offset = 1 if cams.shape[0] == num_classes - 1 else 0
    present = sorted({_check_class(t, num_classes, "an image tag", allow_background=False)
                      for t in tags})
    h, w = cams.shape[1:]
    if not present:
        return np.zeros((h, w), dtype=np.uint8)
    fg = np.maximum(cams[[c - offset for c in present]], 0.0)        # [P, H, W]
    peak = fg.reshape(len(present), -1).max(axis=1)
    fg = np.where(peak[:, None, None] > 0, fg / np.where(peak > 0, peak, 1.0)[:, None, None], 0.0)
    bg = (1.0 - fg.max(axis=0)) ** alpha
    scores = np.concatenate([bg[None], fg], axis=0)                    # [1+P, H, W]
    win = scores.argmax(axis=0)                                        # first max on ties
    ids = np.array([0] + present, dtype=np.uint8)
    out = ids[win]
    out[scores.max(axis=0) < threshold] = unl
    return out


# ----------------------------------------------------------------------------------------------
# sparse PNG labels


def labels_from_sparse(sparse: np.ndarray, num_classes: int, unl: int | None = None,
                       path: str | None = None) -> np.ndarray:
    """ScribbleSup/SPML sparse label PNG (class ids, 255 = unlabelled) -> our codes.

    255 means *unlabelled* in these files and becomes ``UNL`` (not VOID, spec pitfall 1), so the
    pixels still take part in clustering and the label-free terms. Values ``C .. 254`` are not
    part of the contract and raise :class:`DatasetError`.
    """
    unl = resolve_unl(num_classes, unl)
    arr = np.asarray(sparse)
    if arr.ndim != 2:
        raise DatasetError(f"a sparse label map must be one channel, got shape {arr.shape}", path=path)
    bad = (arr >= num_classes) & (arr != 255)
    if bad.any():
        vals = sorted(set(np.unique(arr[bad]).tolist()))[:5]
        raise DatasetError(f"sparse label map has class ids {vals} outside 0..{num_classes - 1} "
                           "(and 255 = unlabelled)", path=path,
                           fix="use class ids from annotations.json categories and 255 for unlabelled")
    out = arr.astype(np.uint8, copy=True)
    out[arr == 255] = unl
    return out
