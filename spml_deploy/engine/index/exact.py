"""Exact top-k search in torch: THE exact search of the project (the oracle of the FAISS tests,
the fallback without FAISS, and the search of the training memory's flat index)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spml_deploy.engine.index.common import (ArrayLike, StoredIndex, as_ids, as_labels,
                                             as_tensor, as_vectors, check_unit, read_npz,
                                             require_votable, save_npz, vote_of)
from spml_deploy.errors import ManifestError

CHUNK_ELEMENTS = 1 << 24  # similarity entries per chunk of the plain search
GROUP = 8  # columns per group of the two-stage search
CPU_BLOCK_ELEMENTS = 1 << 20  # similarity entries per chunk of the grouped search (cache-sized)


class MemoryMatrix:
    """Prototypes [memory, dim] laid out once for fast exact top-k search.

    The similarity row of a query is searched in two stages instead of one ``topk`` over all
    ``memory`` entries: the columns are split into ``n = ceil(memory / g)`` strided groups
    (group ``j`` = columns ``j, j + n, j + 2n, ...``), the ``k`` groups with the largest maximum
    are kept and the final ``topk`` runs over their ``g * k`` entries. This is exact: a member
    of the true top-k has value ``v``, at most ``k - 1`` entries (hence groups) beat ``v``, so its
    group is among the ``k`` best (up to exactly tied values, where any tied entry may be
    chosen, as with ``torch.topk``). The group maxima are an elementwise maximum of ``g``
    contiguous slices (vectorised), and queries are processed in chunks whose similarity block
    stays in the CPU cache. Holds the transposed memory [dim, g * n] (zero padding columns,
    masked to -inf) in the dtype and device given.
    """

    def __init__(self, memory: ArrayLike, group: int = GROUP):
        m = as_tensor(memory)
        if m.dim() != 2:
            raise ValueError(f"memory [M, D] expected, got {tuple(m.shape)}")
        self.memory = m
        self.size, self.dim = int(m.shape[0]), int(m.shape[1])
        self.group = max(1, int(group))
        n = -(-self.size // self.group) if self.size else 0
        padded = m.new_zeros(self.group * n, self.dim)
        padded[: self.size] = m
        self._t = padded.T.contiguous()                          # [D, g * n]
        self._n = n

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> MemoryMatrix:
        """The same memory on another device / in another dtype (``self`` when nothing changes)."""
        m = self.memory.to(device=device, dtype=dtype)
        return self if m is self.memory else MemoryMatrix(m, self.group)

    def topk(self, query: torch.Tensor, k: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` inner products of unit queries [Q, D]: (similarities [Q, k],
        memory rows [Q, k]) by decreasing similarity, as ``torch.topk(query @ memory.T, k)``.

        ``method``: "grouped" (two-stage search, see the class), "plain" (one matmul + topk
        per chunk of queries, the reference) or "auto" (grouped on the CPU when the memory
        holds at least ``2 k`` groups, plain otherwise). ``k`` must lie in 1..memory.
        """
        if not 1 <= k <= self.size:
            raise ValueError(f"k must lie in 1..{self.size}, got {k}")
        grouped = self.group > 1 and self._n >= k
        if method == "auto":
            method = "grouped" if grouped and self._n >= 2 * k and query.device.type == "cpu" else "plain"
        if method == "plain":
            step = max(1, CHUNK_ELEMENTS // self.size)
            mt = self._t[:, : self.size]
            parts = [torch.topk(query[s:s + step] @ mt, k, dim=1) for s in range(0, query.shape[0], step)]
        elif method == "grouped":
            if not grouped:
                raise ValueError(f"grouped search needs at least k = {k} groups, the memory has "
                                 f"{self._n}: use method='plain'")
            step = max(1, CPU_BLOCK_ELEMENTS // self._t.shape[1])
            parts = [self._grouped(query[s:s + step], k) for s in range(0, query.shape[0], step)]
        else:
            raise ValueError(f"unknown method {method!r} (use 'auto', 'grouped' or 'plain')")
        if not parts:
            return query.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=query.device)
        if len(parts) == 1:
            return parts[0][0], parts[0][1]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _grouped(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stage exact top-k of one chunk of queries [c, D] (see the class)."""
        c, g, n = q.shape[0], self.group, self._n
        s = q @ self._t                                            # [c, g * n]
        if g * n > self.size:
            s[:, self.size:] = float("-inf")
        s3 = s.view(c, g, n)
        best = s3.amax(dim=1).topk(k, dim=1, sorted=False).indices          # [c, k] groups
        cand = s3.gather(2, best[:, None, :].expand(c, g, k)).reshape(c, g * k)
        val, j = cand.topk(k, dim=1)                                          # decreasing
        return val, best.gather(1, j % k) + n * torch.div(j, k, rounding_mode="floor")


class ExactIndex(StoredIndex):
    """Exact inner-product index of unit prototypes in torch, with ids and labels.

    Searched by :meth:`MemoryMatrix.topk` (laid out once after the last :meth:`add`); on a CUDA
    ``device`` the search and the vote stay on the GPU.

    Args:
        dim: vector dimension.
        dtype: storage / compute dtype (float32 like FAISS, or float64).
        device: torch device of the stored vectors.
    """

    kind = "exact"
    index_type = "flat"

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self._vectors = torch.zeros(0, self.dim, dtype=dtype, device=self.device)
        self._ids = np.zeros(0, dtype=np.int64)
        self._labels = np.zeros(0, dtype=np.int64)
        self._matrix: MemoryMatrix | None = None
        self._labels_t: torch.Tensor | None = None

    @classmethod
    def of(cls, vectors: ArrayLike, labels: ArrayLike | None = None, ids: ArrayLike | None = None,
           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "ExactIndex":
        """An index holding unit ``vectors`` [n, dim] with ``labels`` [n] and ``ids`` [n]."""
        out = cls(int(np.shape(vectors)[-1]), dtype, device)
        out.add(vectors, ids, labels)
        return out

    @property
    def is_trained(self) -> bool:
        return True  # nothing to train: same interface as the FAISS index

    def vectors(self) -> np.ndarray:
        """The stored unit vectors in insertion order [ntotal, dim] (float32)."""
        return self._vectors.float().cpu().numpy()

    def train(self, vectors: ArrayLike, n_total: int | None = None) -> None:
        """No-op (exact search needs no training); checks the vectors like :meth:`add`."""
        check_unit(as_vectors(vectors, self.dim, "vectors"), "vectors")

    def add(self, vectors: ArrayLike, ids: ArrayLike | None = None,
            labels: ArrayLike | None = None) -> None:
        """Append unit vectors [n, dim] with int64 ids [n] (default: ntotal .. ntotal + n - 1)
        and labels [n] (default -1, none)."""
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        v = as_vectors(vectors, self.dim, "vectors", np_dtype)
        check_unit(v, "vectors")
        new_ids, new_labels = as_ids(ids, v.shape[0], self.ntotal), as_labels(labels, v.shape[0])
        self._ids = np.concatenate([self._ids, new_ids])
        self._labels = np.concatenate([self._labels, new_labels])
        self._vectors = torch.cat([self._vectors, torch.from_numpy(v).to(self.device)])
        self._matrix = self._labels_t = None
        self._checked_classes = None

    def _topk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k'], rows [Q, k']) of queries [Q, D] in this index's dtype/device."""
        if self._matrix is None:
            self._matrix = MemoryMatrix(self._vectors)
        return self._matrix.topk(q, min(int(k), self.ntotal))

    def search_labels(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores [Q, k'], ids [Q, k'], labels [Q, k']) of the top-``k`` inner products,
        ``k' = min(k, ntotal)``, by decreasing score."""
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        q = as_vectors(queries, self.dim, "queries", np_dtype)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(int(k), self.ntotal)
        if kk == 0:
            empty = np.zeros((q.shape[0], 0), np.int64)
            return np.zeros((q.shape[0], 0), np_dtype), empty, empty.copy()
        scores, rows = self._topk(torch.from_numpy(q).to(self.device), kk)
        r = rows.cpu().numpy()
        return scores.cpu().numpy(), self._ids[r], self._labels[r]

    def vote(self, queries: ArrayLike, k: int, num_classes: int, soft: bool = False) -> torch.Tensor:
        """As :meth:`LabelledIndex.vote`, computed in torch on this index's device (queries are
        cast to its dtype); the result is on the device of ``queries`` (CPU for arrays)."""
        require_votable(self, num_classes)
        q = as_tensor(queries)
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected [n, {self.dim}], got shape {tuple(q.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._labels_t is None:
            self._labels_t = torch.from_numpy(self._labels).to(self.device)
        _, rows = self._topk(q.to(device=self.device, dtype=self.dtype), k)
        return vote_of(self._labels_t[rows], num_classes, soft).to(q.device)

    def save(self, path: str | Path) -> None:
        """Write vectors, ids, labels and meta to one ``.npz`` (atomically)."""
        meta = {"kind": self.kind, "dim": self.dim, "index_type": self.index_type,
                "dtype": str(self.dtype).replace("torch.", "")}
        save_npz(path, {"vectors": self._vectors.cpu().numpy(), "ids": self._ids,
                        "labels": self._labels}, meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ExactIndex":
        """Read an exact index (format 1 or 2) written by :meth:`save`."""
        meta, arrays = read_npz(path)
        if meta.get("kind") != cls.kind:
            raise ManifestError(f"expected an exact index, found kind {meta.get('kind')!r}", path=path,
                                fix="use spml_deploy.engine.index.load_index")
        out = cls(meta["dim"], getattr(torch, meta.get("dtype", "float32")), device)
        out._vectors = torch.from_numpy(arrays["vectors"]).to(out.device)
        out._ids = arrays["ids"].astype(np.int64)
        out._labels = (arrays["labels"].astype(np.int64) if "labels" in arrays
                       else np.full(out.ntotal, -1, np.int64))
        return out
