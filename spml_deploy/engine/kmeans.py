"""Batched spherical k-means on the embedding grid (spec section 3).

Every image of a batch is clustered independently, but all images are processed together:
the M-step is one ``index_add`` (CPU) or one one-hot ``bmm`` (other devices, deterministic) over
the whole batch, the E-step one batched matmul and one ``argmax`` (numpy's on the CPU, ~6x
faster than torch's over the innermost axis, same first-maximum indices). There is no Python
loop over pixels, clusters or images; the only loop is over the (10) iterations.

Conventions (as the official code, pinned by the golden cases ``grid_init`` and ``kmeans_*``):

* initial clusters are the cells of a regular ``ky x kx`` grid, numbered column-major
  (``row + ky * col``) and compacted to consecutive ids; ``K`` = number of cells;
* features ``psi = normalize([normalize(phi); y - 0.5; x - 0.5 (; extra)])``;
* M-step ``c_k = normalize(sum_{z_i = k} psi_i)`` (empty cluster -> zero vector, norm floor
  1e-12); E-step ``z_i = argmax_k psi_i . c_k`` with ties going to the smallest ``k``;
* ``zero_centroid_for_empty=True`` (spec ``compat.zero_centroid_for_empty``, the default) lets
  the zero centroid of an empty cluster score 0 and win against negative cosines;
  ``False`` excludes empty clusters from the argmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spml_deploy.errors import SpmlError

__all__ = [
    "grid_init",
    "location_features",
    "clustering_features",
    "spherical_kmeans",
    "kmeans_clusters",
    "l2_normalize",
    "NORM_EPS",
]

NORM_EPS = 1e-12
# Score / one-hot matrices above this many elements are computed in chunks of pixels.
_MAX_SCORE_ELEMENTS = 1 << 24


def l2_normalize(x: Tensor, dim: int) -> Tensor:
    """``x / max(||x||_2, 1e-12)`` along ``dim`` (the spec's ``normalize``); differentiable."""
    return F.normalize(x, p=2.0, dim=dim, eps=NORM_EPS)


def _grid_axis(k: int, n: int) -> Tensor:
    """Cell index of each of ``n`` positions for ``k`` cells: ``round(linspace(0, k-1, n))``
    (half to even, as ``torch.round``), computed in float64 on the CPU."""
    return torch.round(torch.linspace(0.0, float(k - 1), n, dtype=torch.float64)).long()


def grid_init(ky: int, kx: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Initial cluster ids of a ``ky x kx`` grid on an ``h x w`` map (spec 3.3).

    Returns a LongTensor of shape [h, w]: ``row(r) + ky * col(c)`` with
    ``row = round(linspace(0, ky-1, h))``, ``col = round(linspace(0, kx-1, w))``, then relabelled
    to consecutive ids 0..K-1 (order preserved; K < ky*kx when the map is smaller than the grid).
    Computed on the CPU (identical on every device) and moved to ``device``.
    """
    for name, value in (("ky", ky), ("kx", kx), ("h", h), ("w", w)):
        if int(value) < 1:
            raise SpmlError(f"grid_init: {name} = {value} must be a positive integer",
                            fix="pass a grid of at least 1x1 cells and a non-empty map")
    rows = _grid_axis(int(ky), int(h))
    cols = _grid_axis(int(kx), int(w))
    ids = rows[:, None] + int(ky) * cols[None, :]
    _, compact = torch.unique(ids, sorted=True, return_inverse=True)
    return compact.reshape(h, w).to(device)


def location_features(h: int, w: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Centred pixel coordinates on the embedding grid, shape [2, h, w]: channel 0 is
    ``linspace(0, 1, h)[r] - 0.5`` (row), channel 1 is ``linspace(0, 1, w)[c] - 0.5`` (column)."""
    ys = torch.linspace(0.0, 1.0, h, dtype=torch.float64) - 0.5
    xs = torch.linspace(0.0, 1.0, w, dtype=torch.float64) - 0.5
    loc = torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)], dim=0)
    return loc.to(device=device, dtype=dtype)


