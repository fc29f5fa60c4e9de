"""Points and strokes inside a region, the geometry of the derived weak annotations
(:mod:`spml_deploy.data.weaken`): the central point of an instance, points spread over the
background, and a stroke through a region's interior that follows bent and ring-shaped
regions. Every stroke vertex lies on a pixel of the region and every segment between two
vertices stays on such pixels."""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order

GRID = 32          # strokes are planned on a grid of at most GRID x GRID cells per region
CORE = 0.4         # stroke core: cells at least CORE x the maximal inscribed radius deep


# --------------------------------------------------------------------------------------------
# points and strokes


def central_point(region: np.ndarray) -> list[int] | None:
    """``[x, y]`` of the pixel deepest inside the boolean ``region`` (None when it is empty)."""
    c = _crop(region)
    return None if c is None else _central_point(*c)


def _central_point(crop: np.ndarray, oy: int, ox: int) -> list[int]:
    """:func:`central_point` of a zero-bordered uint8 crop whose pixel (0, 0) is (oy, ox)."""
    dt = cv2.distanceTransform(crop, cv2.DIST_L2, 5)
    ys, xs = np.nonzero(dt >= dt.max() - 0.5)
    cy, cx = np.nonzero(crop)
    d2 = (ys - cy.mean()) ** 2 + (xs - cx.mean()) ** 2
    k = int(np.argmin(d2))
    return [int(xs[k]) + ox, int(ys[k]) + oy]


def spread_points(region: np.ndarray, n: int, rng: np.random.Generator) -> list[list[int]]:
    """Up to ``n`` ``[x, y]`` points inside the boolean ``region``, far from its border and apart.

    Candidates are region pixels whose distance to the region border (image borders included)
    is at least half the maximum; the first point is a random candidate, each next one the
    candidate farthest from the points already taken.
    """
    if n <= 0 or not region.any():
        return []
    dt = cv2.distanceTransform(_pad1(region), cv2.DIST_L2, 5)[1:-1, 1:-1]
    ys, xs = np.nonzero(dt >= max(1.0, 0.5 * float(dt.max())))
    if len(ys) == 0:
        ys, xs = np.nonzero(region)
    k = int(rng.integers(len(ys)))
    chosen = [k]
    dmin = (ys - ys[k]) ** 2 + (xs - xs[k]) ** 2
    while len(chosen) < min(n, len(ys)):
        k = int(np.argmax(dmin))
        if dmin[k] == 0:
            break
        chosen.append(k)
        dmin = np.minimum(dmin, (ys - ys[k]) ** 2 + (xs - xs[k]) ** 2)
    return [[int(xs[k]), int(ys[k])] for k in chosen]


def stroke(region: np.ndarray, rng: np.random.Generator) -> list[list[int]] | None:
    """A polyline ``[[x, y], ...]`` through the interior of the boolean ``region``.

    The region's bounding box is planned on a grid of at most ``GRID`` x ``GRID`` cells (a cell
    is kept when all its pixels are inside). On that grid the *core* is the set of cells at
    least ``CORE`` times the maximal inscribed radius deep, and the start is a random cell at
    least 0.8 times that radius deep. The stroke is the straight segment between the core cell
    farthest from the start and the core cell farthest from that one, when it stays in the core
    (convex-ish regions); otherwise the geodesic diameter of the core found the same way by
    breadth-first search (so rings, stars and bent regions are followed, not cut across). Cell
    centres are mapped back to pixels, the polyline is simplified and checked at full
    resolution (every segment inside ``region``, see :func:`_segments_ok`); if the check fails,
    the longest valid run of the unsimplified cell path is used. None when the region cannot
    hold two distinct pixels.
    """
    c = _crop(region)
    return None if c is None else _stroke(*c, rng)


