"""Certified Chebyshev random walk: ``M T^s ~= M p(T)`` with a polynomial of degree << s.

The ``chebyshev`` method of :func:`spml_deploy.engine.refine.random_walk` (spec section 7.2; the walk,
its notation, the truncation certificate and the measured accuracy and speed of every method are
described in :mod:`spml_deploy.engine.refine`). This module also owns the few basics that both walk
modules need (:class:`WalkReport`, the input checks, the chunking and the memory budget):
:mod:`spml_deploy.engine.refine` imports them from here, so there is no import cycle.

Chebyshev walk. ``A`` is a Gaussian kernel of the embeddings (``exp(-50 |phi_i - phi_j|^2)``
for unit vectors; ``exp(c G)`` of a Gram matrix in general), hence positive semi-definite, and
``T = D^1/2 S D^-1/2`` with the symmetric ``S = D^-1/2 A D^-1/2``: the spectrum of ``T`` lies in
``[0, 1]`` (``[CHEB_LOWER, 1]`` with margin for rounding and truncation). ``p`` is the Chebyshev
expansion of ``t^64`` on that interval truncated at degree ``m`` (its ``c_0`` takes the tail so
that ``p(1) = 1``): ``max |p - t^64| <= eps_m = 2 sum_{k>m} |c_k|`` (1.8e-6 at m = 27). With
``w_c`` the ``D``-weighted mean of class row ``c`` (which walks to itself),
``max |M_c p(T) - M_c T^64| <= eps_m ||(M_c - w_c) D^1/2||_2 / sqrt(min D)``; ``m`` is the smallest
degree that keeps this within budget (~27 at N = 1024 - 4096). The three-term recurrence runs in
float64 and only the products with the off-diagonal affinities run in the input dtype (the
dominant diagonal stays exact), so float32 rounding adds <= ~1e-5 (observed <= 2.3e-6 at
N = 4096). The products use oneDNN's linear kernel on CPU (faster than MKL's GEMM for C << N;
``benchmarks/refine_speed.py``), ``torch.bmm`` elsewhere. Affinities are built 256 rows at a time (exp and sums in
cache); where the rows sampled at every N/256-th cell show that at most ``SPARSE_MAX_DENSITY``
(15%) of the entries exceed ``tau`` (chosen so that dropping everything below it costs <= a
quarter of the budget), the off-diagonal part is kept as a CSR matrix (``chebyshev-sparse``).
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PhiLike = Union[torch.Tensor, Sequence[torch.Tensor]]

#: Affinities below this value are dropped by the fast paths (``matvec``, ``topk``, and at most
#: this by ``chebyshev``); see :mod:`spml_deploy.engine.refine` for the error bound (``steps * N * 1e-12``).
MIN_AFFINITY = 1e-12
#: Lower end of the spectrum assumed for the symmetric form ``D^-1/2 A D^-1/2`` of the transition
#: (positive semi-definite: ``A`` is a Gaussian kernel; the margin covers float rounding and the
#: sparse truncation, whose effect is checked to stay <= 1e-3).
CHEB_LOWER = -0.01
# entries up to exp(lo) * (1 + slack) are zeroed by the Chebyshev path's affinity builder
_FLOOR_SLACK = 1e-5
# rows sampled (every N/256-th cell) to decide between a sparse and a dense affinity
_SAMPLE_ROWS = 256
#: Rows of the affinity computed at a time by the Chebyshev path on CPU (exp and sums in cache).
AFFINITY_BLOCK_ROWS = 256
#: The Chebyshev path uses a thresholded sparse affinity when at most this fraction is kept.
SPARSE_MAX_DENSITY = 0.15
#: Memory budget (bytes) for the per-chunk ``N x N`` matrices; images are processed in chunks.
DEFAULT_MAX_BYTES = 1 << 30


@dataclass
class WalkReport:
    """What :func:`spml_deploy.engine.refine.random_walk` did: the method used for each image and the certified bound.

    ``bounds[b]`` is an upper bound on ``max |result - exact walk|`` contributed by truncating
    the transition matrix and, for ``chebyshev``, by the polynomial (0 for ``dense``; float
    rounding is not included). ``methods[b]``: ``dense``, ``matvec``, ``topk``, ``chebyshev``
    (dense affinity) or ``chebyshev-sparse`` (thresholded sparse affinity).
    """

    methods: list[str] = field(default_factory=list)
    bounds: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# shared input checks (also used by spml_deploy.engine.refine)


def _as_list(phi: PhiLike) -> list[torch.Tensor]:
    items = [phi] if isinstance(phi, torch.Tensor) else list(phi)
    if not items:
        raise ValueError("phi: expected a tensor [B, D, N] or a non-empty sequence of them")
    out = []
    for p in items:
        if p.dim() == 4:  # [B, D, h, w] -> [B, D, N]
            p = p.flatten(2)
        if p.dim() != 3:
            raise ValueError(f"phi: expected [B, D, N] (or [B, D, h, w]), got shape {tuple(p.shape)}")
        if out and (p.shape[0] != out[0].shape[0] or p.shape[2] != out[0].shape[2]):
            raise ValueError("phi: all passes must have the same batch size and number of cells, "
                             f"got {tuple(out[0].shape)} and {tuple(p.shape)}")
        out.append(p)
    return out


def _check_scores(scores: torch.Tensor, n: int) -> torch.Tensor:
    if scores.dim() == 4:
        scores = scores.flatten(2)
    if scores.dim() != 3 or scores.shape[2] != n:
        raise ValueError(
            f"scores: expected [B, C, N] with N = {n} cells (the grid of phi), got {tuple(scores.shape)}"
        )
    return scores


def _chunks(batch: int, n: int, itemsize: int, copies: int, max_bytes: int) -> list[slice]:
    per_image = max(1, n * n * itemsize * copies)
    size = max(1, int(max_bytes // per_image))
    return [slice(s, min(batch, s + size)) for s in range(0, batch, size)]


# --------------------------------------------------------------------------------------------
# the Chebyshev polynomial


@functools.lru_cache(maxsize=32)
def _power_coeffs(steps: int, lower: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Chebyshev coefficients of ``x^steps`` on ``[lower, 1]`` and their doubled tail sums.

    ``x^steps = sum_k c_k T_k(y)`` exactly (k <= steps), ``y = (2x - 1 - lower) / (1 - lower)``,
    computed by the discrete orthogonality of ``T_k`` at ``steps + 1`` Chebyshev nodes (exact
    for a polynomial of degree ``steps``, float64). All ``c_k >= 0`` (``x`` is an affine map of
    ``y`` with positive coefficients), so ``tails[m] = 2 sum_{k>m} |c_k|`` bounds the error of
    the degree-``m`` truncation whose ``c_0`` absorbs the tail (``p(1) = 1``) on the interval.
    """
    K = steps + 1
    theta = np.pi * (np.arange(K) + 0.5) / K
    x = (1.0 - lower) / 2.0 * np.cos(theta) + (1.0 + lower) / 2.0
    c = 2.0 / K * np.cos(np.outer(np.arange(K), theta)) @ (x ** steps)
    c[0] /= 2.0
    rest = np.abs(c)[::-1].cumsum()[::-1]  # rest[k] = sum_{i>=k} |c_i|
    tails = 2.0 * np.append(rest[1:], 0.0)
    return tuple(c.tolist()), tuple(tails.tolist())