def _feature_rows(phi: Tensor, extra: Tensor | None) -> Tensor:
    """``psi`` as a contiguous [B, h*w, F] matrix per image (pixel rows, row-major).

    Fused form of ``normalize([normalize(phi); tail])`` with ``tail = [loc (; extra)]``: with
    ``u = phi / max(|phi|, eps)`` the outer norm is ``sqrt(|u|^2 + |tail|^2)``, so one norm of
    ``phi`` (reduced in NCHW layout) and one scaling suffice. Differentiable.
    """
    if phi.dim() != 4:
        raise SpmlError(f"clustering_features: phi must be [B, D, h, w], got shape {tuple(phi.shape)}",
                        fix="pass the embedding map in NCHW layout")
    b, d, h, w = phi.shape
    n = h * w
    tail = location_features(h, w, device=phi.device, dtype=phi.dtype).reshape(2, n).t().expand(b, n, 2)
    if extra is not None:
        if extra.dim() != 4 or extra.shape[0] != b or extra.shape[2:] != phi.shape[2:]:
            raise SpmlError(f"clustering_features: extra has shape {tuple(extra.shape)}, expected "
                            f"[{b}, E, {h}, {w}]", fix="resize the extra features to the embedding grid")
        tail = torch.cat([tail, extra.to(dtype=phi.dtype).permute(0, 2, 3, 1).reshape(b, n, -1)], dim=2)
    norm = torch.linalg.vector_norm(phi, dim=1).reshape(b, n, 1)
    inv = 1.0 / norm.clamp_min(NORM_EPS)
    total = ((norm * inv).square() + tail.square().sum(dim=2, keepdim=True)).sqrt().clamp_min(NORM_EPS)
    rows = phi.permute(0, 2, 3, 1).reshape(b, n, d)          # a view: no copy
    return torch.cat([rows * (inv / total), tail / total], dim=2)


def clustering_features(phi: Tensor, extra: Tensor | None = None) -> Tensor:
    """Clustering feature ``psi`` (spec 3.2, 3.5).

    ``phi``: embeddings, shape [B, D, h, w] (unit or raw; normalised here along D).
    ``extra``: optional extra channels [B, E, h, w] (DensePose colour), appended unchanged.
    Returns ``normalize([normalize(phi); loc (; extra)])`` of shape [B, D+2(+E), h, w] (a
    channels-last view), with the dtype and device of ``phi``. Differentiable (the caller
    decides whether to detach).
    """
    rows = _feature_rows(phi, extra)
    b, _, h, w = phi.shape
    return rows.view(b, h, w, rows.shape[2]).permute(0, 3, 1, 2)


def _cluster_sums(psi: Tensor, z: Tensor, num_clusters: int, method: str) -> Tensor:
    """Per-image cluster sums of ``psi`` ([B, N, F]) for ids ``z`` ([B, N], ``num_clusters``
    marks pixels that belong to no cluster). Returns [B, K, F]."""
    b, n, f = psi.shape
    k1 = num_clusters + 1
    if method == "index_add":
        offset = (torch.arange(b, device=psi.device) * k1)[:, None]
        sums = psi.new_zeros(b * k1, f).index_add_(0, (z + offset).reshape(-1), psi.reshape(b * n, f))
        return sums.view(b, k1, f)[:, :num_clusters]
    # one-hot product, accumulated over pixel chunks in a fixed order (deterministic, bounded memory)
    sums = psi.new_zeros(b, num_clusters, f)
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, b * k1))
    for start in range(0, n, step):
        zc = z[:, start:start + step]
        onehot = psi.new_zeros(b, zc.shape[1], k1).scatter_(2, zc[:, :, None], 1.0)
        sums = sums + torch.bmm(onehot[:, :, :num_clusters].transpose(1, 2), psi[:, start:start + step])
    return sums