def _stroke(crop: np.ndarray, oy: int, ox: int,
            rng: np.random.Generator) -> list[list[int]] | None:
    """:func:`stroke` of a zero-bordered uint8 crop whose pixel (0, 0) is (oy, ox)."""
    f = max(1, math.ceil(max(crop.shape) / GRID))
    grid = _min_pool(crop, f) if f > 1 else crop
    if f > 1 and grid.sum() < 2:
        f, grid = 1, crop
    path = _grid_path(grid, rng)
    if path is None:
        return _two_pixel_stroke(crop, oy, ox)

    def to_xy(cells: np.ndarray) -> np.ndarray:    # cell centre -> crop pixel x/y
        pts = cells * f + (f - 1) // 2
        return _dedupe(np.ascontiguousarray(pts[:, ::-1]).astype(np.int32))

    xy = to_xy(path)
    if len(xy) >= 2:
        simple = xy if len(xy) == 2 else cv2.approxPolyDP(
            xy.reshape(-1, 1, 2), max(0.75, 0.5 * f), False).reshape(-1, 2)
        inside = crop.view(np.bool_)                    # 0/1 -> False/True, no copy
        if not _segments_ok(simple, inside).all():
            simple = _longest_valid_run(to_xy(_densify(path)), inside)
        if simple is not None:
            return (simple + [ox, oy]).tolist()
    return _two_pixel_stroke(crop, oy, ox)


# --------------------------------------------------------------------------------------------
# internals

def _pad1(m: np.ndarray) -> np.ndarray:
    """``m`` as uint8 0/1 with a one-pixel zero border."""
    out = np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.uint8)
    out[1:-1, 1:-1] = m
    return out


