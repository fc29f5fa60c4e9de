"""Low-level over-segmentation ``O`` (spec section 1 item 3, "Substitutes"), computed once and cached.

HED + gPb-owt-ucm are not available; we use scikit-image's Felzenszwalb graph segmentation (default)
or SLIC, tuned to give a granularity comparable to the official maps (at most 256 regions per
image), followed by a merge step that *guarantees* at most ``max_regions`` regions:

1. ``felzenszwalb``: ``scale = 0.25 * sqrt(H * W)``, ``sigma = 0.8``,
   ``min_size = max(H * W // (8 * max_regions), 16)`` -- on scikit-image's photos (512 x 512) this
   gives about 150-250 regions; on strongly textured images (grass, gravel) more.
   ``slic``: ``n_segments = 3/4 * max_regions``, ``compactness = 10``, ``sigma = 1``, connectivity
   enforced.
2. While more than ``max_regions`` regions remain, the smallest region is merged into the adjacent
   region with the closest mean colour (ties: the longer shared border, then the smaller id). Merging
   only adjacent regions keeps every region connected when its parts were.
3. Ids are made contiguous ``0 .. n-1`` (ordered by the smallest original id of each region) and
   returned as uint8 (``max_regions <= 256``).

:class:`OversegCache` keeps one ``.npz`` per image, keyed by the image's resolved path, size and
modification time and by the method, its parameters and :data:`OVERSEG_VERSION`; files are written
atomically, and an unreadable or inconsistent file is recomputed.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import multiprocessing
import re
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from spml_deploy.artifacts import atomic_write_bytes
from spml_deploy.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["METHODS", "MAX_REGIONS", "OVERSEG_VERSION", "oversegment", "merge_regions",
           "OversegCache", "precompute_overseg"]

METHODS = ("felzenszwalb", "slic")
MAX_REGIONS = 256
OVERSEG_VERSION = 1   # bump when the algorithm or its parameters change (invalidates caches)


def _check_args(method: str, max_regions: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown over-segmentation method '{method}'",
                          fix=f"set train.overseg to one of {', '.join(METHODS)}")
    if not 1 <= int(max_regions) <= MAX_REGIONS:
        raise ConfigError(f"max_regions must lie in 1..{MAX_REGIONS} (uint8 region ids), "
                          f"got {max_regions}")


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ConfigError(f"over-segmentation needs an H x W x 3 image, got shape {img.shape}")
    return img


def method_params(method: str, height: int, width: int, max_regions: int) -> dict[str, Any]:
    """The library parameters used for an image of ``height x width`` (see module docstring)."""
    area = height * width
    if method == "felzenszwalb":
        return dict(scale=0.25 * float(np.sqrt(area)), sigma=0.8,
                    min_size=max(area // (8 * max_regions), 16))
    return dict(n_segments=max(int(0.75 * max_regions), 1), compactness=10.0, sigma=1.0)


def oversegment(image: np.ndarray, method: str = "felzenszwalb", max_regions: int = MAX_REGIONS
                ) -> np.ndarray:
    """Region map of an image: uint8 height x width, ids contiguous ``0 .. n-1``, ``n <= max_regions``.

    Args:
        image: height x width x 3 (or height x width) array, uint8 RGB.
        method: ``felzenszwalb`` (default) or ``slic``.
        max_regions: upper bound on the number of regions (1..256).
    """
    _check_args(method, max_regions)
    from skimage import segmentation

    img = _as_rgb(image)
    h, w = img.shape[:2]
    params = method_params(method, h, w, max_regions)
    if method == "felzenszwalb":
        labels = segmentation.felzenszwalb(img, channel_axis=-1, **params)
    else:
        labels = segmentation.slic(img, channel_axis=-1, start_label=0, enforce_connectivity=True,
                                   **params)
    return merge_regions(labels, img, max_regions)


def _adjacency(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected region adjacency from 4-neighbour pairs: (a, b, shared-border length), a < b."""
    pairs = [np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
             np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], 1)]
    p = np.concatenate(pairs, 0)
    p = p[p[:, 0] != p[:, 1]]
    p.sort(axis=1)
    if len(p) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq, counts = np.unique(p, axis=0, return_counts=True)
    return uniq[:, 0], uniq[:, 1], counts


