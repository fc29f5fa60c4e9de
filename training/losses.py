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

Pixels are processed in chunks so that a ``[#pixels x #segments]`` matrix never exists for all
pixels at once (masks are built per chunk from labels/tags); with gradients enabled and more than
one chunk, each chunk is checkpointed (recomputed during backward), so the saved activations are
bounded by one chunk as well.
"""
from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from spml_deploy.errors import ConfigError

log = logging.getLogger(__name__)

Reduction = Literal["mean", "sum", "none"]
EmptyMode = Literal["skip", "double_count"]

#: Default bound on the number of pixel x segment entries materialised per chunk (2^24 entries:
#: 64 MiB per float32 temporary).
MAX_CHUNK_ELEMENTS = 1 << 24

__all__ = [
    "contrastive_nll",
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
# single-label and multi-label wrappers


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
) -> Tensor:
    """Single-label segsort+ loss: positives are the pool entries with the pixel's label.

    ``emb``: [N, D] unit pixel features; ``labels``: [N] long; ``own``: [N] long, row of each
    pixel's own segment in ``protos`` ([P, D] unit prototypes); ``proto_labels``: [P] long.
    Returns the mean (scalar), sum, or [N] per-pixel losses.
    """
    _check_pool(emb, own, protos, "segsort_plus_loss")

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
) -> Tensor:
    """Multi-label ("set") segsort+ loss: positives share at least one tag with the pixel.

    ``emb``: [N, D] unit pixel features; ``tags``: [N, T] multi-hot (bool or 0/1); ``own``: [N]
    long; ``protos``: [P, D]; ``proto_tags``: [P, T]. A pixel whose tag row is all zero has no
    positive: ``empty='skip'`` (paper default) leaves it out (0 in ``none``, not counted by
    ``mean``); ``empty='double_count'`` (official, ``compat.set_empty_tag_double_count``) scores
    it ``-log(E_own / (E_own + sum_all E))``. A pixel with no negatives contributes 0.
    """
    _check_pool(emb, own, protos, "set_segsort_loss")
    if tags.dim() != 2 or proto_tags.dim() != 2 or tags.shape[1] != proto_tags.shape[1]:
        raise ValueError(f"set_segsort_loss: tags {tuple(tags.shape)} and prototype tags "
                         f"{tuple(proto_tags.shape)} must be [N, T] and [P, T]")
    if empty not in ("skip", "double_count"):
        raise ConfigError(f"unknown empty-tag mode '{empty}'", fix="use 'skip' or 'double_count'")
    tags_f = (tags != 0).to(emb.dtype)
    proto_tags_f = (proto_tags != 0).to(emb.dtype)

    def chunk(e: Tensor, t: Tensor, o: Tensor, m: Tensor, tm: Tensor) -> Tensor:
        logits = kappa * (e @ m.t())
        return contrastive_nll(logits, (t @ tm.t()) > 0, o, subtractive=subtractive)

    losses = run_chunked(chunk, (emb, tags_f, own), (protos, proto_tags_f),
                          protos.shape[0], chunk_size, checkpoint)
    counted = None if empty == "double_count" else tags_f.sum(1) > 0
    return reduce_losses(losses, counted, reduction)
