"""The pixel-to-segment contrastive primitive of SPML (spec section 4), in the log domain.

For a pixel ``i`` with unit feature ``f_i`` and a pool of unit segment prototypes ``m_s``, the
logits are ``kappa * f_i . m_s``. The pool is split per pixel into positives ``P_i``, negatives
``N_i`` and excluded entries (neither). With ``P_i^- = P_i minus {own segment}``:

    L(i) = -log( sum_{P_i^-} E / (sum_{P_i^-} E + sum_{N_i} E) )   if P_i^- is non-empty
         = -log( E_own / (E_own + sum_{N_i} E) )                      otherwise

with ``E_s = exp(kappa f_i . m_s)``. Both sums are masked log-sum-exps sharing the row maximum as
shift (excluded entries are ``-inf`` before the exponential); the own segment leaves ``P_i`` by
index, never by subtraction. The numerator set is never empty (it holds at least the own
segment), so no row is all ``-inf`` and gradients stay finite; a pixel without negatives scores
exactly 0 (spec 5.3). When the own segment is *not* a positive (multi-label form with an all-zero
tag row) it lies in ``N_i`` and is therefore counted twice in the denominator, which is the
official behaviour (``compat.set_empty_tag_double_count``); the wrappers skip such pixels by
default.

``compat.subtractive_positive_sum`` is available as ``subtractive=True``: the official float form
``other = sum_{P_i} E - E_own`` in linear space with an ``other > 0`` test. It is ill-conditioned
when the own segment dominates (kappa 16 in float32); use it only to reproduce official numbers.

Two implementations give the same values (up to float rounding):

* ``impl="fused"`` (default; :func:`grouped_contrastive_nll`): the pool splits into groups of
  segments that every pixel treats alike (classes for the single-label form, distinct tag rows for
  the set form, regions for relationship I), so one group reduction of the exponentials
  (``index_add_`` on the CPU, a one-hot matmul elsewhere) gives every masked sum and the set tests
  are exact integer counts. The gradient has a closed form
  (``dL/dz_is = e_is ([s in D_i] / S_D - [s in Num_i] / S_Num)``) applied with two matmuls;
  nothing of size [#pixels x #segments] is saved. For a ``mean``/``sum`` reduction the gradient
  is formed during the forward pass from the same exponentials (so they are computed once);
  per-pixel losses (``reduction="none"``) recompute them in backward. Pixels without any negative
  (loss exactly 0, zero gradient) are dropped before the work.
* ``impl="generic"`` (and always with ``subtractive=True``): :func:`contrastive_nll` on explicit
  [#pixels x #segments] masks under autograd, in chunks, each chunk checkpointed (recomputed
  during backward) when there is more than one. It is the reference the fused path is tested
  against.

Both process pixels in chunks so that a ``[#pixels x #segments]`` matrix never exists for all
pixels at once.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as _checkpoint

from spml_deploy.errors import ConfigError

log = logging.getLogger(__name__)

Reduction = Literal["mean", "sum", "none"]
EmptyMode = Literal["skip", "double_count"]
Impl = Literal["fused", "generic"]

#: Default bound on the number of pixel x segment entries materialised per chunk (2^24 entries:
#: 64 MiB per float32 temporary).
MAX_CHUNK_ELEMENTS = 1 << 24

__all__ = [
    "contrastive_nll",
    "grouped_contrastive_nll",
    "fused_chunk_rows",
    "fused_plan",
    "FusedPlan",
    "reduction_weights",
    "group_counts",
    "segsort_plus_loss",
    "set_segsort_loss",
    "chunk_rows",
    "run_chunked",
    "reduce_losses",
]


def contrastive_nll(
    logits: Tensor,
    pos: Tensor,
    own: Tensor,
    valid: Tensor | None = None,
    *,
    subtractive: bool = False,
) -> Tensor:
    """Per-pixel segsort+ loss from scaled logits and a positive mask.

    ``logits``: [n, P] values ``kappa * f_i . m_s``. ``pos``: [n, P] bool, positives (the own
    segment included whenever the pixel is positively related to it). ``own``: [n] long, the
    column of each pixel's own segment. ``valid``: optional [n, P] bool; entries outside it are
    neither positive nor negative (negatives = valid and not positive). The own entry must be
    valid. Returns [n] losses (>= 0); a pixel without negatives gets exactly 0.

    Log-domain evaluation: every sum is a log-sum-exp shifted by the row maximum over the valid
    entries, and the own segment is removed from the positives *by index* (never by subtracting
    ``E_own``), so nothing cancels. The "another positive exists" test is exact (on the masks). The
    shared shift keeps every term representable while ``2 * kappa`` (the logit range of unit
    vectors) stays below ~80 in float32 (the method uses kappa <= 16).

    ``subtractive=True`` evaluates the official linear-space form (``other = sum(P) - E_own``,
    ``num = other if other > 0 else E_own``, no shift) instead (``compat.subtractive_positive_sum``).
    """
    n, p = logits.shape
    if pos.shape != (n, p) or own.shape != (n,):
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, pos {tuple(pos.shape)}, "
                         f"own {tuple(own.shape)}")
    if valid is not None:
        pos = pos & valid
        neg = valid & ~pos
    else:
        neg = ~pos
    own_col = own.view(n, 1)
    if subtractive:
        e = torch.exp(logits)
        e_own = e.gather(1, own_col).squeeze(1)
        other = (e * pos.to(e.dtype)).sum(1) - e_own
        num = torch.where(other > 0, other, e_own)
        den = num + (e * neg.to(e.dtype)).sum(1)
        return -torch.log(num / den)
    if valid is None:
        z = logits - logits.detach().amax(dim=1, keepdim=True)   # <= 0
    else:
        masked = logits.masked_fill(~valid, float("-inf"))       # excluded: exp(-inf) = 0
        z = masked - masked.detach().amax(dim=1, keepdim=True)
    e = torch.exp(z)
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    pos_other = pos.scatter(1, own_col, False)                   # own removed by index
    has_other = pos_other.any(dim=1)                             # exact test
    s_other = torch.where(pos_other, e, zero).sum(1)
    s_neg = torch.where(neg, e, zero).sum(1)
    z_own = z.gather(1, own_col).squeeze(1)
    e_own = e.gather(1, own_col).squeeze(1)
    one = torch.ones_like(s_other)
    log_num = torch.where(has_other, torch.log(torch.where(has_other, s_other, one)), z_own)
    num = torch.where(has_other, s_other, e_own)
    # An own segment that is also a negative (empty positive set) is counted twice, as specified.
    return torch.log(num + s_neg) - log_num


# ----------------------------------------------------------------------------------------------
# chunking and reduction


def chunk_rows(num_rows: int, num_cols: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit ``MAX_CHUNK_ELEMENTS``."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}",
                              fix="pass a positive number of pixels per chunk or None")
        return chunk_size
    return max(1, min(num_rows, MAX_CHUNK_ELEMENTS // max(1, num_cols)))


def run_chunked(
    fn: Callable[..., Tensor],
    per_row: tuple[Tensor, ...],
    shared: tuple[Tensor, ...],
    num_cols: int,
    chunk_size: int | None,
    use_checkpoint: bool,
) -> Tensor:
    """Concatenate ``fn(*row_chunks, *shared)`` over chunks of the rows of ``per_row``."""
    n = per_row[0].shape[0]
    step = chunk_rows(n, num_cols, chunk_size)
    if n <= step:
        return fn(*per_row, *shared)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*per_row, *shared) if t.is_floating_point())
    outs = []
    for start in range(0, n, step):
        rows = tuple(t[start:start + step] for t in per_row)
        if use_checkpoint and needs_grad:
            outs.append(_checkpoint(fn, *rows, *shared, use_reentrant=False))
        else:
            outs.append(fn(*rows, *shared))
    return torch.cat(outs)


def reduce_losses(losses: Tensor, counted: Tensor | None, reduction: Reduction) -> Tensor:
    """Reduce per-pixel losses [n]; ``counted`` ([n] bool) selects the pixels that count.

    ``none`` returns [n] with uncounted pixels set to 0; ``mean`` divides by the number of counted
    pixels (an empty set gives a differentiable 0).
    """
    if counted is not None:
        losses = torch.where(counted, losses, torch.zeros_like(losses))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        k = losses.shape[0] if counted is None else int(counted.sum())
        return losses.sum() / max(k, 1)
    raise ConfigError(f"unknown reduction '{reduction}'", fix="use 'mean', 'sum' or 'none'")


def _check_pool(emb: Tensor, own: Tensor, protos: Tensor, what: str) -> None:
    if emb.dim() != 2 or protos.dim() != 2 or emb.shape[1] != protos.shape[1]:
        raise ValueError(f"{what}: embeddings {tuple(emb.shape)} and prototypes "
                         f"{tuple(protos.shape)} must be [N, D] and [P, D]")
    if own.shape != (emb.shape[0],):
        raise ValueError(f"{what}: own {tuple(own.shape)} must be [N] with N = {emb.shape[0]}")
    if own.numel() and (int(own.min()) < 0 or int(own.max()) >= protos.shape[0]):
        raise ValueError(f"{what}: own segment indices must lie in [0, {protos.shape[0]})")


# ----------------------------------------------------------------------------------------------
# fused path: group sums and a closed-form gradient

#: Default bound on the pixel x segment entries of one chunk of the fused path on the CPU (2^20:
#: 4 MiB per float32 buffer, so a chunk's work stays in cache; the two buffers are reused
#: across chunks); on other devices ``MAX_CHUNK_ELEMENTS`` applies. The chunk-size sweep that
#: chose it: ``benchmarks/results/loss_speed.md`` (section "CPU chunk size").
FUSED_CPU_CHUNK_ELEMENTS = 1 << 20

#: Off the CPU, up to this many groups the group sums are a matmul against the one-hot group
#: matrix (deterministic); otherwise (and on the CPU, where it is faster) ``index_add_``.
GROUP_MATMUL_MAX = 256

#: On CUDA a chunk holds up to this many pixel x segment entries (2^28: 1 GiB per float32 work
#: buffer, two buffers), bounded by :data:`FUSED_CUDA_MEMORY_FRACTION` of the free memory. The
#: co-occurrence term at crop 512 (131k pixels x 15.5k prototypes, 2e9 entries) is then ~8
#: chunks instead of ~120 of ``MAX_CHUNK_ELEMENTS``: the work is memory-bound elementwise
#: passes over the chunk plus matmuls, and each chunk costs ~20 kernel launches.
FUSED_CUDA_CHUNK_ELEMENTS = 1 << 28
FUSED_CUDA_MEMORY_FRACTION = 0.25

#: With one shared pool (B = 1) and up to this many groups, the gradient coefficients are
#: applied to the contiguous row range of each group (segments sorted by group) in place,
#: instead of gathering them into a second [P, c] buffer first (one fewer pass over the chunk).
GROUP_RANGES_MAX = 64

#: The bound shift (see :class:`FusedPlan`) is used while the largest possible logit
#: ``kappa * max|f| * max|m|`` stays below this: shifted exponentials are then >= exp(-80),
#: far from float32's subnormal range (exp(-87)), so no term loses precision.
BOUND_SHIFT_MAX = 40.0


@dataclass(frozen=True)
class FusedPlan:
    """How the fused primitive runs on a device (same values, up to float rounding).

    ``chunk_elements``: pixel x segment entries per chunk. ``group_matmul``: group sums by a
    one-hot matmul (else ``index_add_``; only up to ``GROUP_MATMUL_MAX`` groups).
    ``bound_shift``: shift each pixel's logits by the Cauchy-Schwarz bound
    ``kappa |f_i| max_s |m_s|`` (folded into the logit matmul as an extra column) instead of
    the row maximum, which saves two passes over the chunk (the maximum and the subtraction);
    the losses and gradients do not depend on the shift. ``group_ranges``: apply the gradient
    coefficients per contiguous group range (see ``GROUP_RANGES_MAX``; B = 1 only).
    """

    chunk_elements: int
    group_matmul: bool = False
    bound_shift: bool = False
    group_ranges: bool = False


def cuda_chunk_elements(device: torch.device) -> int:
    """Entries per chunk of the fused path on a CUDA device: ``FUSED_CUDA_CHUNK_ELEMENTS``,
    bounded by ``FUSED_CUDA_MEMORY_FRACTION`` of its free memory (two float32 buffers), and at
    least ``MAX_CHUNK_ELEMENTS``."""
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(free * FUSED_CUDA_MEMORY_FRACTION) // (2 * 4)
    return max(MAX_CHUNK_ELEMENTS, min(FUSED_CUDA_CHUNK_ELEMENTS, fit))


def fused_plan(device: torch.device, num_groups: int, batch: int) -> FusedPlan:
    """The :class:`FusedPlan` for ``batch`` problems with ``num_groups`` groups on ``device``:
    on the CPU chunks of ``FUSED_CPU_CHUNK_ELEMENTS`` (cache-sized), ``index_add_`` group sums;
    on CUDA large chunks (:func:`cuda_chunk_elements`) and one-hot matmul group sums; on both
    the bound shift and (one shared pool) group ranges, which made the co-occurrence term's
    forward + backward 23-25 % faster on the 2-core development CPU
    (``benchmarks/results/train_step_cpu.md``); elsewhere ``MAX_CHUNK_ELEMENTS`` and the
    one-hot matmul."""
    if device.type == "cpu":
        return FusedPlan(FUSED_CPU_CHUNK_ELEMENTS, bound_shift=True,
                         group_ranges=batch == 1 and num_groups <= GROUP_RANGES_MAX)
    matmul = num_groups <= GROUP_MATMUL_MAX
    if device.type == "cuda":
        return FusedPlan(cuda_chunk_elements(device), matmul, True,
                         batch == 1 and num_groups <= GROUP_RANGES_MAX)
    return FusedPlan(MAX_CHUNK_ELEMENTS, matmul)


def group_sums_by_matmul(device: torch.device, num_groups: int) -> bool:
    """Whether the fused path sums per group with a one-hot matmul (else ``index_add_``)."""
    return device.type != "cpu" and num_groups <= GROUP_MATMUL_MAX


def fused_chunk_rows(num_rows: int, num_cols: int, chunk_size: int | None,
                     device: torch.device, plan: FusedPlan | None = None) -> int:
    """Pixels per chunk of the fused path (``chunk_size`` if given, else from the plan)."""
    if chunk_size is not None:
        return chunk_rows(num_rows, num_cols, chunk_size)
    elements = (plan or fused_plan(device, 1, 1)).chunk_elements
    return max(1, min(num_rows, elements // max(1, num_cols)))


class _Problem:
    """Per-call data of the fused primitive shared by its chunks (see grouped_contrastive_nll).

    Work matrices are segment-major, ``[B, P, c]`` for a chunk of ``c`` pixels: the per-pixel
    reductions run over rows, group sums are row additions (``index_add_``) or a one-hot matmul,
    and the per-(group, pixel) coefficients multiply the rows of each group: by a row gather
    (``index_select``) into a second buffer, or, with ``ranges`` (segments sorted by group), in
    place on each group's contiguous rows. ``plan``: see :class:`FusedPlan`.
    """

    def __init__(self, feat: Tensor, protos: Tensor, seg_group: Tensor, counts: Tensor,
                 pos: Tensor, neg: Tensor, own: Tensor, kappa: float, step: int,
                 plan: FusedPlan, ranges: tuple[tuple[int, int, int], ...] | None = None):
        b, n, _ = feat.shape
        p, g = protos.shape[1], pos.shape[2]
        self.b, self.n, self.p, self.g, self.step, self.kappa = b, n, p, g, step, kappa
        dtype, device = feat.dtype, feat.device
        self.feat, self.protos, self.own = feat, protos, own
        self.kf_t = (feat * kappa).transpose(1, 2).contiguous()             # [B, D, n]
        # row of each segment in the flattened [B * G] group axis
        self.flat_group = (seg_group + g * torch.arange(b, device=device).unsqueeze(1)).view(-1)
        self.onehot_t = None                                                 # [B, G, P]
        if plan.group_matmul and g <= GROUP_MATMUL_MAX:
            self.onehot_t = torch.nn.functional.one_hot(seg_group, g).to(dtype).transpose(1, 2)
        self.ranges = ranges               # (group, first row, end row): segments sorted by group
        self.protos_aug: Tensor | None = None
        self.bound: Tensor | None = None                                     # [B, n] shifts
        if plan.bound_shift:
            bound = kappa * feat.norm(dim=2) * protos.norm(dim=2).amax(1, keepdim=True)
            if float(bound.max()) <= BOUND_SHIFT_MAX:                        # one host sync
                self.bound = bound
        counts = counts.unsqueeze(1)                                         # [B, 1, G]
        own_g = seg_group.gather(1, own).unsqueeze(2)                        # [B, n, 1]
        self.own_neg = neg.gather(2, own_g).squeeze(2)
        zero_l = torch.zeros((), dtype=torch.long, device=device)
        # exact set tests on integer counts: another positive exists / a negative exists
        self.has_other = (torch.where(pos, counts, zero_l).sum(2)
                          - pos.gather(2, own_g).squeeze(2).long()) > 0
        self.has_neg = torch.where(neg, counts, zero_l).sum(2) > 0
        self.pos_t = pos.to(dtype).transpose(1, 2).contiguous()              # [B, G, n]
        self.neg_t = neg.to(dtype).transpose(1, 2).contiguous()
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.flat_e: Tensor | None = None                                    # reused buffers
        self.flat_w: Tensor | None = None

    def buffers(self, sl: slice) -> tuple[Tensor, Tensor]:
        """Two [B, P, c] work buffers for a chunk (views of flat buffers allocated once)."""
        if self.flat_e is None:
            self.flat_e = self.feat.new_empty(self.b * min(self.step, self.n) * self.p)
            self.flat_w = self.flat_e if self.ranges is not None else torch.empty_like(self.flat_e)
        c = sl.stop - sl.start
        size = self.b * self.p * c
        return (self.flat_e[:size].view(self.b, self.p, c),
                self.flat_w[:size].view(self.b, self.p, c))

    def chunks(self):
        for start in range(0, self.n, self.step):
            yield slice(start, min(self.n, start + self.step))

    def forward_chunk(self, sl: slice) -> tuple[Tensor, ...]:
        """Sums ``S_Num``, ``S_D`` [B, c] (see :meth:`losses`), the shifted own logit and the shift
        [B, c], coefficients [B, G, c] of the non-own entries, the own coefficient times
        ``E_own`` [B, c], and the exponentials [B, P, c] (own entry zeroed)."""
        o = self.own[:, sl].unsqueeze(1)                                     # [B, 1, c]
        if self.bound is not None:                   # kappa m.f - bound in one matmul, <= 0
            shift = self.bound[:, sl]
            e = self.recompute(sl, shift, exp=False)
        else:
            e, _ = self.buffers(sl)
            torch.bmm(self.protos, self.kf_t[:, :, sl], out=e)               # kappa m.f
            shift = e.amax(dim=1)                                            # row maximum
            e.sub_(shift.unsqueeze(1))
        z_own = e.gather(1, o).squeeze(1)                                    # shifted own logit
        e.exp_()
        e_own = e.gather(1, o).squeeze(1)
        e.scatter_(1, o, 0.0)                                                # own out, by index
        c = e.shape[2]
        if self.onehot_t is not None:
            grouped = torch.bmm(self.onehot_t, e)                            # [B, G, c]
        else:
            grouped = e.new_zeros(self.b * self.g, c).index_add_(
                0, self.flat_group, e.view(self.b * self.p, c)).view(self.b, self.g, c)
        pt, nt, zero = self.pos_t[:, :, sl], self.neg_t[:, :, sl], self.zero
        s_pos, s_neg = (grouped * pt).sum(1), (grouped * nt).sum(1)
        ho, hn, on = self.has_other[:, sl], self.has_neg[:, sl], self.own_neg[:, sl]
        s_num = torch.where(ho, s_pos, e_own)
        s_neg = s_neg + torch.where(on, e_own, zero)                         # double count
        s_den = s_num + s_neg
        # dL/dz: other entries by (group, pixel), the own entry by pixel; 0 without negatives
        inv_den = torch.where(hn, 1.0 / s_den, zero)
        num_coef = -s_neg * inv_den / s_num                                  # 1/S_D - 1/S_Num
        coef = pt * torch.where(ho, num_coef, zero).unsqueeze(1) + nt * inv_den.unsqueeze(1)
        own_coef = (torch.where(ho, zero, num_coef) + torch.where(on, inv_den, zero)) * e_own
        return s_num, s_den, z_own, shift, coef, own_coef, e

    def losses(self, s_num: Tensor, s_den: Tensor, z_own: Tensor) -> Tensor:
        """``log S_D - log S_Num`` [B, n] (the fallback numerator's log is its logit; 0 without
        negatives). One ``log`` call for all chunks: on some CPU builds each call of a
        transcendental function costs a thread wake-up, whatever its size."""
        logs = torch.log(torch.stack([s_den, torch.where(self.has_other, s_num, 1.0)]))
        log_num = torch.where(self.has_other, logs[1], z_own)
        return torch.where(self.has_neg, logs[0] - log_num, self.zero)

    def recompute(self, sl: slice, shift: Tensor, exp: bool = True) -> Tensor:
        """The exponentials of a chunk again (``exp=False``: the shifted logits), the shift
        [B, c] folded into the matmul."""
        e, _ = self.buffers(sl)
        if self.protos_aug is None:
            self.protos_aug = torch.cat([self.protos, self.protos.new_ones(self.b, self.p, 1)], 2)
        kf_aug_t = torch.cat([self.kf_t[:, :, sl], -shift.unsqueeze(1)], 1)  # [m, 1].[kf; -shift]
        torch.bmm(self.protos_aug, kf_aug_t, out=e)
        return e.exp_() if exp else e

    def gradient_chunk(self, sl: slice, e: Tensor, coef: Tensor, own_coef: Tensor,
                       grad_m: Tensor | None, need_f: bool) -> Tensor | None:
        """``W = e * coef[group]`` with the own entry set, then ``grad_m += W @ F`` and
        ``W^T @ M`` (returned if ``need_f``, [B, c, D]); the coefficients already hold kappa and
        the output gradients."""
        c = e.shape[2]
        if self.ranges is not None:                  # segments sorted by group, B = 1
            for g, lo, hi in self.ranges:
                e[:, lo:hi].mul_(coef[:, g:g + 1])
        else:
            _, w = self.buffers(sl)
            torch.index_select(coef.reshape(self.b * self.g, c), 0, self.flat_group,
                               out=w.view(self.b * self.p, c))
            e.mul_(w)
        e.scatter_(1, self.own[:, sl].unsqueeze(1), own_coef.unsqueeze(1))
        if grad_m is not None:
            grad_m.baddbmm_(e, self.feat[:, sl])
        return torch.bmm(e.transpose(1, 2), self.protos) if need_f else None


class _GroupedNLL(torch.autograd.Function):
    """The fused primitive. ``weights`` None: per-pixel losses [B, n]; backward recomputes each
    chunk's exponentials and applies the closed-form gradient
    ``dL/dz_is = e_is ([s in D_i] / S_D - [s in Num_i] / S_Num)`` (``D_i`` = numerator set plus
    negatives, the own segment counted twice when it is both) through ``grad f = W M`` and
    ``grad M = W^T F``. ``weights`` [B, n]: the scalar ``sum w_i L_i``, whose gradient is formed
    during the forward pass from the same exponentials (when ``need_grad``); backward scales it.
    """

    @staticmethod
    def forward(ctx, feat: Tensor, protos: Tensor, seg_group: Tensor, counts: Tensor, pos: Tensor,
                neg: Tensor, own: Tensor, weights: Tensor | None, kappa: float, step: int,
                need_grad: bool, plan: FusedPlan,
                ranges: tuple[tuple[int, int, int], ...] | None) -> Tensor:
        prob = _Problem(feat, protos, seg_group, counts, pos, neg, own, kappa, step, plan, ranges)
        sums: list[tuple[Tensor, Tensor, Tensor]] = []
        shifts, coefs, own_coefs, grad_f = [], [], [], []
        eager = need_grad and weights is not None
        need_f = eager and ctx.needs_input_grad[0]
        grad_m = torch.zeros_like(protos) if eager and ctx.needs_input_grad[1] else None
        for sl in prob.chunks():
            s_num, s_den, z_own, shift, coef, own_coef, e = prob.forward_chunk(sl)
            sums.append((s_num, s_den, z_own))
            if weights is None:
                shifts.append(shift)
                coefs.append(coef)
                own_coefs.append(own_coef)
            elif eager:
                scale = kappa * weights[:, sl]
                grad_f.append(prob.gradient_chunk(sl, e, coef * scale.unsqueeze(1),
                                                  own_coef * scale, grad_m, need_f))
        losses = prob.losses(*(torch.cat(t, 1) for t in zip(*sums)))
        prob.flat_e = prob.flat_w = None
        if weights is None:
            ctx.prob = prob
            ctx.save_for_backward(feat, protos, torch.cat(shifts, 1), torch.cat(coefs, 2),
                                  torch.cat(own_coefs, 1))
            ctx.weighted = False
            return losses
        ctx.weighted = True
        if eager:
            ctx.save_for_backward(torch.cat(grad_f, 1) if need_f else None, grad_m)
        return (losses * weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        need_f, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 11
        if ctx.weighted:
            grad_f, grad_m = ctx.saved_tensors
            return ((grad_out * grad_f if need_f else None),
                    (grad_out * grad_m if need_m else None), *none)
        _, _, shift, coef, own_coef = ctx.saved_tensors      # feat, protos: version check
        prob: _Problem = ctx.prob
        scale = (prob.kappa * grad_out).to(coef.dtype)                       # dz/df = kappa m
        coef = coef * scale.unsqueeze(1)
        own_coef = own_coef * scale
        grad_f: list[Tensor] = []
        grad_m = torch.zeros_like(prob.protos) if need_m else None
        for sl in prob.chunks():
            e = prob.recompute(sl, shift[:, sl])
            grad_f.append(prob.gradient_chunk(sl, e, coef[:, :, sl], own_coef[:, sl], grad_m,
                                              need_f))
        prob.flat_e = prob.flat_w = None
        return (torch.cat(grad_f, 1) if need_f else None), grad_m, *none


def grouped_contrastive_nll(
    feat: Tensor,
    protos: Tensor,
    seg_group: Tensor,
    pos: Tensor,
    own: Tensor,
    kappa: float,
    neg: Tensor | None = None,
    *,
    weights: Tensor | None = None,
    chunk_size: int | None = None,
    plan: FusedPlan | None = None,
) -> Tensor:
    """Segsort+ losses (spec 4) when the pool splits into groups of segments.

    ``feat``: [B, n, D] unit pixel features; ``protos``: [B, P, D] unit prototypes (B independent
    problems, e.g. images; B = 1 for one shared pool); ``seg_group``: [B, P] long in ``0..G-1``,
    the group of each segment; ``pos``: [B, n, G] bool, whether the segments of group g are
    positives of pixel i; ``neg``: optional [B, n, G] bool, negatives (default: ``~pos``; a group
    in neither set is excluded, e.g. padding); ``own``: [B, n] long, the column of each pixel's own
    segment. The losses equal :func:`contrastive_nll` on the expanded masks: log-domain, own
    segment removed by index, exact set tests, the own segment counted twice when it is a
    negative and the fallback numerator, exactly 0 without negatives.

    Returns [B, n] per-pixel losses, or with ``weights`` ([B, n], treated as constants) the
    scalar ``sum w_i L_i`` (e.g. a masked mean); then the gradient is formed in the forward pass
    (when autograd needs it), so the exponentials are computed once. Gradients come from a closed
    form: no autograd graph over [n, P] matrices and nothing of that size is saved. Pixels
    without a negative (or of weight 0) in all of the B problems are dropped first (one host
    sync); the others are processed in chunks of ``chunk_size`` pixels (default: the chunk size
    of the device's :class:`FusedPlan`, :func:`fused_plan`: ``FUSED_CPU_CHUNK_ELEMENTS`` entries
    on the CPU, up to ``FUSED_CUDA_CHUNK_ELEMENTS`` on CUDA). ``plan``: another plan (tests run
    the CUDA plan on the CPU). Not twice differentiable.
    """
    b, n, d = feat.shape
    p = protos.shape[1]
    if (protos.shape != (b, p, d) or seg_group.shape != (b, p) or pos.dim() != 3
            or pos.shape[:2] != (b, n) or own.shape != (b, n)
            or (neg is not None and neg.shape != pos.shape)
            or (weights is not None and weights.shape != (b, n))):
        raise ValueError(f"shape mismatch: feat {tuple(feat.shape)}, protos {tuple(protos.shape)}, "
                         f"seg_group {tuple(seg_group.shape)}, pos {tuple(pos.shape)}, "
                         f"own {tuple(own.shape)}")
    if neg is None:
        neg = ~pos
    seg_group, own = seg_group.long(), own.long()
    if weights is not None:
        weights = weights.to(feat.dtype).detach()
    if n == 0 or p == 0:
        zeros = feat.new_zeros(b, n) + 0.0 * (feat.sum() + protos.sum())
        return zeros if weights is None else zeros.sum()
    counts = group_counts(seg_group, pos.shape[2])
    # Pixels without any negative score exactly 0 with a zero gradient, and pixels of weight 0
    # do not count: only the others are computed (rows that count in at least one of the B
    # problems; one host sync).
    active = (neg & (counts.unsqueeze(1) > 0)).any(2)
    if weights is not None:
        active &= weights != 0
    keep = torch.nonzero(active.any(0)).squeeze(1)
    k = int(keep.numel())
    if k == 0:
        zeros = feat.new_zeros(b, n) + 0.0 * (feat.sum() + protos.sum())
        return zeros if weights is None else zeros.sum()
    sub_feat = feat
    if k < n:
        sub_feat, pos, neg, own = feat[:, keep], pos[:, keep], neg[:, keep], own[:, keep]
        weights = None if weights is None else weights[:, keep]
    g = pos.shape[2]
    plan = plan or fused_plan(feat.device, g, b)
    step = fused_chunk_rows(k, b * p, chunk_size, feat.device, plan)
    need_grad = torch.is_grad_enabled() and (feat.requires_grad or protos.requires_grad)
    ranges = None
    if plan.group_ranges and b == 1 and g <= GROUP_RANGES_MAX:
        # segments sorted by group (a differentiable gather of the prototypes; autograd takes
        # their gradient back to the original order), own ids renumbered
        order = torch.argsort(seg_group[0], stable=True)
        rank = torch.empty_like(order).index_copy_(0, order, torch.arange(p, device=order.device))
        protos, seg_group, own = protos[:, order], seg_group[:, order], rank[own]
        sizes = counts[0].tolist()                                           # one host sync
        ends = list(itertools.accumulate(sizes))
        ranges = tuple((gi, end - size, end) for gi, (end, size) in enumerate(zip(ends, sizes))
                       if size > 0)
    out = _GroupedNLL.apply(sub_feat, protos, seg_group, counts, pos, neg, own, weights,
                            float(kappa), step, need_grad, plan, ranges)
    if weights is None and k < n:
        out = feat.new_zeros(b, n).index_copy(1, keep, out)
    return out


def group_counts(seg_group: Tensor, num_groups: int) -> Tensor:
    """Number of segments per group [B, G] of a [B, P] group-index matrix."""
    counts = torch.zeros(seg_group.shape[0], num_groups, dtype=torch.long, device=seg_group.device)
    return counts.scatter_add_(1, seg_group, torch.ones_like(seg_group))


# ----------------------------------------------------------------------------------------------
# single-label and multi-label wrappers


def _unique_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of a [P, T] bool matrix and the row index of each: ``([G, T], [P])``.

    Up to 62 columns the rows are packed into int64 codes (a 1-d unique, much faster than
    ``torch.unique(dim=0)``).
    """
    t = rows.shape[1]
    if t > 62 or rows.shape[0] == 0:
        return torch.unique(rows, dim=0, return_inverse=True)
    weights = torch.pow(2, torch.arange(t, device=rows.device, dtype=torch.long))
    codes, group = torch.unique((rows.long() * weights).sum(1), return_inverse=True)
    return (codes.unsqueeze(1) // weights) % 2 == 1, group


def reduction_weights(counted: Tensor, reduction: Reduction, dtype: torch.dtype) -> Tensor:
    """Per-pixel weights (same shape as ``counted``, bool) of a ``sum`` or ``mean`` reduction
    over the counted pixels (``mean`` of an empty set: all weights 0)."""
    w = counted.to(dtype)
    if reduction == "sum":
        return w
    if reduction == "mean":
        return w / counted.sum().clamp(min=1).to(dtype)
    raise ConfigError(f"unknown reduction '{reduction}'", fix="use 'mean', 'sum' or 'none'")


def _fused_reduced(emb: Tensor, protos: Tensor, group: Tensor, pos: Tensor, own: Tensor,
                   kappa: float, counted: Tensor | None, reduction: Reduction,
                   chunk_size: int | None) -> Tensor:
    """The fused primitive on one shared pool ([N, D] pixels, [P, D] prototypes, [N, G] positive
    groups), reduced like :func:`reduce_losses`."""
    if reduction == "none":
        losses = grouped_contrastive_nll(emb[None], protos[None], group.view(1, -1), pos[None],
                                         own[None], kappa, chunk_size=chunk_size)[0]
        return reduce_losses(losses, counted, reduction)
    if counted is None:
        counted = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    weights = reduction_weights(counted, reduction, emb.dtype)
    return grouped_contrastive_nll(emb[None], protos[None], group.view(1, -1), pos[None],
                                   own[None], kappa, weights=weights[None], chunk_size=chunk_size)


def _check_impl(impl: str) -> None:
    if impl not in ("fused", "generic"):
        raise ConfigError(f"unknown loss implementation '{impl}'", fix="use 'fused' or 'generic'")


def segsort_plus_loss(
    emb: Tensor,
    labels: Tensor,
    own: Tensor,
    protos: Tensor,
    proto_labels: Tensor,
    kappa: float,
    *,
    reduction: Reduction = "mean",
    subtractive: bool = False,
    chunk_size: int | None = None,
    checkpoint: bool = True,
    impl: Impl = "fused",
) -> Tensor:
    """Single-label segsort+ loss: positives are the pool entries with the pixel's label.

    ``emb``: [N, D] unit pixel features; ``labels``: [N] long; ``own``: [N] long, row of each
    pixel's own segment in ``protos`` ([P, D] unit prototypes); ``proto_labels``: [P] long.
    Returns the mean (scalar), sum, or [N] per-pixel losses. ``impl``: ``fused`` (groups = the
    distinct prototype labels) or ``generic`` (explicit masks; ``checkpoint`` applies only there);
    ``subtractive`` always uses the generic code.
    """
    _check_pool(emb, own, protos, "segsort_plus_loss")
    _check_impl(impl)
    if impl == "fused" and not subtractive:
        classes, group = torch.unique(proto_labels, return_inverse=True)
        pos = labels.view(-1, 1) == classes.view(1, -1)                     # [N, G]
        return _fused_reduced(emb, protos, group, pos, own, kappa, None, reduction, chunk_size)

    def chunk(e: Tensor, y: Tensor, o: Tensor, m: Tensor, ym: Tensor) -> Tensor:
        logits = kappa * (e @ m.t())
        return contrastive_nll(logits, y[:, None] == ym[None, :], o, subtractive=subtractive)

    losses = run_chunked(chunk, (emb, labels, own), (protos, proto_labels),
                          protos.shape[0], chunk_size, checkpoint)
    return reduce_losses(losses, None, reduction)


def set_segsort_loss(
    emb: Tensor,
    tags: Tensor,
    own: Tensor,
    protos: Tensor,
    proto_tags: Tensor,
    kappa: float,
    *,
    empty: EmptyMode = "skip",
    reduction: Reduction = "mean",
    subtractive: bool = False,
    chunk_size: int | None = None,
    checkpoint: bool = True,
    impl: Impl = "fused",
) -> Tensor:
    """Multi-label ("set") segsort+ loss: positives share at least one tag with the pixel.

    ``emb``: [N, D] unit pixel features; ``tags``: [N, T] multi-hot (bool or 0/1); ``own``: [N]
    long; ``protos``: [P, D]; ``proto_tags``: [P, T]. A pixel whose tag row is all zero has no
    positive: ``empty='skip'`` (paper default) leaves it out (0 in ``none``, not counted by
    ``mean``); ``empty='double_count'`` (official, ``compat.set_empty_tag_double_count``) scores
    it ``-log(E_own / (E_own + sum_all E))``. A pixel with no negatives contributes 0.
    ``impl``: ``fused`` (groups = the distinct prototype tag rows) or ``generic`` (explicit masks;
    ``checkpoint`` applies only there); ``subtractive`` always uses the generic code.
    """
    _check_pool(emb, own, protos, "set_segsort_loss")
    if tags.dim() != 2 or proto_tags.dim() != 2 or tags.shape[1] != proto_tags.shape[1]:
        raise ValueError(f"set_segsort_loss: tags {tuple(tags.shape)} and prototype tags "
                         f"{tuple(proto_tags.shape)} must be [N, T] and [P, T]")
    if empty not in ("skip", "double_count"):
        raise ConfigError(f"unknown empty-tag mode '{empty}'", fix="use 'skip' or 'double_count'")
    _check_impl(impl)
    tags_f = (tags != 0).to(emb.dtype)
    proto_tags_f = (proto_tags != 0).to(emb.dtype)
    counted = None if empty == "double_count" else tags_f.sum(1) > 0
    if impl == "fused" and not subtractive:
        rows, group = _unique_rows(proto_tags != 0)
        pos = (tags_f @ rows.to(emb.dtype).t()) > 0                          # [N, G]
        return _fused_reduced(emb, protos, group, pos, own, kappa, counted, reduction, chunk_size)

    def chunk(e: Tensor, t: Tensor, o: Tensor, m: Tensor, tm: Tensor) -> Tensor:
        logits = kappa * (e @ m.t())
        return contrastive_nll(logits, (t @ tm.t()) > 0, o, subtractive=subtractive)

    losses = run_chunked(chunk, (emb, tags_f, own), (protos, proto_tags_f),
                          protos.shape[0], chunk_size, checkpoint)
    return reduce_losses(losses, counted, reduction)
