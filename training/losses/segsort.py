"""Single-label and multi-label segsort+ losses on one shared pool of prototypes, through the
fused or the reference primitive."""
from __future__ import annotations

import torch
from torch import Tensor

from spml_deploy.errors import ConfigError
from spml_deploy.training.losses.fused import grouped_contrastive_nll
from spml_deploy.training.losses.reference import (EmptyMode, Impl, Reduction, contrastive_nll,
                                                   reduce_losses, run_chunked)


def _check_pool(emb: Tensor, own: Tensor, protos: Tensor, what: str) -> None:
    if emb.dim() != 2 or protos.dim() != 2 or emb.shape[1] != protos.shape[1]:
        raise ValueError(f"{what}: embeddings {tuple(emb.shape)} and prototypes "
                         f"{tuple(protos.shape)} must be [N, D] and [P, D]")
    if own.shape != (emb.shape[0],):
        raise ValueError(f"{what}: own {tuple(own.shape)} must be [N] with N = {emb.shape[0]}")
    if own.numel() and (int(own.min()) < 0 or int(own.max()) >= protos.shape[0]):
        raise ValueError(f"{what}: own segment indices must lie in [0, {protos.shape[0]})")


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
