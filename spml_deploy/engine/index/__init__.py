"""The prototype index: one object for a set of unit prototypes with ids and labels (spec 7.3).

Every index holds vectors [N, D] (unit float32), ids [N] int64 and labels [N] int (-1 = none)
and answers ``search(queries, k) -> (scores, ids)`` and ``vote(queries, k, num_classes,
soft=False)`` (majority label [M], or per-class fractions [M, C]); ``add``, ``train``, ``save``
/ :func:`load_index` (one ``.npz`` file format, see :mod:`.common`). Backends:

* :class:`ExactIndex` (:mod:`.exact`): exact search in torch by the grouped top-k of
  :class:`MemoryMatrix`, on the CPU or a GPU: the oracle of the tests, the search of every
  ``flat`` training memory, and the fallback when FAISS is absent (:func:`make_index`);
* :class:`PrototypeIndex` (:mod:`.faiss_index`): FAISS ``flat`` / ``ivf`` / ``ivfpq`` / ``hnsw``,
  on the GPU when faiss-gpu is installed and asked for;
* :class:`ShardedIndex` (:mod:`.sharded`): either kind split into shards by id, searched shard
  by shard and merged (:func:`merge_topk`).

Search results follow FAISS conventions: numpy ``scores`` [queries, k'] (decreasing) and ``ids``
[queries, k'] (int64), with ``k' = min(k, ntotal)`` (pitfall 17); an approximate index may find
fewer than ``k'`` results for a query: those slots hold id -1 and score -inf.
:func:`knn_labels`, :func:`topk_vote`, :func:`soft_vote` (:mod:`.vote`) are the spec's
retrieval over a plain memory array.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from spml_deploy.engine.index.common import (INDEX_TYPES, ArrayLike, as_vectors, meta_is_exact,
                                             read_index_meta, read_npz, vote_counts)
from spml_deploy.engine.index.exact import ExactIndex, MemoryMatrix
from spml_deploy.engine.index.faiss_index import PrototypeIndex, gpu_available, make_index
from spml_deploy.engine.index.sharded import AnyIndex, ShardedIndex, merge_topk
from spml_deploy.engine.index.vote import knn_labels, soft_vote, topk_vote
from spml_deploy.errors import ManifestError, MissingDependencyError

__all__ = ["INDEX_TYPES", "AnyIndex", "ExactIndex", "MemoryMatrix", "PrototypeIndex",
           "ShardedIndex", "build_index", "gpu_available", "index_is_exact", "knn_labels",
           "load_index", "load_memory", "make_index", "merge_topk", "meta_is_exact",
           "read_index_meta", "soft_vote", "topk_vote", "vote_counts"]

log = logging.getLogger(__name__)


def build_index(vectors: ArrayLike, labels: ArrayLike | None = None, index_type: str = "flat",
                **kwargs: object) -> AnyIndex:
    """An index of unit ``vectors`` [n, dim] with id ``i`` = row ``i`` and ``labels`` [n]: a
    FAISS index of ``index_type`` (``flat`` = exact), or an :class:`ExactIndex` when FAISS is
    not installed. ``kwargs`` go to :class:`PrototypeIndex`."""
    v = as_vectors(vectors, int(np.shape(vectors)[-1]), "vectors")
    index = make_index(v.shape[1], index_type, **kwargs)
    index.add(v, np.arange(v.shape[0], dtype=np.int64), labels)
    return index


def load_index(path: str | Path, use_gpu: bool = False, exact: bool = False,
               device: str | torch.device = "cpu") -> AnyIndex | ShardedIndex:
    """Read an index written by any ``save`` (format 1 or 2). ``exact``: read a ``flat`` FAISS
    file as an :class:`ExactIndex` on ``device`` (the same neighbours; no FAISS needed)."""
    meta = read_index_meta(path)
    kind = meta.get("kind")
    if kind == ShardedIndex.kind:
        return ShardedIndex.load(path, use_gpu=use_gpu)
    if kind == ExactIndex.kind:
        return ExactIndex.load(path, device=device)
    if kind == PrototypeIndex.kind:
        if exact and meta.get("index_type") == "flat" and meta.get("format_version", 1) >= 2:
            _, a = read_npz(path, names=("vectors", "ids", "labels"))
            out = ExactIndex(int(meta["dim"]), device=device)
            if a["ids"].size:
                out.add(a["vectors"], a["ids"], a["labels"])
            return out
        return PrototypeIndex.load(path, use_gpu=use_gpu)
    raise ManifestError(f"unknown index kind {kind!r}", path=path, fix="rebuild the index")


def index_is_exact(index: AnyIndex | ShardedIndex) -> bool:
    """True when ``index`` returns exact top-k results (exact or FAISS ``flat``; a sharded
    index when all its shards do)."""
    if isinstance(index, ShardedIndex):
        return all(index_is_exact(s) for s in index.shards) if index.shards else index.index_type == "flat"
    return meta_is_exact({"kind": index.kind, "index_type": index.index_type})


def load_memory(path: str | Path, index_path: str | Path | None = None,
                device: str | torch.device = "cpu") -> AnyIndex | ShardedIndex:
    """The training memory of a run or bundle as a labelled index for the kNN vote.

    ``path``: the memory file, an index file (written by :func:`build_index` ... ``save``), or
    the older pair ``memory.npz`` (arrays ``prototypes`` [n, D], ``labels`` [n]) +
    ``index_path`` (its FAISS index, ids = rows, no labels). An exact (``flat``) memory is
    searched by :class:`ExactIndex` on ``device`` (the same neighbours as FAISS flat);
    an approximate one by FAISS (on the GPU for a CUDA ``device`` when faiss-gpu sees one).
    """
    use_gpu = torch.device(device).type == "cuda" and gpu_available()
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" in z.files:
                return load_index(path, use_gpu=use_gpu, exact=True, device=device)
            protos, labels = z["prototypes"], z["labels"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise ManifestError(f"prototype memory is unreadable ({exc})", path=path,
                            fix="re-run 'spml-deploy train --resume' to rebuild it") from exc
    if index_path is not None and not meta_is_exact(read_index_meta(index_path)):
        try:
            index = load_index(index_path, use_gpu=use_gpu)
        except MissingDependencyError:
            log.warning("the prototype memory's FAISS index needs FAISS (pip install "
                        "'spml-deploy[index]'); using the exact search over %s", Path(path).name)
        else:
            if index.ntotal != protos.shape[0]:
                raise ManifestError(f"the memory index holds {index.ntotal} prototypes but the "
                                    f"memory {protos.shape[0]}", path=index_path,
                                    fix="delete it and re-run 'spml-deploy train --resume' to "
                                        "rebuild it")
            index._labels = labels[index.ids]
            return index
    return ExactIndex.of(protos, labels, device=device)
