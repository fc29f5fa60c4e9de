"""Random-walk refinement of class score maps (spec section 7.2).

Given a score map ``M`` (C classes on a grid of N cells) and unit embeddings ``phi`` on the same
grid, the walk diffuses the scores along the feature affinity::

    A_ij = exp(beta * (phi_i . phi_j - 1)) ** alpha  = exp(alpha * beta * (cos_ij - 1))
    T    = A diag(1 / sum_i A_ij)            (every column sums to 1)
    M_rw = M T^(2^w)                         (w = 6 squarings = 64 walk steps)

Five ways to compute ``M T^64`` (all batched over images, any device, float32 or float64):

``dense``      the reference: ``w`` squarings of the ``N x N`` matrix, then one product
               (``6 N^3`` multiply-adds per image). ``auto`` for N <= 400.
``matvec``     64 products ``[C, N] x [N, N]`` (``64 C N^2``), no squaring. Affinities below
               ``1e-12`` are dropped (bound below). ``auto`` on CUDA for N > 400: the dense
               squarings of a 64x64 grid (N = 4096) are 0.8 TFLOP per image, compute-bound,
               while the 64 products of the whole batch
               are one batched ``bmm`` per step that reads each ``N x N`` matrix once
               (memory-bound: 64 MiB per image and step).
``topk``       keep the ``k`` largest entries of every column, renormalise, apply the sparse
               matrix 64 times (one block-diagonal CSR product per step for the batch).
               Approximate: certified per image, but the bound is large on clustered embeddings.
``chebyshev``  ``M p(T)`` with a polynomial ``p`` of degree ~27 that is certified to be within
               ``tol / 2`` of ``t^64`` on the spectrum: ~27 products instead of 64, exact to the
               certified bound. ``auto`` on CPU for N > 400.
``auto``       the above choice (:func:`auto_method`).

All images of a batch are walked together: the ``N x N`` matrices of as many images as fit the
memory budget ``max_bytes`` go through one batched product per step. The default budget
(:func:`walk_budget`) is 1 GiB on the CPU and half the free memory on a CUDA device, where a
batch of 16 images at N = 4096 (2 GiB for ``matvec``) is one walk. Error of ``matvec`` against
the float32 dense walk: at most ``64 * N * 1e-12`` (2.7e-7 at N = 4096) from the dropped
affinities plus float32 rounding (<= 3.2e-5 below); tested <= 1e-4 with >= 99.9% equal labels
against the per-image dense walk (``tests/test_refine.py``). The bound assumes float32
products: with ``torch.backends.cuda.matmul.allow_tf32 = True`` (off by default; the torch
backend restores the user's setting after the network) the products would round to TF32.

Chebyshev walk: the polynomial, its certificate and the sparse / dense affinity rows are
described in :mod:`spml_deploy.engine.chebyshev_walk`, which implements it.

Truncation certificate (``matvec``, ``topk``, sparse ``chebyshev``). Let ``T'`` be ``T`` with
some entries dropped (renormalised or not) and ``delta_j`` the dropped mass of column ``j`` of
``A`` over its sum. Because column-(sub)stochastic matrices never widen the range of a class row,
``max |M T^s - M T'^s| <= s * max_j delta_j * max_c (max M_c - min M_c)``. Dropping affinities
below ``1e-12`` gives ``delta_j <= N * 1e-12`` (``A_jj = 1``): ``2.7e-7`` at N = 4096, 64 steps.

Measured against the float64 walk, score maps in [0, 1] (``tests/test_refine.py``,
``benchmarks/results/refine_speed.md``; N = 1024 and 4096, tight / medium / random regimes):

* ``dense`` / ``matvec`` in float32: max abs difference <= 3.2e-5, same argmax labels;
  in float64: <= 1e-9.
* ``chebyshev`` / ``auto`` (tol = 1e-4): certified bound <= 5e-5 (observed 2.6e-5 - 4.6e-5);
  max abs difference <= 1.1e-5 at N = 1024 and <= 2.3e-6 at N = 4096 in float32 (<= 4e-6 in
  float64); same argmax labels.
* ``topk`` (k = 32): exact when N <= k; within 1e-4 only where neighbourhoods are well
  separated; on clustered embeddings 1e-3 - 0.3 (argmax agreement >= 97%).

Speed of each method by grid size and regime: ``benchmarks/refine_speed.py`` and its results,
``benchmarks/results/refine_speed.md``. On a dense affinity the gain of ``chebyshev`` over
``dense`` is bounded by the flop ratio ``12 N^3 / (2 * 27 * C N^2)``.
"""
from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F