def chebyshev_degree(steps: int, target: float, lower: float = CHEB_LOWER) -> int:
    """Smallest degree ``m`` whose polynomial error bound ``tails[m]`` is <= ``target``
    (``m = steps`` is exact)."""
    _, tails = _power_coeffs(int(steps), float(lower))
    return next(m for m, t in enumerate(tails) if t <= target or m == steps)


def _chebyshev_series(
    x: torch.Tensor, apply, g: torch.Tensor, steps: int, degree: int, lower: float
) -> torch.Tensor:
    """``x p(T)`` for the degree-``degree`` approximation ``p`` of ``t^steps`` on ``[lower, 1]``.

    ``x`` is the state in any layout (dense [B, C, N] or sparse-friendly [B*N, C]); ``apply(v)``
    returns ``v A`` in the same layout and ``g`` (broadcastable to it) holds ``1 / d``, so that
    ``v T = apply(v) * g``. Three-term recurrence ``v_{k+1} = 2 v_k L - v_{k-1}`` with
    ``L = (2 T - (1 + lower) I) / (1 - lower)``; ``degree`` products with ``A``.
    """
    c, tails = _power_coeffs(int(steps), float(lower))
    coef = list(c[: degree + 1])
    coef[0] += tails[degree] / 2.0  # p(1) = 1: constants walk to themselves exactly
    s1, s0 = 2.0 / (1.0 - lower), -(1.0 + lower) / (1.0 - lower)
    y = x * coef[0]
    if degree == 0:
        return y
    g1, g2 = g * s1, g * (2.0 * s1)
    v0, v1 = x, apply(x).mul_(g1).add_(x, alpha=s0)
    y.add_(v1, alpha=coef[1])
    for k in range(2, degree + 1):
        v2 = apply(v1).mul_(g2).add_(v1, alpha=2.0 * s0).sub_(v0)
        y.add_(v2, alpha=coef[k])
        v0, v1 = v1, v2
    return y


