"""kNN label retrieval over a plain memory of prototypes (spec 7.3), with the exact search of
:class:`~spml_deploy.engine.index.exact.MemoryMatrix`: the reference functions of the spec
(golden cases), for callers that hold a memory and its labels as arrays."""
from __future__ import annotations

import torch

from spml_deploy.engine.index.common import ArrayLike, as_tensor, check_labels, vote_of
from spml_deploy.engine.index.exact import MemoryMatrix
from spml_deploy.errors import SpmlError


def knn_labels(
    query: ArrayLike, memory: ArrayLike | MemoryMatrix, memory_labels: ArrayLike, k: int = 20,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and cosines of the ``k`` most similar memory rows, by decreasing similarity.

    Args:
        query: unit query embeddings [queries, dim].
        memory: unit memory prototypes [memory, dim], or a :class:`MemoryMatrix` of them.
        memory_labels: class of every memory row [memory] (int).
        k: neighbours; clipped to the memory size (pitfall 17).
        method: search method of :meth:`MemoryMatrix.topk` (all exact).

    Returns:
        (labels [queries, k'] int64, similarities [queries, k']), ``k' = min(k, memory)``.
    """
    q = as_tensor(query)
    mm = memory if isinstance(memory, MemoryMatrix) else None
    m = mm.memory if mm is not None else as_tensor(memory)
    if q.dim() != 2 or m.dim() != 2 or q.shape[1] != m.shape[1]:
        raise ValueError(f"query [Q, D] and memory [M, D] expected, got {tuple(q.shape)} and "
                         f"{tuple(m.shape)}")
    lab = as_tensor(memory_labels).to(device=q.device, dtype=torch.int64)
    if lab.shape != (m.shape[0],):
        raise ValueError(f"memory_labels: expected [{m.shape[0]}], got {tuple(lab.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if m.shape[0] == 0:
        raise SpmlError("kNN retrieval over an empty prototype memory",
                        fix="build the memory from at least one labelled image")
    mm = (mm.to(device=q.device, dtype=q.dtype) if mm is not None
          else MemoryMatrix(m.to(device=q.device, dtype=q.dtype)))
    sim, ind = mm.topk(q, min(k, m.shape[0]), method=method)
    return lab[ind], sim


def _classes(labels: torch.Tensor, num_classes: int | None) -> int:
    if num_classes is None:
        return int(labels.max()) + 1 if labels.numel() else 1
    return int(num_classes)


def topk_vote(
    query: ArrayLike, memory: ArrayLike | MemoryMatrix, memory_labels: ArrayLike, k: int = 20,
    num_classes: int | None = None, method: str = "auto",
) -> torch.Tensor:
    """Majority label of the ``k`` nearest memory prototypes (spec 7.3), ties -> smallest id.

    Shapes and ``method`` as in :func:`knn_labels`; ``num_classes`` defaults to
    ``max(memory_labels) + 1``. Returns labels [queries] int64.
    """
    lab = as_tensor(memory_labels).to(torch.int64)
    c = _classes(lab, num_classes)
    check_labels(lab, c, "memory_labels")
    nbr, _ = knn_labels(query, memory, lab, k, method=method)
    return vote_of(nbr, c, soft=False)


def soft_vote(
    query: ArrayLike, memory: ArrayLike | MemoryMatrix, memory_labels: ArrayLike, k: int = 20,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Fraction of the ``k`` nearest prototypes in each class: [queries, classes] (rows sum to
    1), in the dtype of ``query`` when floating (float32 otherwise)."""
    lab = as_tensor(memory_labels).to(torch.int64)
    c = _classes(lab, num_classes)
    check_labels(lab, c, "memory_labels")
    nbr, sim = knn_labels(query, memory, lab, k)
    return vote_of(nbr, c, soft=True, dtype=sim.dtype if sim.is_floating_point() else torch.float32)
