"""Random-walk refinement of class score maps (spec section 7.2).

Given a score map ``M`` (C classes on a grid of N cells) and unit embeddings ``phi`` on the same
grid, the walk diffuses the scores along the feature affinity::

    A_ij = exp(beta * (phi_i . phi_j - 1)) ** alpha  = exp(alpha * beta * (cos_ij - 1))
    T    = A diag(1 / sum_i A_ij)            (every column sums to 1)
    M_rw = M T^(2^w)                         (w = 6 squarings = 64 walk steps)

Four ways to compute ``M T^64`` (all batched over images, any device, float32 or float64):

``dense``   the reference: ``w`` squarings of the ``N x N`` matrix, then one product
            (``6 N^3`` multiply-adds per image). The fast path on a GPU.
``matvec``  64 products ``[C, N] x [N, N]`` (``64 C N^2``): the same mathematics without the
            ``N^3`` squarings. Affinities below ``1e-12`` are dropped (see below).
``topk``    the affinity ``exp(100 (cos - 1))`` is extremely peaked: keep the ``k`` largest
            entries of every column, renormalise each column over the kept entries, and apply
            the sparse matrix 64 times (one block-diagonal CSR product per step for the whole
            batch). Approximate; its error is certified per image (below).
``auto``    CUDA: ``dense``. CPU: ``dense`` for small grids (N <= 24 C), otherwise ``topk`` for
            the images whose certificate is within ``tol`` and ``matvec`` for the others. The
            result is within ``tol`` (+ float rounding) of the reference for every image.

Error certificate. Let ``T'`` be ``T`` with some entries dropped and every column renormalised
over the kept entries, and ``delta_j = (dropped mass of column j of A) / (sum of column j of A)``.
Then ``||T_:j - T'_:j||_1 = 2 delta_j`` and, because column-stochastic matrices average
(never widen the range of) each class row, ``max |M T^s - M T'^s| <= s * max_j delta_j *
max_c (max M_c - min M_c)``. ``matvec`` drops affinities below ``1e-12``: since
``A_jj = 1`` every column sum is at least 1, so ``delta_j <= N * 1e-12`` and the bound is
``2.7e-7`` at N = 4096 with 64 steps -- far below float32 rounding -- and it removes the subnormal
numbers that make CPU matrix products slow. ``topk`` reports the bound of its own truncation.

Measured agreement with the float64 reference (``tests/test_refine.py``,
``benchmarks/results/refine_speed.md``), score maps in [0, 1], N = 1024 and 4096:

* ``dense`` / ``matvec`` in float32: max abs difference <= 1e-4 (observed <= 3.2e-5), the same
  argmax labels; in float64: <= 1e-9.
* ``topk`` (k = 32): exact when N <= k. Within 1e-4 only where neighbourhoods are well separated
  (within-region cosine <~ 0.6, where the walk hardly moves). On clustered embeddings (within-
  region cosine 0.74 - 0.92, what trained embeddings look like) the truncated walk mixes less than
  the dense one: max abs difference 1e-3 - 0.3, argmax labels agree on >= 97% of the cells
  (observed 97.8 - 100%). The certificate always holds but is then large.
* ``auto``: within ``tol`` (default 1e-4) + float32 rounding, always.

Speed on the 2-core development CPU (one thread, N = 4096, C = 7 / 21): ``dense`` ~13 s CPU per
image, ``matvec`` 5-8x faster, ``topk`` ~40x faster; so ``auto`` is ~40-60x faster where top-k is
certified and 5-8x (``matvec``) on clustered embeddings.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PhiLike = Union[torch.Tensor, Sequence[torch.Tensor]]

METHODS = ("auto", "dense", "matvec", "topk")
#: Affinities below this value are dropped by the fast paths (``matvec``, ``topk``); see the
#: module docstring for the resulting error bound (``steps * N * 1e-12``).
MIN_AFFINITY = 1e-12
#: ``auto`` on CPU uses dense squaring when N <= this * C (measured crossover, 2-core AMD EPYC).
SMALL_GRID_PER_CLASS = 24
#: Memory budget (bytes) for the per-chunk ``N x N`` matrices; images are processed in chunks.
DEFAULT_MAX_BYTES = 1 << 30


@dataclass
class WalkReport:
    """What :func:`random_walk` did: the method used for each image and the certified bound.

    ``bounds[b]`` is an upper bound on ``max |result - exact walk|`` contributed by truncating
    the transition matrix (0 for ``dense``; float rounding is not included).
    """

    methods: list[str] = field(default_factory=list)
    bounds: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# affinities


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


def _check_scores(scores: torch.Tensor, n: int) -> torch.Tensor:
    if scores.dim() == 4:
        scores = scores.flatten(2)
    if scores.dim() != 3 or scores.shape[2] != n:
        raise ValueError(
            f"scores: expected [B, C, N] with N = {n} cells (the grid of phi), got {tuple(scores.shape)}"
        )
    return scores


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


def _chunks(batch: int, n: int, itemsize: int, copies: int, max_bytes: int) -> list[slice]:
    per_image = max(1, n * n * itemsize * copies)
    size = max(1, int(max_bytes // per_image))
    return [slice(s, min(batch, s + size)) for s in range(0, batch, size)]


def _select(phi: list[torch.Tensor], sl: slice) -> list[torch.Tensor]:
    return [p[sl] for p in phi]


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
    phis = _as_list(phi)
    x = _check_scores(scores, phis[0].shape[2])
    n = x.shape[2]
    out = torch.empty_like(x)
    for sl in _chunks(x.shape[0], n, x.element_size(), 3, max_bytes):
        T = transition(_select(phis, sl), beta, alpha, None if valid is None else valid[sl])
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
    phis = _as_list(phi)
    x = _check_scores(scores, phis[0].shape[2])
    n = x.shape[2]
    out = torch.empty_like(x)
    for sl in _chunks(x.shape[0], n, x.element_size(), 2, max_bytes):
        A = affinity(_select(phis, sl), beta, alpha, None if valid is None else valid[sl], min_affinity)
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
    phis = _as_list(phi)
    x = _check_scores(scores, phis[0].shape[2])
    n = x.shape[2]
    out = torch.empty_like(x)
    for sl in _chunks(x.shape[0], n, x.element_size(), 2, max_bytes):
        A = affinity(_select(phis, sl), beta, alpha, None if valid is None else valid[sl]).to(x.dtype)
        op, delta = _topk_operator(A, k)
        del A
        out[sl] = _walk_sparse(x[sl], op, steps)
        if report is not None:
            bound = steps * delta.amax(dim=1) * _score_range(x[sl])
            report.methods += ["topk"] * bound.numel()
            report.bounds += bound.tolist()
    return out


def _random_walk_auto_cpu(
    x: torch.Tensor, phis: list[torch.Tensor], steps: int, beta: float, alpha: float,
    valid: torch.Tensor | None, k: int, tol: float, max_bytes: int, report: WalkReport,
) -> torch.Tensor:
    """Per chunk: top-k where its certificate is within ``tol``, exact mat-vecs elsewhere."""
    n = x.shape[2]
    out = torch.empty_like(x)
    for sl in _chunks(x.shape[0], n, x.element_size(), 3, max_bytes):
        xs = x[sl]
        A = affinity(_select(phis, sl), beta, alpha, None if valid is None else valid[sl],
                     MIN_AFFINITY).to(x.dtype)
        op, delta = _topk_operator(A, k)
        # + the affinities below MIN_AFFINITY, already absent from A (<= N * MIN_AFFINITY)
        bound = steps * (delta.amax(dim=1) + n * MIN_AFFINITY) * _score_range(xs)
        ok = bound <= tol
        res = torch.empty_like(xs)
        if bool(ok.all()):
            res = _walk_sparse(xs, op, steps)
        else:
            if bool(ok.any()):
                # the sparse walk is cheap: run it for the chunk, keep the certified images
                res[ok] = _walk_sparse(xs, op, steps)[ok]
            bad = (~ok).nonzero().flatten()
            res[bad] = _walk_steps(xs[bad], column_normalize(A[bad]), steps)
        out[sl] = res
        floor = steps * n * MIN_AFFINITY  # the mat-vec walk's own truncation
        for b in range(xs.shape[0]):
            report.methods.append("topk" if bool(ok[b]) else "matvec")
            report.bounds.append(float(bound[b]) if bool(ok[b]) else floor)
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
    max_bytes: int = DEFAULT_MAX_BYTES,
    return_report: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WalkReport]:
    """Random walk ``M T^(2^squarings)`` (spec 7.2) with a choice of formulation.

    Args:
        scores: score maps [batch, classes, cells] (or [B, C, h, w] on phi's grid).
        phi: unit embeddings [batch, channels, cells] on the same grid, or a sequence of passes.
        method: ``auto`` | ``dense`` | ``matvec`` | ``topk`` (see the module docstring).
            ``auto``: ``dense`` on CUDA; on CPU ``topk`` where certified within ``tol``,
            ``matvec`` elsewhere.
        k: entries kept per column by ``topk`` / ``auto``.
        tol: certified max abs error allowed to ``auto``'s top-k choice.
        valid: optional bool [batch, cells]; padding cells are excluded from the walk.
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
        # small grids: the N^3 squarings are cheap and run at full matrix-product speed
        small = x.shape[2] <= SMALL_GRID_PER_CLASS * x.shape[1]
        method = "dense" if x.device.type == "cuda" or small else "auto-cpu"
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
        out = _random_walk_auto_cpu(x, phis, steps, beta, alpha, valid, k, tol, max_bytes, report)
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