# The Chebyshev walk lives in its own module, which also owns the basics both walks share
# (WalkReport, input checks, chunking, budgets): imported here, and re-exported so that
# `refine.random_walk_chebyshev`, `refine.chebyshev_degree`, `refine.WalkReport`, ... keep working.
# Its tuning knobs (SPARSE_MAX_DENSITY, AFFINITY_BLOCK_ROWS, ...) are read from that module.
from spml_deploy.engine.chebyshev_walk import (  # noqa: F401  (re-exports)
    CHEB_LOWER,
    DEFAULT_MAX_BYTES,
    MIN_AFFINITY,
    PhiLike,
    WalkReport,
    _as_list,
    _check_scores,
    _chunks,
    chebyshev_degree,
    random_walk_chebyshev,
)

log = logging.getLogger(__name__)

METHODS = ("auto", "dense", "matvec", "topk", "chebyshev")
#: ``auto`` uses dense squaring up to this many cells (the measured crossover with
#: ``chebyshev`` on the CPU: ``benchmarks/results/refine_speed.md``).
DENSE_MAX_CELLS = 400
#: Fraction of the free CUDA memory the walk's ``N x N`` matrices may take by default.
CUDA_BUDGET_FRACTION = 0.5


def auto_method(device: torch.device, cells: int) -> str:
    """The walk ``auto`` picks for ``cells`` grid cells on ``device``: ``dense`` up to
    :data:`DENSE_MAX_CELLS`, then ``matvec`` on CUDA and ``chebyshev`` on the CPU."""
    if cells <= DENSE_MAX_CELLS:
        return "dense"
    return "matvec" if device.type == "cuda" else "chebyshev"


def walk_budget(device: torch.device) -> int:
    """Default memory budget in bytes for the ``N x N`` matrices of one batched walk:
    ``DEFAULT_MAX_BYTES`` on the CPU, on CUDA the larger of that and
    ``CUDA_BUDGET_FRACTION`` of the device's free memory."""
    if device.type != "cuda":
        return DEFAULT_MAX_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(DEFAULT_MAX_BYTES, int(free * CUDA_BUDGET_FRACTION))


# --------------------------------------------------------------------------------------------
# affinities