def _argmax_last(scores: Tensor) -> Tensor:
    """``scores.argmax(dim=-1)`` (first index on ties). On the CPU numpy's argmax over the
    innermost axis gives the same indices faster than torch's (``benchmarks/kmeans_speed.py``)."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) \
            and not scores.requires_grad:
        return torch.from_numpy(scores.numpy().argmax(axis=-1))
    return scores.argmax(dim=-1)


def _assign(psi: Tensor, centroids: Tensor, excluded: Tensor | None) -> Tensor:
    """E-step: ``argmax_k psi_i . c_k`` (first index on ties) for [B, N, F] x [B, K, F] ->
    [B, N]; ``excluded`` ([B, K] bool) clusters score -inf. Chunked over pixels when large."""
    b, n, _ = psi.shape
    k = centroids.shape[1]
    ct = centroids.transpose(1, 2)
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, b * k))
    out = []
    for start in range(0, n, step):
        scores = torch.matmul(psi[:, start:start + step], ct)
        if excluded is not None:
            scores = scores.masked_fill(excluded[:, None, :], float("-inf"))
        out.append(_argmax_last(scores))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


@torch.no_grad()
def spherical_kmeans(psi: Tensor, init: Tensor, valid: Tensor | None, num_clusters: int,
                     iters: int = 10, zero_centroid_for_empty: bool = True,
                     method: str = "auto") -> tuple[Tensor, Tensor]:
    """Batched spherical k-means from given initial ids (spec 3.4); no gradient.

    ``psi``: unit features [B, N, F]; ``init``: initial ids [B, N] in [0, K) (read only at valid
    pixels); ``valid``: bool [B, N] (None = all pixels); ``num_clusters``: K.
    Runs ``iters`` times (M-step, E-step). Returns ``(assignments, centroids)``: the ids after
    the last E-step, LongTensor [B, N] with -1 at invalid pixels, and the centroids of those
    final clusters, ``normalize(sum psi)`` [B, K, F] (zero rows for empty clusters). With
    ``iters = 0`` the assignments are ``init`` (at valid pixels).
    ``method``: "index_add" (fast on CPU), "matmul" (one-hot bmm, deterministic on GPU) or
    "auto" (index_add on CPU, matmul elsewhere); both give the same sums up to rounding.
    """
    if psi.dim() != 3:
        raise SpmlError(f"spherical_kmeans: psi must be [B, N, F], got shape {tuple(psi.shape)}",
                        fix="flatten the spatial dimensions and put features last")
    b, n, _ = psi.shape
    if init.shape != (b, n):
        raise SpmlError(f"spherical_kmeans: init has shape {tuple(init.shape)}, expected {(b, n)}",
                        fix="give one initial cluster id per pixel")
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=psi.device)
    elif valid.shape != (b, n):
        raise SpmlError(f"spherical_kmeans: valid has shape {tuple(valid.shape)}, expected {(b, n)}",
                        fix="give one validity flag per pixel")
    if num_clusters < 1:
        raise SpmlError(f"spherical_kmeans: num_clusters = {num_clusters} must be >= 1",
                        fix="use a grid of at least one cell")
    if method == "auto":
        method = "index_add" if psi.device.type == "cpu" else "matmul"
    if method not in ("index_add", "matmul"):
        raise SpmlError(f"spherical_kmeans: unknown method {method!r}",
                        fix="use 'auto', 'index_add' or 'matmul'")
    valid = valid.to(torch.bool)
    psi = psi.contiguous()          # bmm would otherwise copy a strided psi every iteration
    k = int(num_clusters)
    init = init.to(torch.long)
    if bool((((init < 0) | (init >= k)) & valid).any()):     # one host sync per call
        raise SpmlError(f"spherical_kmeans: initial ids of valid pixels must lie in [0, {k})",
                        fix="relabel the initial clusters to 0..K-1 or raise num_clusters")
    # Invalid pixels carry the extra id K: they add to a discarded bin and never change.
    z = torch.where(valid, init, k)
    # index_add sends invalid pixels to the discarded bin K; the one-hot product needs zeros
    # there (0 * NaN would spread a non-finite invalid pixel into every cluster).
    psi_v = psi if method == "index_add" else psi.masked_fill(~valid[:, :, None], 0.0)
    for _ in range(int(iters)):
        centroids = l2_normalize(_cluster_sums(psi_v, z, k, method), dim=2)     # M-step
        excluded = None
        if not zero_centroid_for_empty:
            counts = _cluster_sums(valid[:, :, None].to(psi.dtype), z, k, method)[:, :, 0]
            excluded = counts == 0
        z = torch.where(valid, _assign(psi, centroids, excluded), k)           # E-step
    centroids = l2_normalize(_cluster_sums(psi_v, z, k, method), dim=2)
    return torch.where(valid, z, -1), centroids


def kmeans_clusters(phi: Tensor, valid: Tensor | None, grid: tuple[int, int], iters: int = 10,
                    extra: Tensor | None = None, zero_centroid_for_empty: bool = True) -> Tensor:
    """Per-image spherical k-means on an embedding map (spec 3): grid initialisation,
    location features, ``iters`` iterations.

    ``phi``: embeddings [B, D, h, w] (raw or unit); ``valid``: bool [B, h, w] (None = all);
    ``grid``: (ky, kx); ``extra``: optional extra clustering channels [B, E, h, w].
    Returns LongTensor [B, h, w]: cluster id per pixel in the numbering of ``grid_init`` (ids of
    different images are independent), -1 at invalid pixels. No gradient.
    """
    if phi.dim() != 4:
        raise SpmlError(f"kmeans_clusters: phi must be [B, D, h, w], got shape {tuple(phi.shape)}",
                        fix="pass the embedding map in NCHW layout")
    b, _, h, w = phi.shape
    if valid is not None and valid.shape != (b, h, w):
        raise SpmlError(f"kmeans_clusters: valid has shape {tuple(valid.shape)}, expected {(b, h, w)}",
                        fix="bring the validity mask to the embedding grid (resize_labels_nearest)")
    ky, kx = (int(g) for g in grid)
    init_cpu = grid_init(ky, kx, h, w)
    num_clusters = int(init_cpu.max()) + 1
    init = init_cpu.to(phi.device).reshape(1, h * w).expand(b, h * w)
    with torch.no_grad():
        psi = _feature_rows(phi.detach(), None if extra is None else extra.detach())   # [B, N, F]
        flat_valid = None if valid is None else valid.reshape(b, h * w)
        z, _ = spherical_kmeans(psi, init, flat_valid, num_clusters, iters=iters,
                                zero_centroid_for_empty=zero_centroid_for_empty)
    return z.reshape(b, h, w)