def merge_regions(labels: np.ndarray, image: np.ndarray, max_regions: int = MAX_REGIONS
                  ) -> np.ndarray:
    """Merge regions until at most ``max_regions`` remain; return contiguous uint8 ids.

    Smallest region first, into the adjacent region with the closest mean colour (ties: longer
    shared border, then smaller id). Every output region is a union of input regions.

    Args:
        labels: height x width integer region ids (any values).
        image: height x width x 3 (or height x width) image the colours are taken from.
        max_regions: 1..256.
    """
    if not 1 <= int(max_regions) <= MAX_REGIONS:
        raise ConfigError(f"max_regions must lie in 1..{MAX_REGIONS}, got {max_regions}")
    _, lab = np.unique(np.asarray(labels), return_inverse=True)
    lab = lab.reshape(labels.shape).astype(np.int64)
    n = int(lab.max()) + 1
    if n > max_regions:
        img = _as_rgb(image).astype(np.float64)
        size = np.bincount(lab.ravel(), minlength=n).astype(np.float64)
        csum = np.stack([np.bincount(lab.ravel(), weights=img[..., c].ravel(), minlength=n)
                         for c in range(3)], 1)
        a, b, cnt = _adjacency(lab)
        nbr: list[dict[int, int]] = [dict() for _ in range(n)]
        for i, j, c in zip(a.tolist(), b.tolist(), cnt.tolist()):
            nbr[i][j] = c
            nbr[j][i] = c
        parent = np.arange(n)
        alive = n
        heap = [(size[i], i) for i in range(n)]
        heapq.heapify(heap)
        while alive > max_regions and heap:
            s, r = heapq.heappop(heap)
            if parent[r] != r or s != size[r]:
                continue  # stale entry
            if not nbr[r]:
                continue  # isolated (cannot happen on a connected grid); leave it
            mean_r = csum[r] / size[r]
            t = min(nbr[r], key=lambda q: (float(np.sum((csum[q] / size[q] - mean_r) ** 2)),
                                           -nbr[r][q], q))
            # merge r into t
            parent[r] = t
            size[t] += size[r]
            csum[t] += csum[r]
            for q, c in nbr[r].items():
                if q == t:
                    continue
                nbr[q].pop(r, None)
                nbr[q][t] = nbr[q].get(t, 0) + c
                nbr[t][q] = nbr[t].get(q, 0) + c
            nbr[t].pop(r, None)
            nbr[r] = {}
            alive -= 1
            heapq.heappush(heap, (size[t], t))
        # resolve the merge forest to roots
        root = parent.copy()
        while True:
            nxt = root[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
        lab = root[lab]
        _, lab = np.unique(lab, return_inverse=True)
        lab = lab.reshape(labels.shape)
    assert int(lab.max()) < max_regions
    return lab.astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# cache


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class OversegCache:
    """On-disk cache of region maps: one ``<stem>-<key>.npz`` per image in ``cache_dir``.

    The key hashes the resolved image path, its size and mtime, the method, ``max_regions`` and
    :data:`OVERSEG_VERSION`, so an edited image or a changed setting is recomputed. Writes are
    atomic; a corrupt or inconsistent file is logged and recomputed.
    """

    def __init__(self, cache_dir: str | Path, method: str = "felzenszwalb",
                 max_regions: int = MAX_REGIONS):
        _check_args(method, max_regions)
        self.cache_dir = Path(cache_dir)
        self.method = method
        self.max_regions = int(max_regions)

    def _path_of(self, path: Path) -> Path:
        st = path.stat()
        ident = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, self.method,
                            self.max_regions, OVERSEG_VERSION])
        key = hashlib.sha1(ident.encode()).hexdigest()[:20]
        stem = _SAFE.sub("_", path.stem)[:64]
        return self.cache_dir / f"{stem}-{key}.npz"

    def cache_file(self, record_or_path: Any) -> Path:
        """The cache file an image maps to (whether or not it exists yet); array key ``region``."""
        return self._path_of(_image_path(record_or_path))

    path_for = cache_file

    def _load(self, file: Path, shape: tuple[int, int] | None) -> np.ndarray | None:
        try:
            with np.load(file, allow_pickle=False) as z:
                arr = z["region"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("over-segmentation cache file %s is unreadable (%s); recomputing", file, exc)
            return None
        if (arr.ndim != 2 or arr.dtype != np.uint8 or (shape is not None and arr.shape != shape)
                or (arr.size and int(arr.max()) >= self.max_regions)):
            log.warning("over-segmentation cache file %s does not match its image; recomputing", file)
            return None
        return arr

    def get(self, record_or_path: Any, image: np.ndarray | None = None) -> np.ndarray:
        """The region map of one image (uint8 height x width), from the cache or computed.

        Args:
            record_or_path: an image record (its ``path``) or an image path.
            image: the decoded image (height x width x 3 uint8); read from disk when None and the
                cache misses.
        """
        path = _image_path(record_or_path)
        file = self._path_of(path)
        shape = None
        if image is not None:
            shape = tuple(np.asarray(image).shape[:2])
        elif getattr(record_or_path, "height", None) is not None:
            shape = (int(record_or_path.height), int(record_or_path.width))
        arr = self._load(file, shape)
        if arr is not None:
            return arr
        if image is None:
            from spml_deploy.data.imageio import read_image

            image = read_image(path)
        arr = oversegment(image, self.method, self.max_regions)
        buf = io.BytesIO()
        np.savez_compressed(buf, region=arr)
        atomic_write_bytes(file, buf.getvalue())
        return arr


def _image_path(record_or_path: Any) -> Path:
    return Path(getattr(record_or_path, "path", record_or_path))


def _precompute_one(args: tuple[str, str, str, int]) -> bool:
    """Worker: make sure one image's region map is cached; True if it was computed now."""
    path, cache_dir, method, max_regions = args
    cache = OversegCache(cache_dir, method, max_regions)
    hit = cache._load(cache.cache_file(path), None) is not None
    if not hit:
        cache.get(path)
    return not hit


def precompute_overseg(records: Iterable[Any], cache_dir: str | Path, method: str = "felzenszwalb",
                       max_regions: int = MAX_REGIONS, workers: int = 2, progress: bool = True
                       ) -> dict[str, int]:
    """Fill the cache for every image of ``records`` (records or paths) with a process pool.

    Args:
        workers: processes (``<= 1``: in this process).
        progress: show a tqdm bar.

    Returns:
        ``{"computed": n, "cached": m}``.
    """
    from tqdm import tqdm

    _check_args(method, max_regions)
    jobs = [(str(_image_path(r)), str(cache_dir), method, int(max_regions)) for r in records]
    bar = dict(total=len(jobs), desc=f"over-segmentation ({method})", unit="img",
               disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        flags = [_precompute_one(j) for j in tqdm(jobs, **bar)]
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            flags = list(tqdm(pool.map(_precompute_one, jobs, chunksize=4), **bar))
    computed = int(sum(flags))
    log.info("over-segmentation cache %s: %d computed, %d already cached", cache_dir, computed,
             len(flags) - computed)
    return {"computed": computed, "cached": len(flags) - computed}
