"""An index split into shards by id (files that can live on other machines, or shards on
several GPUs), searched shard by shard and merged (:func:`merge_topk`)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

import numpy as np

from spml_deploy.engine.index.common import (INDEX_TYPES, ArrayLike, LabelledIndex, as_ids,
                                             as_labels, as_vectors, check_unit, read_index_meta,
                                             save_npz)
from spml_deploy.engine.index.exact import ExactIndex
from spml_deploy.engine.index.faiss_index import PrototypeIndex, _faiss, gpu_available, make_index
from spml_deploy.errors import ManifestError

AnyIndex = Union[PrototypeIndex, ExactIndex]


def merge_topk(results: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, ...]:
    """Merge the top-k lists of several indexes into one (scores [Q, k'], ids [Q, k'], and
    any further per-result arrays such as labels [Q, k'], carried along).

    ``results`` holds one (scores [Q, k_i], ids [Q, k_i], ...) tuple per index, each sorted by
    decreasing score, with missing results as id -1 / score -inf. The merged list is the ``k' =
    min(k, sum k_i)`` best entries by decreasing score, equal scores by increasing id (the order
    in which one flat index holding ids in increasing order reports them); missing results last.
    """
    if not results:
        raise ValueError("merge_topk needs at least one result list")
    scores = np.concatenate([r[0] for r in results], axis=1)
    ids = np.concatenate([r[1] for r in results], axis=1)
    kk = min(int(k), scores.shape[1])
    missing = ids < 0
    # sort keys, last one primary: found first, then score (decreasing), then id (increasing)
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, ids),
                        -np.where(missing, -np.inf, scores), missing), axis=1)[:, :kk]
    extra = [np.take_along_axis(np.concatenate([r[e] for r in results], axis=1), order, axis=1)
             for e in range(2, len(results[0]))]
    return (np.take_along_axis(scores, order, axis=1).astype(scores.dtype, copy=False),
            np.take_along_axis(ids, order, axis=1), *extra)


class ShardedIndex(LabelledIndex):
    """An index split into ``n`` shards by id (id ``i`` lives in shard ``i % n``), searched shard
    by shard (in parallel threads; FAISS releases the GIL) and merged with :func:`merge_topk`: a
    ``flat`` sharded index returns the results of one ``flat`` index of the same vectors.

    The structure is trained once, on the vectors of the first :meth:`train` / :meth:`add` call
    (for ``ivf`` / ``ivfpq`` the coarse quantiser and codebooks), and copied to every shard, so
    shards can be filled independently. With faiss-gpu and ``use_gpu``, shard ``s`` goes to GPU
    ``s % number of GPUs``. Saved as one small ``.npz`` naming the shard files
    (``NAME.shard-S-of-N.npz`` beside it), which can be copied to and searched on other machines.

    Args:
        dim: vector dimension.
        shards: number of shards (>= 1).
        index_type: as :class:`PrototypeIndex`; without FAISS every shard is an :class:`ExactIndex`.
        use_gpu: spread the shards over the GPUs faiss-gpu sees.
        **kwargs: :class:`PrototypeIndex` parameters (nlist, nprobe, ...).
    """

    kind = "sharded"

    def __init__(self, dim: int, shards: int, index_type: str = "flat", use_gpu: bool = False,
                 **kwargs: Any):
        if int(shards) < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        self.dim = int(dim)
        self.index_type = index_type
        self.num_shards = int(shards)
        self._use_gpu = bool(use_gpu)
        self._kwargs = kwargs
        self.shards: list[AnyIndex] = []

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def ids(self) -> np.ndarray:
        """Stored ids in increasing order [ntotal] (shards hold them interleaved)."""
        if not self.shards:
            return np.zeros(0, np.int64)
        return np.sort(np.concatenate([s.ids for s in self.shards]))

    def _by_id(self) -> np.ndarray:
        """The order sorting the shards' concatenated entries by id [ntotal]."""
        return np.argsort(np.concatenate([s.ids for s in self.shards]), kind="stable")

    @property
    def labels(self) -> np.ndarray:
        """Labels in increasing id order [ntotal] (-1 = none), aligned with :attr:`ids`."""
        if not self.shards:
            return np.zeros(0, np.int64)
        order = self._by_id()
        return np.concatenate([s.labels for s in self.shards])[order]

    def vectors(self) -> np.ndarray:
        """The stored unit vectors in increasing id order [ntotal, dim] (float32)."""
        if not self.shards:
            return np.zeros((0, self.dim), np.float32)
        order = self._by_id()
        return np.concatenate([s.vectors() for s in self.shards])[order]

    @property
    def is_trained(self) -> bool:
        return bool(self.shards)

    def train(self, vectors: ArrayLike, n_total: int | None = None) -> None:
        """Build the structure on unit vectors [n, dim] (a sample of ``n_total``, see
        :meth:`PrototypeIndex.train`) and give every shard a copy of it."""
        if self.shards:
            raise ValueError("the index is already built; train() must come before the first add()")
        first = make_index(self.dim, self.index_type, use_gpu=self._use_gpu, **self._kwargs)
        first.train(vectors, n_total)
        if isinstance(first, ExactIndex):
            self.shards = [first] + [ExactIndex(self.dim) for _ in range(self.num_shards - 1)]
            return
        gpus = first._faiss.get_num_gpus() if first._want_gpu else 0
        self.shards = [first] + [first.empty_copy(s % gpus if gpus else None)
                                 for s in range(1, self.num_shards)]

    def add(self, vectors: ArrayLike, ids: ArrayLike | None = None,
            labels: ArrayLike | None = None) -> None:
        """Append unit vectors [n, dim] with int64 ids [n] (default: ntotal .. ntotal + n - 1)
        and labels [n] (default -1), each to shard ``id % shards``. The first call builds the
        structure on these vectors."""
        v = as_vectors(vectors, self.dim, "vectors")
        check_unit(v, "vectors")
        new_ids, new_labels = as_ids(ids, v.shape[0], self.ntotal), as_labels(labels, v.shape[0])
        if v.shape[0] == 0:
            return
        if not self.shards:
            self.train(v)
        owner = new_ids % self.num_shards
        parts = [(shard, np.flatnonzero(owner == s)) for s, shard in enumerate(self.shards)]
        parts = [(shard, rows) for shard, rows in parts if rows.size]
        with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:   # filled in parallel
            list(pool.map(lambda part: part[0].add(v[part[1]], new_ids[part[1]], new_labels[part[1]]),
                          parts))
        self._checked_classes = None

    def search_labels(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` inner products over all shards: (scores [Q, k'], ids [Q, k'], labels
        [Q, k']), ``k' = min(k, ntotal)``; missing results are id -1, score -inf, label -1."""
        q = as_vectors(queries, self.dim, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        live = [s for s in self.shards if s.ntotal]
        if not live:
            empty = np.zeros((q.shape[0], 0), np.int64)
            return np.zeros((q.shape[0], 0), np.float32), empty, empty.copy()
        if len(live) == 1:
            return live[0].search_labels(q, k)
        with ThreadPoolExecutor(max_workers=len(live)) as pool:
            results = list(pool.map(lambda s: s.search_labels(q, k), live))
        scores, ids, labels = merge_topk(results, k)
        return scores, ids, labels

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall trade-off of every approximate shard."""
        for shard in self.shards:
            if isinstance(shard, PrototypeIndex):
                shard.set_search_params(nprobe=nprobe, ef_search=ef_search)

    @staticmethod
    def shard_path(path: str | Path, s: int, n: int) -> Path:
        """Where shard ``s`` of ``n`` of the index saved at ``path`` lives."""
        path = Path(path)
        return path.with_name(f"{path.stem}.shard-{s}-of-{n}{path.suffix}")

    def save(self, path: str | Path) -> None:
        """Write every shard to its own file, then (atomically, last) the file naming them."""
        for s, shard in enumerate(self.shards):
            shard.save(self.shard_path(path, s, self.num_shards))
        meta = {"kind": self.kind, "dim": self.dim,
                "index_type": self.index_type, "num_shards": self.num_shards,
                "shard_files": [self.shard_path(path, s, self.num_shards).name
                                for s in range(len(self.shards))],
                "shard_ntotal": [s.ntotal for s in self.shards]}
        save_npz(path, {}, meta)

    @classmethod
    def load(cls, path: str | Path, use_gpu: bool = False) -> "ShardedIndex":
        meta = read_index_meta(path)
        if meta.get("kind") != cls.kind:
            raise ManifestError(f"expected a sharded index, found kind {meta.get('kind')!r}",
                                path=path, fix="use spml_deploy.engine.index.load_index")
        out = cls(meta["dim"], meta["num_shards"], meta["index_type"], use_gpu=use_gpu)
        gpus = _faiss().get_num_gpus() if use_gpu and gpu_available() else 0
        for s, (name, n) in enumerate(zip(meta["shard_files"], meta["shard_ntotal"])):
            shard_file = Path(path).with_name(name)
            shard = (ExactIndex.load(shard_file) if read_index_meta(shard_file).get("kind") == "exact"
                     else PrototypeIndex.load(shard_file, use_gpu=bool(gpus),
                                              gpu_device=s % gpus if gpus else 0))
            if shard.ntotal != n:
                raise ManifestError(f"shard {s} holds {shard.ntotal} vectors, the index file says {n}",
                                    path=shard_file, fix="rebuild the index (a shard file was replaced)")
            out.shards.append(shard)
        return out