def affinity(
    phi: PhiLike,
    beta: float = 5.0,
    alpha: float = 20.0,
    valid: torch.Tensor | None = None,
    min_affinity: float = 0.0,
) -> torch.Tensor:
    """Symmetric affinity matrix ``A_ij = exp(alpha * beta * (phi_i . phi_j - 1))``.

    Args:
        phi: unit embeddings, a tensor of shape [batch, channels, cells] (or [B, D, h, w]), or a
            sequence of such tensors (e.g. flipped / extra-scale passes already mapped back to
            the same grid): their affinities are averaged (spec 7.2).
        beta, alpha: the spec's constants (5 and 20).
        valid: optional bool mask [batch, cells]; an invalid cell (padding) gets no affinity to
            any other cell and affinity 1 to itself, so the walk leaves it alone and never
            reaches it.
        min_affinity: entries below this value are set to 0 (0 = keep all; the reference).

    Returns:
        [batch, cells, cells] affinities in the dtype of ``phi``; the diagonal is 1 for unit
        embeddings, so every column sums to at least 1.
    """
    passes = _as_list(phi)
    scale = float(alpha) * float(beta)
    # exp() of large negative numbers returns subnormals, which are several times slower to
    # produce on CPUs and slow every later product: exponents <= `lo` give exactly 0 instead
    # (a change < N * finfo.tiny per column, i.e. nil, when min_affinity = 0).
    lo = math.log(max(float(min_affinity), torch.finfo(passes[0].dtype).tiny))
    A = None
    for p in passes:
        offset = torch.full((1, 1, 1), -scale, dtype=p.dtype, device=p.device)
        logit = torch.baddbmm(offset, p.transpose(1, 2), p, alpha=scale)  # scale * (cos - 1)
        a = F.threshold_(logit, lo, -math.inf).exp_()  # exponents <= lo -> exactly 0
        A = a if A is None else A.add_(a)
    assert A is not None
    if len(passes) > 1:
        A.div_(len(passes))
    if valid is not None:
        v = valid.to(device=A.device, dtype=torch.bool).reshape(A.shape[0], A.shape[1])
        keep = v.unsqueeze(2) & v.unsqueeze(1)
        A.masked_fill_(~keep, 0.0)
        eye = torch.eye(A.shape[1], dtype=torch.bool, device=A.device).unsqueeze(0)
        A.masked_fill_(eye & ~v.unsqueeze(2), 1.0)
    return A


def column_normalize(A: torch.Tensor) -> torch.Tensor:
    """Transition matrix ``T = A diag(1 / column sums)`` (in place on ``A``), [B, N, N]."""
    return A.div_(A.sum(dim=1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny))


