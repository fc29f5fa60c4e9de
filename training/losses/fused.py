"""The fused (``impl="fused"``, default) contrastive primitive: group sums and a closed-form
gradient.

In :func:`grouped_contrastive_nll` the pool splits into groups of segments that every pixel
treats alike (classes for the single-label form, distinct tag rows for the set form, regions for relationship I), so one group reduction of the exponentials
(``index_add_`` on the CPU, a one-hot matmul elsewhere) gives every masked sum and the set tests
are exact integer counts. The gradient has a closed form
(``dL/dz_is = e_is ([s in D_i] / S_D - [s in Num_i] / S_Num)``) applied with two matmuls;
nothing of size [#pixels x #segments] is saved. For a ``mean``/``sum`` reduction the gradient
is formed during the forward pass from the same exponentials (so they are computed once);
per-pixel losses (``reduction="none"``) recompute them in backward. Pixels without any negative
(loss exactly 0, zero gradient) are dropped before the work.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from spml_deploy.training.losses.plan import (BOUND_SHIFT_MAX, GROUP_MATMUL_MAX, GROUP_RANGES_MAX, FusedPlan,
                                              fused_chunk_rows, fused_plan)


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
