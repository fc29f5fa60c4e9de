"""The reference (``impl="generic"``) form of the contrastive primitive, chunking and reduction.

``impl="generic"`` (and always with ``subtractive=True``): :func:`contrastive_nll` on explicit
[#pixels x #segments] masks under autograd, in chunks (:func:`run_chunked`), each chunk
checkpointed (recomputed during backward) when there is more than one. It is the reference the
fused path is tested against.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from spml_deploy.errors import ConfigError

Reduction = Literal["mean", "sum", "none"]
EmptyMode = Literal["skip", "double_count"]
Impl = Literal["fused", "generic"]

#: Default bound on the number of pixel x segment entries materialised per chunk (2^24 entries:
#: 64 MiB per float32 temporary).
MAX_CHUNK_ELEMENTS = 1 << 24


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
