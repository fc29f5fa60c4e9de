"""Feature-affinity label propagation to unlabelled segments (spec section 5.4, relationship O).

Each query segment looks up its nearest labelled segments by cosine similarity; a neighbour is
accepted when its cosine reaches ``threshold``. The expanded label set of the query is the
multi-hot of the accepted neighbours' labels; a query with no accepted neighbour gets the neutral
all-ones row (positive to every segment, no negatives; pitfall 15) unless ``unknown='zeros'``
asks for the raw official output. No gradient flows through the propagation.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from spml_deploy.errors import ConfigError

__all__ = ["propagate_labels", "affinity_features"]


def affinity_features(phi: Tensor, loc: Tensor, color: Tensor | None = None,
                      phi_scale: float = 0.1) -> Tensor:
    """Per-pixel propagation features ``[phi_scale * phi ; loc ; color]`` (not normalised).

    ``phi``: [B, D, h, w] unit embeddings; ``loc``: [B, 2, h, w] centred coordinates;
    ``color``: optional [B, 3, h, w]. Returns [B, D + 2 (+3), h, w]; pooling them per segment and
    normalising gives the official development features ``normalize(sum [0.1 phi; l; rgb])``.
    """
    parts = [phi_scale * phi, loc.to(phi.dtype)]
    if color is not None:
        parts.append(color.to(phi.dtype))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def propagate_labels(
    queries: Tensor,
    query_batch: Tensor,
    protos: Tensor,
    proto_labels: Tensor,
    proto_batch: Tensor,
    num_classes: int,
    top_k: int = 1,
    threshold: float = 0.95,
    same_image: bool = True,
    unknown: Literal["ones", "zeros"] = "ones",
) -> Tensor:
    """Multi-hot labels of each query from its nearest labelled prototypes.

    ``queries``: [N, F] unit vectors with image ids ``query_batch`` [N]; ``protos``: [M, F] unit
    vectors with labels ``proto_labels`` [M] (labelled iff in ``0..num_classes-1``; unlabelled
    codes ``>= num_classes`` and negative values are never candidates) and image ids
    ``proto_batch`` [M]. Candidates are restricted to the query's image when ``same_image``.
    The ``min(top_k, #candidates)`` candidates of largest cosine are taken (ties: smallest
    prototype index) and those with cosine ``>= threshold`` vote. Returns a long [N, C] 0/1
    tensor; rows without an accepted neighbour are all ones (``unknown='ones'``) or all zeros.
    """
    if unknown not in ("ones", "zeros"):
        raise ConfigError(f"unknown fill mode '{unknown}'", fix="use 'ones' or 'zeros'")
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}", fix="use top_k=1 (official)")
    n, m = queries.shape[0], protos.shape[0]
    out = torch.zeros(n, num_classes, dtype=torch.long, device=queries.device)
    if m > 0 and n > 0:
        sim = queries @ protos.t()                                     # [N, M]
        cand = ((proto_labels >= 0) & (proto_labels < num_classes))[None, :].expand(n, m)
        if same_image:
            cand = cand & (query_batch[:, None] == proto_batch[None, :])
        neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
        sim = torch.where(cand, sim, neg_inf)
        k = min(top_k, m)
        if k == 1:
            val, idx = sim.max(dim=1, keepdim=True)   # first maximal index on ties
        else:
            val, idx = torch.sort(sim, dim=1, descending=True, stable=True)
            val, idx = val[:, :k], idx[:, :k]
        accept = torch.isfinite(val) & (val >= threshold)              # [N, k]
        lab = proto_labels[idx].clamp(0, num_classes - 1)
        out.scatter_add_(1, lab, accept.long())
        out = (out > 0).long()
    if unknown == "ones":
        empty = out.sum(dim=1) == 0
        out[empty] = 1
    return out
