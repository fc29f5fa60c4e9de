"""Images cut into segments, and queries drawn on them.

:func:`segment_images` turns a batch of images into segments: the network's unit embeddings (any
backend; by default averaged with those of the mirror image), spherical k-means on the valid
(non-padding) cells with the spec 7.3 test grid of the model's config (12x12 by default), one
unit prototype per segment (normalised sum of its embeddings), the predicted class per segment
(majority of the softmax argmax over its cells), and the segment's box, area and mask at the
ORIGINAL image size. A stride-4 cell covers the original pixels whose centre falls into it after
the preprocessing resize, so a segment may cover no original pixel at all (images upscaled to
``max_side``); such segments are not indexed.

:func:`query_vector` is the prototype of a point (the segment under it), a box or a mask (the
normalised pooled embedding of the cells they cover, each cell weighted by the number of its
original pixels inside); :func:`query_region` its pixels, for drawing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spml_deploy.config import PreprocessConfig
from spml_deploy.data.imageio import read_image
from spml_deploy.engine.forward import Engine
from spml_deploy.engine.prototypes import majority_label, segment_memory
from spml_deploy.errors import SpmlError
from spml_deploy.serving.store import rle_encode

STRIDE = 4


class QueryError(SpmlError):
    """A retrieval query is malformed (point/box outside the image, empty mask, unknown class)."""




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
# queries on a segmented image


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
