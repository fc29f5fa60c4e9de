"""Appearance and shapes of the built-in scenes: the bank of real textures, colours, the four
object textures (stripes, checker, speckle, shaded) and the shape drawers (OpenCV rasterisers
with sub-pixel coordinates, painting 1 on a uint8 canvas)."""
from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Callable

import cv2
import numpy as np

SHIFT = 4                     # sub-pixel bits of the OpenCV rasterisers
ONE = 1 << SHIFT

Drawer = Callable[[np.ndarray], None]


# --------------------------------------------------------------------------------------------
# texture bank and appearance


@functools.lru_cache(maxsize=1)
def texture_bank() -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Real textures bundled with scikit-image, loaded once per process.

    Returns (grey textures: height x width float32 with zero mean and unit variance,
    colour photographs: height x width x 3 float32 in [0, 1]).
    """
    import skimage.data as sd

    grey = []
    for name in ("brick", "grass", "gravel", "moon"):
        g = getattr(sd, name)().astype(np.float32)
        grey.append(((g - g.mean()) / max(float(g.std()), 1e-6)).astype(np.float32))
    photos = []
    for name in ("coffee", "astronaut", "rocket", "chelsea", "immunohistochemistry"):
        photos.append(getattr(sd, name)()[..., :3].astype(np.float32) / 255.0)
    return tuple(grey), tuple(photos)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (3 float32 in [0, 1]) from the distribution shared by every class."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.25, 0.95), rng.uniform(0.3, 0.95)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def _patch(src: np.ndarray, h: int, w: int, rng: np.random.Generator,
           zoom: tuple[float, float]) -> np.ndarray:
    """A random crop of ``src`` resized to ``h`` x ``w`` (zoom = source pixels per output pixel)."""
    z = math.exp(rng.uniform(math.log(zoom[0]), math.log(zoom[1])))
    ph = min(src.shape[0], max(2, round(h * z)))
    pw = min(src.shape[1], max(2, round(w * z)))
    y = int(rng.integers(0, src.shape[0] - ph + 1))
    x = int(rng.integers(0, src.shape[1] - pw + 1))
    crop = src[y:y + ph, x:x + pw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if ph > h else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=interp)


def _mix(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """``t * c1 + (1 - t) * c2`` for a height x width float32 ``t``: height x width x 3 float32.

    Computed per channel plane and merged: numpy broadcasting over a trailing axis of 3 is
    an order of magnitude slower.
    """
    return cv2.merge([(c2[i] + (c1[i] - c2[i]) * t).astype(np.float32, copy=False)
                      for i in range(3)])


def _texture(kind: str, h: int, w: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A ``h`` x ``w`` x 3 float32 appearance of ``kind`` for an object of size ``scale`` px."""
    h, w, scale = int(h), int(w), float(scale)
    c1, c2 = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind in ("stripes", "checker"):
        th = rng.uniform(0, math.pi)
        u = xx * math.cos(th) + yy * math.sin(th)
        if kind == "stripes":
            period = max(3.0, scale * rng.uniform(0.3, 0.6))
            t = np.clip(2.5 * np.sin(u * (2 * math.pi / period) + rng.uniform(0, 6.3)), -1, 1)
            t = 0.5 + 0.5 * t
        else:
            cell = max(2.5, scale * rng.uniform(0.25, 0.45))
            v = -xx * math.sin(th) + yy * math.cos(th)
            t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif kind == "speckle":
        grey, _ = texture_bank()
        g = _patch(grey[int(rng.integers(len(grey)))], h, w, rng, (0.4, 1.5))
        t = np.clip(0.5 + 0.3 * g, 0, 1)
    elif kind == "shaded":
        ang = rng.uniform(0, 2 * math.pi)
        r = max(scale, 1.0)
        d2 = ((xx - (w - 1) / 2 - 0.4 * r * math.cos(ang)) ** 2
              + (yy - (h - 1) / 2 - 0.4 * r * math.sin(ang)) ** 2) / (r * r)
        light = np.clip(1.2 - 0.75 * d2, 0.3, 1.2)
        glint = 0.3 * np.exp(-8 * d2)
        return cv2.merge([(c1[i] * light + glint).astype(np.float32) for i in range(3)])
    else:
        raise AssertionError(f"unknown texture {kind}")
    return _mix(t.astype(np.float32), c1, c2)


# --------------------------------------------------------------------------------------------
# shapes (drawers paint 1 on a uint8 canvas)


def _fx(v: float) -> int:
    return int(round(v * ONE))


def _pts(p: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(p, np.float64) * ONE).astype(np.int32).reshape(-1, 1, 2)


def _polygon(pts: np.ndarray) -> Drawer:
    return lambda c: cv2.fillPoly(c, [_pts(pts)], 1, cv2.LINE_8, SHIFT)


def _disc(cx: float, cy: float, r: float) -> Drawer:
    return lambda c: cv2.circle(c, (_fx(cx), _fx(cy)), max(1, _fx(r)), 1, -1, cv2.LINE_8, SHIFT)


def _capsule(p: np.ndarray, q: np.ndarray, width: float) -> Drawer:
    t = max(1, int(round(width)))
    return lambda c: cv2.line(c, (_fx(p[0]), _fx(p[1])), (_fx(q[0]), _fx(q[1])), 1, t,
                              cv2.LINE_8, SHIFT)


def _regular(cx: float, cy: float, radii: np.ndarray, th: float) -> np.ndarray:
    """Vertices at equal angles from ``th`` with the given radii (N x 2 x/y)."""
    a = th + np.arange(len(radii)) * (2 * math.pi / len(radii))
    return np.stack([cx + radii * np.cos(a), cy + radii * np.sin(a)], 1)


def _shape(kind: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> Drawer:
    """A drawer for one object shape of radius about ``r`` centred at (cx, cy)."""
    th = rng.uniform(0, 2 * math.pi)
    if kind == "disc":
        return _disc(cx, cy, r)
    if kind == "square":
        return _polygon(_regular(cx, cy, np.full(4, r * 1.2), th))
    if kind == "triangle":
        radii = r * 1.3 * rng.uniform(0.9, 1.1, 3)
        return _polygon(_regular(cx, cy, radii, th))
    if kind == "star":
        inner = rng.uniform(0.42, 0.58)
        radii = np.tile([r * 1.3, r * 1.3 * inner], 5)
        return _polygon(_regular(cx, cy, radii, th))
    if kind == "ring":
        hole = rng.uniform(0.45, 0.62)
        outer, inner = _disc(cx, cy, r), _disc(cx, cy, r * hole)

        def draw(c: np.ndarray) -> None:
            outer(c)
            inner_c = np.zeros_like(c)
            inner(inner_c)
            c[inner_c > 0] = 0
        return draw
    if kind == "ellipse":
        a, b = r * rng.uniform(0.95, 1.15), r * rng.uniform(0.65, 0.9)
        deg = math.degrees(th)
        return lambda c: cv2.ellipse(c, (_fx(cx), _fx(cy)), (_fx(a), _fx(b)), deg, 0, 360, 1,
                                     -1, cv2.LINE_8, SHIFT)
    if kind == "blob":
        n = 12
        noise = np.convolve(np.tile(rng.normal(0, 1, n), 3), np.ones(3) / 3, "same")[n:2 * n]
        return _polygon(_regular(cx, cy, r * np.clip(1 + 0.3 * noise, 0.5, 1.6), th))
    raise AssertionError(f"unknown shape {kind}")