def _crop(region: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """(uint8 crop of the bounding box with a zero border, row and column of its pixel (0, 0)
    in the image), or None for an empty region."""
    bb = _bbox(region)
    if bb is None:
        return None
    y0, y1, x0, x1 = bb
    return _pad1(region[y0:y1, x0:x1]), y0 - 1, x0 - 1


def _bbox(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end exclusive, of the nonzero pixels of ``m``; None when there are none."""
    m8 = m.view(np.uint8) if m.dtype == np.bool_ else (m != 0).view(np.uint8)
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(m8))
    if w == 0:
        return None
    return y, y + h, x, x + w


def _min_pool(m: np.ndarray, f: int) -> np.ndarray:
    """Cells of ``f`` x ``f`` pixels that are entirely True (the grid is zero padded)."""
    h, w = m.shape
    H, W = -(-h // f) * f, -(-w // f) * f
    p = np.zeros((H, W), bool)
    p[:h, :w] = m
    return p.reshape(H // f, f, W // f, f).all(axis=(1, 3))


def _grid_path(grid: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """(row, col) cells of a stroke through the core of boolean ``grid`` (zero border)."""
    g8 = grid.astype(np.uint8)
    dt = cv2.distanceTransform(g8, cv2.DIST_L2, 5)
    dmax = float(dt.max())
    if dmax <= 0:
        return None
    core = dt >= max(1.0, CORE * dmax)
    ys, xs = np.nonzero(dt >= 0.8 * dmax)
    k = int(rng.integers(len(ys)))
    s = np.array([ys[k], xs[k]])
    cy, cx = np.nonzero(core)
    cells = np.stack([cy, cx], 1)
    # fast path: a straight diameter of the core (convex-ish cores)
    a = cells[np.argmax(((cells - s) ** 2).sum(1))]
    b = cells[np.argmax(((cells - a) ** 2).sum(1))]
    if _segment_inside(core, a, b):
        return np.stack([a, b])
    # otherwise the geodesic diameter of the core (8-connected steps): a = farthest from s,
    # b = farthest from a, the stroke = the breadth-first path from a to b
    graph, index = _grid_graph(core, cy, cx)
    order = breadth_first_order(graph, int(index[s[0], s[1]]), return_predecessors=False)
    a = int(order[-1])
    order, pred = breadth_first_order(graph, a, return_predecessors=True)
    chain = [int(order[-1])]
    while chain[-1] != a:
        chain.append(int(pred[chain[-1]]))
    path = cells[chain]
    return path


def _segment_inside(core: np.ndarray, p: np.ndarray, q: np.ndarray) -> bool:
    """Whether every half-cell sample of the segment from cell ``p`` to ``q`` is in ``core``."""
    n = 2 * int(np.abs(q - p).max()) + 1
    t = np.arange(n + 1, dtype=np.float64)[:, None] / n
    rc = np.rint(p + (q - p) * t).astype(np.intp)
    return bool(core[rc[:, 0], rc[:, 1]].all())


_NEIGHBOURS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


def _grid_graph(core: np.ndarray, cy: np.ndarray,
                cx: np.ndarray) -> tuple[csr_matrix, np.ndarray]:
    """8-neighbour adjacency (CSR, both directions) of the ``core`` cells listed in (cy, cx),
    and the map cell -> node index (-1 outside the core)."""
    index = np.full(core.shape, -1, np.int32)
    index[cy, cx] = np.arange(len(cy), dtype=np.int32)
    nb = index[cy[:, None] + _NEIGHBOURS[:, 0], cx[:, None] + _NEIGHBOURS[:, 1]]  # zero border
    ok = nb >= 0
    indptr = np.zeros(len(cy) + 1, np.int32)
    np.cumsum(ok.sum(1), out=indptr[1:])
    k = len(cy)
    return csr_matrix((np.ones(int(indptr[-1])), nb[ok], indptr), shape=(k, k)), index


def _densify(path: np.ndarray) -> np.ndarray:
    """Cells under a polyline of cells (one per step, 8-connected): its rasterisation."""
    out = [path[:1]]
    for p, q in zip(path[:-1], path[1:]):
        n = int(np.abs(q - p).max())
        if n:
            t = np.arange(1, n + 1)[:, None] / n
            out.append(np.rint(p + (q - p) * t).astype(path.dtype))
    return np.concatenate(out)


def _dedupe(xy: np.ndarray) -> np.ndarray:
    keep = np.ones(len(xy), bool)
    keep[1:] = (xy[1:] != xy[:-1]).any(1)
    return xy[keep]


def _segments_ok(xy: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per segment of polyline ``xy`` (N x 2, x/y): whether it lies inside ``region``.

    A segment from p to q is inside when every sample ``rint(p + (q - p) * i / n)``,
    ``i = 0..n``, ``n = 4 * max(|q - p|) + 1`` (quarter-pixel steps) is a ``region`` pixel.
    Vertices must lie inside the image; then so does every sample between two of them.
    """
    h, w = region.shape
    assert ((xy >= 0) & (xy < [w, h])).all(), "stroke vertex outside the image"
    if len(xy) == 2:                                # one segment: no bookkeeping
        p, q = xy[0].astype(np.float64), xy[1].astype(np.float64)
        n = 4 * int(np.abs(q - p).max()) + 1
        t = np.arange(n + 1) / n
        smp = np.rint(p + (q - p) * t[:, None]).astype(np.intp)
        return np.array([region[smp[:, 1], smp[:, 0]].all()])
    p, q = xy[:-1].astype(np.float64), xy[1:].astype(np.float64)
    n = 4 * np.abs(q - p).max(axis=1).astype(np.int64) + 1
    counts = n + 1
    start = np.cumsum(counts) - counts
    seg = np.repeat(np.arange(len(n)), counts)
    t = (np.arange(int(counts.sum())) - start[seg]) / n[seg]
    smp = np.rint(p[seg] + (q - p)[seg] * t[:, None]).astype(np.intp)
    return np.logical_and.reduceat(region[smp[:, 1], smp[:, 0]], start)


def _longest_valid_run(xy: np.ndarray, region: np.ndarray) -> np.ndarray | None:
    """The longest run of consecutive vertices whose segments all lie in ``region``."""
    if len(xy) < 2:
        return None
    ok = _segments_ok(xy, region)
    best, start, best_len = None, 0, 0
    for i in range(len(ok) + 1):
        if i == len(ok) or not ok[i]:
            if i - start > best_len:
                best_len, best = i - start, (start, i)
            start = i + 1
    if best is None:
        return None
    return xy[best[0]:best[1] + 1]


def _two_pixel_stroke(crop: np.ndarray, oy: int, ox: int) -> list[list[int]] | None:
    """A minimal stroke: the deepest pixel of ``crop`` and a neighbour inside it."""
    dt = cv2.distanceTransform(crop.astype(np.uint8), cv2.DIST_L2, 5)
    if (crop.sum()) < 2:
        return None
    y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)):
        if crop[y + dy, x + dx]:
            return [[int(x) + ox, int(y) + oy], [int(x + dx) + ox, int(y + dy) + oy]]
    return None     # an isolated pixel