def transition(
    phi: PhiLike, beta: float = 5.0, alpha: float = 20.0, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Column-normalised transition matrix ``T`` [batch, cells, cells] (each column sums to 1)."""
    return column_normalize(affinity(phi, beta, alpha, valid))


# --------------------------------------------------------------------------------------------
# walks on a given matrix


def _walk_power(scores: torch.Tensor, T: torch.Tensor, squarings: int) -> torch.Tensor:
    """``scores T^(2^squarings)`` by repeated squaring (consumes ``T``)."""
    for _ in range(squarings):
        T = torch.bmm(T, T)
    return torch.bmm(scores, T)


def _walk_steps(scores: torch.Tensor, T: torch.Tensor, steps: int) -> torch.Tensor:
    """``scores T^steps`` by ``steps`` products [B, C, N] x [B, N, N]."""
    out = scores
    for _ in range(steps):
        out = torch.bmm(out, T)
    return out


def _topk_operator(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse transition from a symmetric affinity [B, N, N] (not modified).

    Returns the CSR matrix of ``T'^T`` for the whole batch (block diagonal, [B*N, B*N]; row j
    of block b holds column j of image b's truncated, renormalised transition) and the
    truncated mass fraction ``delta`` [B, N] of every column.
    """
    B, N, _ = A.shape
    k = min(k, N)
    total = A.sum(dim=2)  # A is symmetric: row sums are column sums
    vals, idx = torch.topk(A, k, dim=2)  # row j = column j: its k largest entries
    kept = vals.sum(dim=2)
    delta = ((total - kept) / total).clamp_min(0.0)
    vals = vals / kept.unsqueeze(2)
    offset = (torch.arange(B, device=A.device) * N).view(B, 1, 1)
    crow = torch.arange(0, B * N * k + 1, k, device=A.device, dtype=torch.int64)
    col = (idx + offset).reshape(-1)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        op = torch.sparse_csr_tensor(crow, col, vals.reshape(-1), size=(B * N, B * N),
                                     dtype=A.dtype, device=A.device, check_invariants=False)
    return op, delta


def _walk_sparse(scores: torch.Tensor, op: torch.Tensor, steps: int) -> torch.Tensor:
    """``scores T'^steps`` with ``op`` = block-diagonal CSR of ``T'^T``; scores [B, C, N]."""
    B, C, N = scores.shape
    x = scores.transpose(1, 2).reshape(B * N, C).contiguous()
    for _ in range(steps):
        x = op @ x
    return x.view(B, N, C).transpose(1, 2).contiguous()


def _score_range(scores: torch.Tensor) -> torch.Tensor:
    """[B] largest (max - min) over the class rows of each image."""
    return (scores.amax(dim=2) - scores.amin(dim=2)).amax(dim=1)


# --------------------------------------------------------------------------------------------
# public walks


def _walk_chunks(scores: torch.Tensor, phi: PhiLike, valid: torch.Tensor | None, copies: int,
                 max_bytes: int):
    """The checked scores [B, C, N], an output buffer like them, and the image chunks whose
    ``copies`` N x N matrices fit ``max_bytes``: (slice, embedding passes, valid or None)."""
    phis = _as_list(phi)
    x = _check_scores(scores, phis[0].shape[2])
    chunks = [(sl, [p[sl] for p in phis], None if valid is None else valid[sl])
              for sl in _chunks(x.shape[0], x.shape[2], x.element_size(), copies, max_bytes)]
    return x, torch.empty_like(x), chunks


def random_walk_dense(
    scores: torch.Tensor,
    phi: PhiLike,
    beta: float = 5.0,
    alpha: float = 20.0,
    squarings: int = 6,
    valid: torch.Tensor | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Reference walk ``M T^(2^squarings)`` by matrix squaring.

    Args:
        scores: score maps [batch, classes, cells] (or [B, C, h, w] on phi's grid).
        phi: unit embeddings [batch, channels, cells] (or a sequence of passes, see
            :func:`affinity`).
        valid: optional bool [batch, cells] (padding cells are left unchanged).
        max_bytes: memory budget for the N x N matrices; images are processed in chunks.

    Returns:
        walked scores [batch, classes, cells], dtype of ``scores``.
    """
    x, out, chunks = _walk_chunks(scores, phi, valid, 3, max_bytes)
    for sl, phis, v in chunks:
        T = transition(phis, beta, alpha, v)
        out[sl] = _walk_power(x[sl], T.to(x.dtype), squarings)
    return out


def random_walk_steps(
    scores: torch.Tensor,
    phi: PhiLike,
    steps: int = 1,
    beta: float = 5.0,
    alpha: float = 20.0,
    valid: torch.Tensor | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_affinity: float = MIN_AFFINITY,
) -> torch.Tensor:
    """``steps`` walk steps ``M T^steps`` by repeated products [C, N] x [N, N] (no squaring).

    ``steps = 1`` is the single step of Algorithm 2 round 2; ``steps = 64`` equals the
    reference with 6 squarings (``matvec`` method). Shapes as in :func:`random_walk_dense`.
    Affinities below ``min_affinity`` are dropped (error <= steps * N * min_affinity).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x, out, chunks = _walk_chunks(scores, phi, valid, 2, max_bytes)
    for sl, phis, v in chunks:
        A = affinity(phis, beta, alpha, v, min_affinity)
        out[sl] = _walk_steps(x[sl], column_normalize(A).to(x.dtype), steps)
    return out


def random_walk_topk(
    scores: torch.Tensor,
    phi: PhiLike,
    k: int = 32,
    steps: int = 64,
    beta: float = 5.0,
    alpha: float = 20.0,
    valid: torch.Tensor | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    report: WalkReport | None = None,
) -> torch.Tensor:
    """Approximate walk with a top-``k`` sparse transition (``k`` entries kept per column).

    Shapes as in :func:`random_walk_dense`. When ``report`` is given, the per-image certified
    bound ``steps * max_j delta_j * score range`` is appended to it.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x, out, chunks = _walk_chunks(scores, phi, valid, 2, max_bytes)
    for sl, phis, v in chunks:
        A = affinity(phis, beta, alpha, v).to(x.dtype)
        op, delta = _topk_operator(A, k)
        del A
        out[sl] = _walk_sparse(x[sl], op, steps)
        if report is not None:
            bound = steps * delta.amax(dim=1) * _score_range(x[sl])
            report.methods += ["topk"] * bound.numel()
            report.bounds += bound.tolist()
    return out


def random_walk(
    scores: torch.Tensor,
    phi: PhiLike,
    method: str = "auto",
    beta: float = 5.0,
    alpha: float = 20.0,
    squarings: int = 6,
    k: int = 32,
    tol: float = 1e-4,
    valid: torch.Tensor | None = None,
    max_bytes: int | None = None,
    return_report: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WalkReport]:
    """Random walk ``M T^(2^squarings)`` (spec 7.2) with a choice of formulation.

    Args:
        scores: score maps [batch, classes, cells] (or [B, C, h, w] on phi's grid).
        phi: unit embeddings [batch, channels, cells] on the same grid, or a sequence of passes.
        method: ``auto`` | ``dense`` | ``matvec`` | ``topk`` | ``chebyshev`` (see the module
            docstring). ``auto``: ``dense`` for small grids (N <= 400), else ``matvec`` on
            CUDA and ``chebyshev`` on the CPU (:func:`auto_method`).
        k: entries kept per column by ``topk``.
        tol: max abs error allowed to ``chebyshev`` / ``auto``: their certified bound is kept
            <= ``tol / 2`` (the rest is left to float32 rounding).
        valid: optional bool [batch, cells]; padding cells are excluded from the walk.
        max_bytes: memory budget of the batched ``N x N`` matrices (None: :func:`walk_budget`).
        return_report: also return a :class:`WalkReport`.

    Returns:
        walked scores [batch, classes, cells] (and the report).
    """
    if method not in METHODS:
        raise ValueError(f"random walk method must be one of {METHODS}, got {method!r}")
    phis = _as_list(phi)
    x = _check_scores(scores, phis[0].shape[2])
    steps = 2 ** int(squarings)
    report = WalkReport()
    if method == "auto":
        method = auto_method(x.device, x.shape[2])
    if max_bytes is None:
        max_bytes = walk_budget(x.device)
    if method == "dense":
        out = random_walk_dense(x, phis, beta, alpha, squarings, valid, max_bytes)
        report.methods += ["dense"] * x.shape[0]
        report.bounds += [0.0] * x.shape[0]
    elif method == "matvec":
        out = random_walk_steps(x, phis, steps, beta, alpha, valid, max_bytes)
        report.methods += ["matvec"] * x.shape[0]
        report.bounds += [steps * x.shape[2] * MIN_AFFINITY] * x.shape[0]
    elif method == "topk":
        out = random_walk_topk(x, phis, k, steps, beta, alpha, valid, max_bytes, report)
    else:
        out = random_walk_chebyshev(x, phis, steps, beta, alpha, valid, tol, True, max_bytes,
                                    report)
    log.debug("random walk: N=%d C=%d methods=%s bounds=%s", x.shape[2], x.shape[1],
              report.methods, report.bounds)
    return (out, report) if return_report else out


# --------------------------------------------------------------------------------------------
# the whole refinement recipe


def grid_size(out_size: tuple[int, int], stride: int = 8) -> tuple[int, int]:
    """Random-walk grid for an image of ``out_size`` = (height, width): ``floor(size / stride)``
    (at least 1), e.g. 62x62 cells for a 500x500 image (spec 7.2)."""
    return max(1, int(out_size[0]) // stride), max(1, int(out_size[1]) // stride)


def normalize_score_map(
    scores: torch.Tensor, present: torch.Tensor | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-class spatial max normalisation, absent classes set to 0 (spec 7.2, pitfall 13).

    Args:
        scores: non-negative scores [batch, classes, h, w].
        present: optional bool [batch, classes]; False = class absent from the image's labels.
        valid: optional bool [batch, h, w]; the maxima are taken over valid cells only.

    Returns:
        [batch, classes, h, w]: each present class divided by its maximum (classes whose
        maximum is 0 stay 0), absent classes 0.
    """
    x = scores
    if valid is not None:
        x = x * valid.unsqueeze(1).to(x.dtype)
    peak = x.flatten(2).amax(dim=2).clamp_min(torch.finfo(x.dtype).tiny)
    out = x / peak[:, :, None, None]
    if present is not None:
        out = out * present.to(device=out.device, dtype=out.dtype)[:, :, None, None]
    return out


def refine_labels(
    scores: torch.Tensor,
    phi: PhiLike,
    present: torch.Tensor | None = None,
    out_size: tuple[int, int] | None = None,
    *,
    stride: int = 8,
    valid: torch.Tensor | None = None,
    normalize_scores: bool = True,
    method: str = "auto",
    beta: float = 5.0,
    alpha: float = 20.0,
    squarings: int = 6,
    k: int = 32,
    tol: float = 1e-4,
    align_corners: bool = False,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Score map -> random-walk refined label map (the spec 7.2 recipe, batched).

    Steps: bring the scores and the embeddings bilinearly to the walk grid
    ``floor(out_size / stride)`` (embeddings re-normalised to unit length); per-class max
    normalisation and absent classes zeroed (``normalize_scores``); random walk; bilinear
    upsampling to ``out_size``; argmax (ties -> smallest class id).

    Args:
        scores: class scores [batch, classes, h, w] at any resolution (softmax probabilities at
            full size, or score maps already on the 1/8 grid).
        phi: embeddings [batch, channels, he, we] (any resolution; normalised here), or a
            sequence of such passes whose affinities are averaged.
        present: optional bool [batch, classes]: classes in the image's label set.
        out_size: (height, width) of the output labels; default: the size of ``scores``.
        valid: optional bool [batch, H, W] at ``out_size``: False on padding. Padding cells do
            not take part in the walk and do not set the per-class maxima.
        normalize_scores: False when ``scores`` is already a walk-ready map (e.g. the CAM map
            of spec 7.2); absent classes are still zeroed when ``present`` is given.
        method, beta, alpha, squarings, k, tol: see :func:`random_walk`.
        return_scores: also return the refined scores [batch, classes, H, W].

    Returns:
        labels [batch, H, W] int64 (and the upsampled refined scores).
    """
    if scores.dim() != 4:
        raise ValueError(f"scores: expected [B, C, h, w], got shape {tuple(scores.shape)}")
    size = scores.shape[-2:] if out_size is None else out_size
    H, W = int(size[0]), int(size[1])
    gh, gw = grid_size((H, W), stride)
    mode = dict(mode="bilinear", align_corners=align_corners)
    m = scores if scores.shape[-2:] == (gh, gw) else F.interpolate(scores, size=(gh, gw), **mode)
    phis = [phi] if isinstance(phi, torch.Tensor) else list(phi)
    grid_phi = []
    for p in phis:
        if p.dim() != 4:
            raise ValueError(f"phi: expected [B, D, h, w], got shape {tuple(p.shape)}")
        q = p if p.shape[-2:] == (gh, gw) else F.interpolate(p, size=(gh, gw), **mode)
        grid_phi.append(F.normalize(q.to(m.dtype), dim=1).flatten(2))
    gvalid = None
    if valid is not None:
        if valid.shape[-2:] != (H, W):
            raise ValueError(f"valid: expected [B, {H}, {W}] (out_size), got {tuple(valid.shape)}")
        frac = F.interpolate(valid[:, None].to(m.dtype), size=(gh, gw), mode="area")[:, 0]
        gvalid = frac >= 0.5
    if normalize_scores:
        m = normalize_score_map(m, present, gvalid)
    elif present is not None:
        m = m * present.to(device=m.device, dtype=m.dtype)[:, :, None, None]
    flat_valid = None if gvalid is None else gvalid.flatten(1)
    walked = random_walk(m.flatten(2), grid_phi, method=method, beta=beta, alpha=alpha,
                         squarings=squarings, k=k, tol=tol, valid=flat_valid)
    assert isinstance(walked, torch.Tensor)
    up = F.interpolate(walked.view(m.shape), size=(H, W), **mode)
    labels = up.argmax(dim=1)
    return (labels, up) if return_scores else labels