@functools.lru_cache(maxsize=1)
def _onednn_linear_ok() -> bool:
    """Whether oneDNN's float32 linear kernel is usable here (CPU builds with MKL-DNN)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w = torch.rand(3, 40, generator=g), torch.rand(24, 40, generator=g)
        return bool(torch.allclose(op(x, w, None, "none", [], ""), x @ w.T, rtol=1e-4, atol=1e-5))
    except Exception:  # noqa: BLE001 -- any failure means: use torch.bmm
        return False


def _dense_apply(A: torch.Tensor, diag: torch.Tensor):
    """``v -> v A^T`` for a float64 state v [B, C, N]: ``A`` [B, N, N] holds the affinity rows
    with a zero diagonal (row j of A is column j of the operator), ``diag`` [B, N] the diagonal
    (float64). The product runs in A's dtype and only over the off-diagonal mass, so its rounding
    is relative to that (small) mass; the dominant diagonal term stays in float64. CPU float32:
    oneDNN's linear kernel (streams A's rows; faster than MKL's GEMM for C << N);
    elsewhere torch.bmm."""
    dg = diag.unsqueeze(1)
    if A.device.type == "cpu" and A.dtype == torch.float32 and _onednn_linear_ok():
        op = torch.ops.mkldnn._linear_pointwise

        def prod(v: torch.Tensor) -> torch.Tensor:
            return torch.stack([op(v[b], A[b], None, "none", [], "") for b in range(v.shape[0])])
    else:
        At = A.transpose(1, 2)

        def prod(v: torch.Tensor) -> torch.Tensor:
            return torch.bmm(v, At)
    return lambda v: prod(v.to(A.dtype)).to(v.dtype).addcmul_(v, dg)


def _sparse_apply(op: torch.Tensor, diag: torch.Tensor):
    """``v -> op v + diag v`` for a float64 state v [B*N, C]; ``op`` the block-diagonal CSR of the
    off-diagonal affinity rows, ``diag`` [B*N] (float64)."""
    dg = diag.unsqueeze(1)
    return lambda v: (op @ v.to(op.dtype)).to(v.dtype).addcmul_(v, dg)


@dataclass
class _Rows:
    """One image's affinity rows: the diagonal, the row sums and the off-diagonal entries, dense
    (a view of the chunk buffer, zero diagonal) or sparse (CSR parts). Sums are float64."""

    d: torch.Tensor                      # [N] row sums of all affinities (>= 1e-12)
    diag: torch.Tensor                   # [N] diagonal
    dropped: torch.Tensor                # [N] upper bound on the mass below the sparse threshold
    dense: torch.Tensor | None = None    # [N, N], zero diagonal
    csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # crow, col, values


def _affinity_block(phis: list[torch.Tensor], b: int, rows: slice | torch.Tensor,
                    valid: torch.Tensor | None, scale: float, lo: float, out: torch.Tensor,
                    tmp: torch.Tensor | None) -> torch.Tensor:
    """Rows ``rows`` of image ``b``'s affinity into ``out`` [r, N]: the mean over passes of
    ``exp(scale (cos - 1))``, entries with exponent <= ``lo`` set to 0, padding isolated.
    (Clamping before exp and zeroing after avoids exp's slow paths for -inf and subnormals.)"""
    floor = math.exp(lo) * (1.0 + _FLOOR_SLACK)
    for i, p in enumerate(phis):
        dst = out if i == 0 else tmp
        assert dst is not None
        bias = torch.full((1, 1), -scale, dtype=p.dtype, device=p.device)
        torch.addmm(bias, p[b][:, rows].T, p[b], alpha=scale, out=dst)
        F.threshold_(dst.clamp_min_(lo).exp_(), floor, 0.0)
        if i:
            out.add_(dst)
    if len(phis) > 1:
        out.div_(len(phis))
    if valid is not None:
        v = valid[rows]
        out.mul_(valid.unsqueeze(0)).mul_(v.unsqueeze(1))
        pad = (~v).nonzero().flatten()
        if isinstance(rows, slice):
            out[pad, pad + rows.start] = 1.0
    return out


def _affinity_rows(
    phis: list[torch.Tensor], b: int, valid: torch.Tensor | None, scale: float, lo: float,
    tau: float, max_nnz: int, block: int, dense_out,
) -> _Rows:
    """Image ``b``'s affinity, ``block`` rows at a time (exp, sums and the sparse extraction run
    in cache).

    ``tau > 0``: off-diagonal entries below ``tau`` are left out and the rest kept as a CSR
    matrix, unless a sample of 256 rows (every N/256-th cell) or the running count shows more than
    ``max_nnz`` entries kept: then the rows go to the dense buffer ``dense_out()`` [N, N].
    ``valid`` [N] isolates padding cells as :func:`affinity` does.
    """
    N = phis[0].shape[2]
    ref = phis[0]
    d = torch.empty(N, dtype=torch.float64, device=ref.device)
    diag = torch.empty_like(d)
    cnts: list[torch.Tensor] = []
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    nb = min(block, N)
    tmp = ref.new_empty(nb, N) if len(phis) > 1 else None
    A = None
    if tau > 0 and max_nnz > 0:
        ns = min(N, _SAMPLE_ROWS)
        sample = torch.arange(0, N, max(1, N // ns), device=ref.device)[:ns]
        S = _affinity_block(phis, b, sample, valid, scale, lo, ref.new_empty(ns, N),
                            None if tmp is None else ref.new_empty(ns, N))
        if float((S >= tau).sum()) / len(sample) * N > max_nnz:
            A = dense_out()
    else:
        A = dense_out()
    buf = ref.new_empty(nb, N) if A is None else None
    nnz = 0
    s = 0
    while s < N:
        e = min(N, s + nb)
        L = _affinity_block(phis, b, slice(s, e), valid, scale, lo,
                            buf[: e - s] if A is None else A[s:e],
                            None if tmp is None else tmp[: e - s])
        dg = L.diagonal(offset=s)
        diag[s:e] = dg
        dg.zero_()
        torch.add(diag[s:e], L.sum(dim=1), out=d[s:e])  # float32 sum of the small off-diagonal part
        if A is None:
            flat = (L >= tau).view(-1).nonzero().flatten()
            cnt = torch.bincount(torch.div(flat, N, rounding_mode="floor"), minlength=e - s)
            nnz += len(flat)
            if nnz > max_nnz:  # denser than sampled: redo from the start with dense rows
                A = dense_out()
                s = 0
                continue
            parts.append((flat % N, L.view(-1)[flat]))
            cnts.append(cnt)
        s = e
    if A is not None:
        return _Rows(d, diag, torch.zeros_like(d), dense=A)
    crow = torch.zeros(N + 1, dtype=torch.int64, device=ref.device)
    cnt = torch.cat(cnts)
    torch.cumsum(cnt, 0, out=crow[1:])
    dropped = tau * (N - 1 - cnt).to(torch.float64)  # every left-out entry is < tau
    return _Rows(d, diag, dropped, csr=(crow, torch.cat([c for c, _ in parts]),
                                        torch.cat([v for _, v in parts])))


def random_walk_chebyshev(
    scores: torch.Tensor,
    phi: PhiLike,
    steps: int = 64,
    beta: float = 5.0,
    alpha: float = 20.0,
    valid: torch.Tensor | None = None,
    tol: float = 1e-4,
    sparse: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
    report: WalkReport | None = None,
) -> torch.Tensor:
    """``M T^steps`` as ``M p(T)`` with a certified Chebyshev polynomial ``p`` of low degree
    (~27 for 64 steps): ~27 products [C, N] x [N, N] instead of 64 (module docstring).

    Shapes as in :func:`random_walk_dense`. ``tol``: the certified error (sparse truncation +
    polynomial; float rounding excluded) is kept <= ``tol / 2``, leaving the other half to
    rounding (observed <= 1.1e-5 in float32: the recurrence runs in float64, only the products
    with the off-diagonal affinities run in the input dtype). ``sparse``: a thresholded sparse
    affinity for the images where that truncation is certified within ``tol / 4`` and keeps
    <= :data:`SPARSE_MAX_DENSITY` of the entries. ``report``: receives ``chebyshev`` /
    ``chebyshev-sparse`` and the certified bound of every image.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    phis = _as_list(phi)
    x = _check_scores(scores, phis[0].shape[2])
    B, _, N = x.shape
    dtype, dev = x.dtype, x.device
    phis = [p.to(dtype) for p in phis]
    scale = float(alpha) * float(beta)
    budget = tol / 2.0
    block = N if dev.type == "cuda" else min(N, AFFINITY_BLOCK_ROWS)
    max_nnz = int(SPARSE_MAX_DENSITY * N * N) if sparse else 0
    out = x.clone()  # constant class rows (e.g. absent classes) walk to themselves
    for sl in _chunks(B, N, x.element_size(), 1, max_bytes):
        xs = x[sl]
        nb = xs.shape[0]
        span_c = xs.amax(dim=2) - xs.amin(dim=2)                       # [nb, C]
        active = (span_c > 0).any(dim=0).nonzero().flatten()
        span = span_c.amax(dim=1).tolist()                             # [nb]
        # affinities below min_aff are dropped: 1e-12, or less where tol asks for it (at most an
        # eighth of the budget, < N min_aff per row)
        min_aff = min(MIN_AFFINITY, budget / 8.0 / (max(steps, 1) * N * max(max(span), 1e-30)))
        lo = math.log(max(min_aff, torch.finfo(dtype).tiny))
        if active.numel() == 0:
            if report is not None:
                report.methods += ["chebyshev"] * nb
                report.bounds += [0.0] * nb
            continue
        buf: list[torch.Tensor] = []  # the chunk's dense rows [nb, N, N], allocated when needed

        def dense_out(b: int, buf: list[torch.Tensor] = buf, nb: int = nb) -> torch.Tensor:
            if not buf:
                buf.append(torch.empty(nb, N, N, dtype=dtype, device=dev))
            return buf[0][b]

        rows: list[_Rows] = []
        trunc: list[float] = []
        for b in range(nb):
            vb = None if valid is None else valid[sl][b].to(device=dev, dtype=torch.bool)
            build = functools.partial(_affinity_rows, phis, sl.start + b, vb, scale, lo,
                                      block=block, dense_out=functools.partial(dense_out, b))
            # dropping entries below tau costs <= N tau per row (A_jj = 1 for unit phi): a
            # quarter of the budget
            tau = budget / 4.0 / (max(steps, 1) * max(span[b], 1e-30) * N)
            r = build(tau=tau, max_nnz=max_nnz)
            floor = N * math.exp(lo) * (1.0 + _FLOOR_SLACK)  # entries zeroed below ~min_aff
            delta = float(((r.dropped + floor) / r.d).max())
            t = steps * delta * span[b]
            eta = float(r.dropped.max() / r.d.min())  # how far eigenvalues may fall below 0
            if r.csr is not None and span[b] > 0 and (t > budget / 2.0 or eta > 1e-3):
                r = build(tau=0.0, max_nnz=0)  # not certified sparse (non-unit phi): dense
                t = steps * float((floor / r.d).max()) * span[b]
            rows.append(r)
            trunc.append(t)
        xa = xs[:, active].to(torch.float64)
        res = torch.empty_like(xa)
        bounds = [0.0] * nb
        for kind in ("dense", "sparse"):
            idx = [b for b in range(nb) if (rows[b].csr is None) == (kind == "dense")]
            if idx:
                res[idx], bd = _chebyshev_group(xa[idx], [rows[b] for b in idx],
                                                [trunc[b] for b in idx], steps, budget,
                                                buf[0] if len(idx) == nb and buf else None)
                for b, v in zip(idx, bd):
                    bounds[b] = v
        if valid is not None:  # padding cells are isolated: they keep their scores exactly
            pad = ~valid[sl].to(device=dev, dtype=torch.bool).unsqueeze(1)
            res = torch.where(pad, xa, res)
        out[sl, active] = res.to(dtype)
        if max(bounds) > budget:
            log.warning("chebyshev random walk: certified bound %.1e exceeds tol / 2 = %.1e (the "
                        "affinity floor of %s cannot go lower); use float64 or a larger tol",
                        max(bounds), budget, dtype)
        if report is not None:
            report.methods += ["chebyshev" if r.csr is None else "chebyshev-sparse" for r in rows]
            report.bounds += bounds
    return out


def _chebyshev_group(
    x: torch.Tensor, rows: list[_Rows], trunc: list[float], steps: int, budget: float,
    dense: torch.Tensor | None,
) -> tuple[torch.Tensor, list[float]]:
    """Walk the float64 scores x [n, C, N] of images that are all dense or all sparse; picks
    the degree so that truncation + polynomial bound <= ``budget`` for every image. ``dense``:
    the chunk buffer when it holds exactly these images. Returns the walked scores and bounds."""
    n, _, N = x.shape
    d = torch.stack([r.d for r in rows])                                   # [n, N]
    diag = torch.stack([r.diag for r in rows])
    w = (x * d.unsqueeze(1)).sum(dim=2, keepdim=True) / d.sum(dim=1)[:, None, None]
    xc = x - w  # p(1) = 1: the shift walks to itself exactly, and the bound shrinks
    # ||e||_inf <= eps_m * ||(x - w) D^1/2||_2 / sqrt(min d)   (module docstring)
    U = ((xc * d.sqrt().unsqueeze(1)).norm(dim=2).amax(dim=1) / d.amin(dim=1).sqrt()).tolist()
    deg = max(chebyshev_degree(steps, (budget - t) / max(u, 1e-300)) for t, u in zip(trunc, U))
    _, tails = _power_coeffs(int(steps), CHEB_LOWER)
    bounds = [t + tails[deg] * u for t, u in zip(trunc, U)]
    if rows[0].csr is None:
        A = dense if dense is not None else torch.stack([r.dense for r in rows])
        y = _chebyshev_series(xc, _dense_apply(A, diag), (1.0 / d).unsqueeze(1), steps, deg,
                              CHEB_LOWER)
    else:
        op = _block_csr([r.csr for r in rows], N, rows[0].csr[2].dtype, x.device)
        xt = xc.transpose(1, 2).reshape(n * N, -1)
        y = _chebyshev_series(xt, _sparse_apply(op, diag.reshape(-1)), (1.0 / d).reshape(-1, 1),
                              steps, deg, CHEB_LOWER)
        y = y.view(n, N, -1).transpose(1, 2)
    log.debug("chebyshev (%s): %d image(s), degree %d, bounds %s",
              "dense" if rows[0].csr is None else "sparse", n, deg, bounds)
    return y + w, bounds


def _block_csr(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Block-diagonal CSR [len(parts)*n, len(parts)*n] from per-image CSR parts of size n x n."""
    crows, cols = [], []
    nnz = 0
    for i, (crow, col, _) in enumerate(parts):
        crows.append(crow[(1 if i else 0):] + nnz)
        cols.append(col + i * n)
        nnz += int(crow[-1])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.cat(crows), torch.cat(cols),
                                       torch.cat([v for _, _, v in parts]),
                                       size=(len(parts) * n, len(parts) * n), dtype=dtype,
                                       device=device, check_invariants=False)
