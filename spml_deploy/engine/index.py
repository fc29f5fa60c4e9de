"""kNN label retrieval over segment prototypes (spec 7.3) and a prototype index.

* :func:`knn_labels`, :func:`topk_vote`, :func:`soft_vote`: exact retrieval (torch matmul +
  top-k; on the CPU a two-stage exact top-k over a :class:`MemoryMatrix`) and the majority /
  fractional vote of the retrieved labels (ties -> smallest class id).
* :class:`PrototypeIndex`: FAISS index of unit prototypes (inner product = cosine) with int64
  ids: ``flat`` (exact), ``ivf``, ``ivfpq``, ``hnsw``; CPU, or GPU when faiss-gpu is installed
  and asked for. FAISS is optional (``pip install 'spml-deploy[index]'``).
* :class:`ExactIndex`: brute force in torch with the same interface: the oracle of the tests
  and the fallback when FAISS is absent (:func:`make_index`).
* :class:`ShardedIndex`: either kind split into shards by id (files that can live on other
  machines, or shards on several GPUs), searched shard by shard and merged (:func:`merge_topk`).
* :class:`KnnClassifier`: ``topk_vote`` semantics on the results of any of these indexes.

Search results follow FAISS conventions: numpy ``scores`` [queries, k'] (float32, decreasing)
and ``ids`` [queries, k'] (int64), with ``k' = min(k, ntotal)`` (pitfall 17); an approximate
index may find fewer than ``k'`` results for a query: those slots hold id -1 and score -inf.
Saved indexes are single ``.npz`` files (written atomically): :func:`load_index` reads either kind.
"""
from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from spml_deploy.errors import ManifestError, SpmlError, require

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
FORMAT_VERSION = 1
_CHUNK_ELEMENTS = 1 << 24  # similarity entries per chunk of brute-force search
_GPU_MAX_K = 2048
_GROUP = 8  # columns per group of the two-stage exact top-k (MemoryMatrix)
_CPU_BLOCK_ELEMENTS = 1 << 20  # similarity entries per chunk of the grouped search (cache-sized)


# --------------------------------------------------------------------------------------------
# exact retrieval and voting


def _tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what}: labels must lie in 0..{num_classes - 1}, found "
            f"{int(labels.min())}..{int(labels.max())} (drop VOID prototypes before retrieval)"
        )


class MemoryMatrix:
    """Memory prototypes [memory, dim] laid out once for fast exact top-k search.

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

    def __init__(self, memory: ArrayLike, group: int = _GROUP):
        m = _tensor(memory)
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
            step = max(1, _CHUNK_ELEMENTS // self.size)
            mt = self._t[:, : self.size]
            parts = [torch.topk(query[s:s + step] @ mt, k, dim=1) for s in range(0, query.shape[0], step)]
        elif method == "grouped":
            if not grouped:
                raise ValueError(f"grouped search needs at least k = {k} groups, the memory has "
                                 f"{self._n}: use method='plain'")
            step = max(1, _CPU_BLOCK_ELEMENTS // self._t.shape[1])
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


def knn_labels(
    query: ArrayLike, memory: ArrayLike | MemoryMatrix, memory_labels: ArrayLike, k: int = 20,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and cosines of the ``k`` most similar memory rows, by decreasing similarity.

    Args:
        query: unit query embeddings [queries, dim].
        memory: unit memory prototypes [memory, dim], or a :class:`MemoryMatrix` of them
            (prepared once, for repeated searches).
        memory_labels: class of every memory row [memory] (int).
        k: neighbours; clipped to the memory size (pitfall 17).
        method: search method of :meth:`MemoryMatrix.topk` (all exact).

    Returns:
        (labels [queries, k'] int64, similarities [queries, k']), ``k' = min(k, memory)``.
    """
    q = _tensor(query)
    mm = memory if isinstance(memory, MemoryMatrix) else None
    m = mm.memory if mm is not None else _tensor(memory)
    if q.dim() != 2 or m.dim() != 2 or q.shape[1] != m.shape[1]:
        raise ValueError(f"query [Q, D] and memory [M, D] expected, got {tuple(q.shape)} and "
                         f"{tuple(m.shape)}")
    lab = _tensor(memory_labels).to(device=q.device, dtype=torch.int64)
    if lab.shape != (m.shape[0],):
        raise ValueError(f"memory_labels: expected [{m.shape[0]}], got {tuple(lab.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if m.shape[0] == 0:
        raise SpmlError("kNN retrieval over an empty prototype memory",
                        fix="build the memory from at least one labelled image")
    if mm is None:
        mm = MemoryMatrix(m.to(device=q.device, dtype=q.dtype))
    mm = mm.to(device=q.device, dtype=q.dtype)
    sim, ind = mm.topk(q, min(k, m.shape[0]), method=method)
    return lab[ind], sim


def vote_counts(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Votes per class [queries, classes] (float) of labels [queries, k]; entries < 0 are
    missing neighbours and do not vote."""
    valid = neighbor_labels >= 0
    counts = torch.zeros(neighbor_labels.shape[0], num_classes, dtype=torch.float64,
                         device=neighbor_labels.device)
    return counts.scatter_add_(1, neighbor_labels.clamp_min(0), valid.to(torch.float64))


def _num_classes(labels: torch.Tensor, num_classes: int | None) -> int:
    if num_classes is None:
        return int(labels.max()) + 1 if labels.numel() else 1
    return int(num_classes)


def topk_vote(
    query: ArrayLike, memory: ArrayLike | MemoryMatrix, memory_labels: ArrayLike, k: int = 20,
    num_classes: int | None = None, method: str = "auto", check_labels: bool = True,
) -> torch.Tensor:
    """Majority label of the ``k`` nearest memory prototypes (spec 7.3), ties -> smallest id.

    Shapes and ``method`` as in :func:`knn_labels`; ``num_classes`` defaults to
    ``max(memory_labels) + 1``; ``check_labels=False`` skips the range check of the labels
    (for callers that checked them once). Returns labels [queries] int64.
    """
    lab = _tensor(memory_labels).to(torch.int64)
    c = _num_classes(lab, num_classes)
    if check_labels:
        _check_labels(lab, c, "memory_labels")
    nbr, _ = knn_labels(query, memory, lab, k, method=method)
    return vote_counts(nbr, c).argmax(dim=1)  # argmax returns the first (smallest) maximum


def soft_vote(
    query: ArrayLike, memory: ArrayLike | MemoryMatrix, memory_labels: ArrayLike, k: int = 20,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Fraction of the ``k`` nearest prototypes in each class: [queries, classes] (rows sum to
    1), in the dtype of ``query`` when floating (float32 otherwise)."""
    lab = _tensor(memory_labels).to(torch.int64)
    c = _num_classes(lab, num_classes)
    _check_labels(lab, c, "memory_labels")
    nbr, sim = knn_labels(query, memory, lab, k)
    counts = vote_counts(nbr, c)
    frac = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    return frac.to(sim.dtype if sim.is_floating_point() else torch.float32)


# --------------------------------------------------------------------------------------------
# indexes


def _vectors(x: ArrayLike, dim: int, what: str, dtype: Any = np.float32) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what}: expected [n, {dim}], got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=dtype)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return a


def _check_unit(a: np.ndarray, what: str) -> None:
    norms = np.linalg.norm(a, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
    if bad.size:
        raise ValueError(f"{what}: row {int(bad[0])} has norm {norms[bad[0]]:.4g}; prototypes must be "
                         "unit vectors (normalise them; drop empty segments)")


def _ids(ids: ArrayLike | None, n: int, start: int) -> np.ndarray:
    if ids is None:
        return np.arange(start, start + n, dtype=np.int64)
    a = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    a = np.ascontiguousarray(a.reshape(-1), dtype=np.int64)
    if a.shape[0] != n:
        raise ValueError(f"ids: expected {n} ids (one per vector), got {a.shape[0]}")
    if a.size and a.min() < 0:
        raise ValueError("ids: must be >= 0 (-1 marks a missing result)")
    return a


def _save_npz(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_index_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved index (kind, dim, index_type, ...) without reading its data."""
    return _read_npz(path, meta_only=True)[0]


def _is_exact(kind: Any, index_type: Any) -> bool:
    return kind == ExactIndex.kind or index_type == "flat"


def meta_is_exact(meta: dict[str, Any]) -> bool:
    """True when a saved index (its :func:`read_index_meta`) returns exact top-k results."""
    return _is_exact(meta.get("kind"), meta.get("index_type"))


def _read_npz(path: str | Path, meta_only: bool = False
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a saved index; ``meta_only`` leaves the arrays unread (empty dict)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = ["meta"] if meta_only else z.files
            arrays = {k: z[k] for k in names}
        meta = json.loads(str(arrays.pop("meta")))
    except FileNotFoundError:
        raise ManifestError("prototype index file not found", path=path,
                            fix="build the index first (spml-deploy index build)") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ManifestError(f"not a readable prototype index ({exc})", path=path,
                            fix="rebuild the index; the file is corrupt or from another tool") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"prototype index format {meta.get('format_version')} is not supported "
                            f"(this version reads {FORMAT_VERSION})", path=path, fix="rebuild the index")
    return meta, arrays


class ExactIndex:
    """Brute-force inner-product index in torch (the oracle, and the fallback without FAISS).

    Args:
        dim: vector dimension.
        dtype: storage / compute dtype (float32 like FAISS, or float64).
        device: torch device of the stored vectors.
    """

    kind = "exact"

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self._vectors = torch.zeros(0, self.dim, dtype=dtype, device=self.device)
        self._ids = np.zeros(0, dtype=np.int64)

    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """Stored ids in insertion order [ntotal]."""
        return self._ids.copy()

    @property
    def is_trained(self) -> bool:
        return True  # nothing to train: same interface as PrototypeIndex

    def train(self, vectors: ArrayLike, n_total: int | None = None) -> None:
        """No-op (brute force needs no training); checks the vectors like :meth:`add`."""
        _check_unit(_vectors(vectors, self.dim, "vectors"), "vectors")

    def add(self, vectors: ArrayLike, ids: ArrayLike | None = None) -> None:
        """Append unit vectors [n, dim] with int64 ids [n] (default: ntotal .. ntotal + n - 1)."""
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        v = _vectors(vectors, self.dim, "vectors", np_dtype)
        _check_unit(v, "vectors")
        self._ids = np.concatenate([self._ids, _ids(ids, v.shape[0], self.ntotal)])
        self._vectors = torch.cat([self._vectors, torch.from_numpy(v).to(self.device)])

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products: (scores [Q, k'], ids [Q, k']), ``k' = min(k, ntotal)``."""
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        q = _vectors(queries, self.dim, "queries", np_dtype)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, self.ntotal)
        if kk == 0:
            return np.zeros((q.shape[0], 0), np_dtype), np.zeros((q.shape[0], 0), np.int64)
        qt = torch.from_numpy(q).to(self.device)
        step = max(1, _CHUNK_ELEMENTS // self.ntotal)
        scores, rows = [], []
        for s in range(0, qt.shape[0], step):
            v, i = torch.topk(qt[s:s + step] @ self._vectors.T, kk, dim=1)
            scores.append(v.cpu().numpy())
            rows.append(i.cpu().numpy())
        if not scores:
            return np.zeros((0, kk), np_dtype), np.zeros((0, kk), np.int64)
        return np.concatenate(scores), self._ids[np.concatenate(rows)]

    def save(self, path: str | Path) -> None:
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "dtype": str(self.dtype).replace("torch.", "")}
        _save_npz(path, {"vectors": self._vectors.cpu().numpy(), "ids": self._ids}, meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ExactIndex":
        meta, arrays = _read_npz(path)
        if meta.get("kind") != cls.kind:
            raise ManifestError(f"expected an exact index, found kind {meta.get('kind')!r}", path=path,
                                fix="use spml_deploy.engine.index.load_index")
        out = cls(meta["dim"], getattr(torch, meta["dtype"]), device)
        out._vectors = torch.from_numpy(arrays["vectors"]).to(out.device)
        out._ids = arrays["ids"].astype(np.int64)
        return out


def _faiss() -> Any:
    return require("faiss", "index", "the FAISS prototype index")


def gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    try:
        faiss = _faiss()
    except SpmlError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class PrototypeIndex:
    """FAISS inner-product index of unit prototypes with int64 ids.

    The FAISS structure is created on the first :meth:`add` (or :meth:`train`), so that its
    parameters can follow the data size (``n`` = vectors of that first call):

    * ``ivf``: ``nlist = min(4 sqrt(n), n / 39)`` inverted lists (at least 1), trained by k-means
      on the first batch; ``nprobe = max(16, nlist / 32)`` lists visited per query.
    * ``ivfpq``: as ``ivf``, codes of ``pq_m`` sub-vectors (default: the divisor of ``dim``
      closest to ``dim / 4``, i.e. 16 bytes for dim 64) with ``pq_nbits`` bits (8, fewer when
      ``n`` is too small to train 256 centroids); ``rerank > 0`` re-ranks ``rerank * k``
      candidates with the exact vectors (more memory, better recall).
    * ``hnsw``: ``hnsw_m = 32`` links, ``ef_construction = 64``, ``ef_search = max(64, k)``.

    Args:
        dim: vector dimension.
        index_type: ``flat`` | ``ivf`` | ``ivfpq`` | ``hnsw``.
        use_gpu: move the index to GPU ``gpu_device`` when faiss-gpu sees a GPU (``hnsw``
            stays on the CPU: FAISS has no GPU HNSW); otherwise a warning and the CPU.
    """

    kind = "faiss"

    def __init__(
        self, dim: int, index_type: str = "flat", *, nlist: int | None = None,
        nprobe: int | None = None, pq_m: int | None = None, pq_nbits: int = 8, rerank: int = 0,
        hnsw_m: int = 32, ef_construction: int = 64, ef_search: int = 64,
        use_gpu: bool = False, gpu_device: int = 0,
    ):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        self._faiss = _faiss()
        self.dim = int(dim)
        self.index_type = index_type
        self.params: dict[str, Any] = dict(nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_nbits=pq_nbits,
                                           rerank=rerank, hnsw_m=hnsw_m, ef_construction=ef_construction,
                                           ef_search=ef_search)
        self.gpu_device = int(gpu_device)
        self.on_gpu = False
        self._want_gpu = bool(use_gpu)
        self._gpu_res: Any = None
        self._index: Any = None
        self._ids = np.zeros(0, dtype=np.int64)
        if use_gpu and not gpu_available():
            log.warning("FAISS GPU support or a GPU is missing: the prototype index runs on the CPU "
                        "(install faiss-gpu: pip install 'spml-deploy[gpu]')")
            self._want_gpu = False

    # -- structure ---------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """Stored ids in insertion order [ntotal]."""
        return self._ids.copy()

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def _pq_m(self) -> int:
        if self.params["pq_m"]:
            m = int(self.params["pq_m"])
            if self.dim % m:
                raise ValueError(f"pq_m = {m} must divide the dimension {self.dim}")
            return m
        divisors = [m for m in range(1, self.dim + 1) if self.dim % m == 0]
        return min(divisors, key=lambda m: (abs(m - self.dim / 4), m))

    def _create(self, n: int, n_total: int | None = None) -> Any:
        faiss, d, p = self._faiss, self.dim, self.params
        ip = faiss.METRIC_INNER_PRODUCT
        if self.index_type == "flat":
            return faiss.IndexFlatIP(d)
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(p["hnsw_m"]), ip)
            index.hnsw.efConstruction = int(p["ef_construction"])
            index.hnsw.efSearch = int(p["ef_search"])
            return index
        nlist = p["nlist"] or int(4 * math.sqrt(max(n, n_total or 0)))
        nlist = max(1, min(int(nlist), n // 39 if n >= 39 else 1))
        p["nlist"] = nlist
        p["nprobe"] = int(p["nprobe"] or max(16, nlist // 32))
        quantizer = faiss.IndexFlatIP(d)
        if self.index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        else:
            nbits = int(p["pq_nbits"])
            fit = max(1, int(math.floor(math.log2(max(2, n // 39)))))
            if fit < nbits:
                log.info("ivfpq: %d training vectors, using %d-bit codes instead of %d", n, fit, nbits)
                nbits = fit
            p["pq_nbits"] = nbits
            m = self._pq_m()
            p["pq_m"] = m
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, ip)
        return index  # the Python wrapper keeps `quantizer` alive (referenced_objects)

    def _to_gpu(self) -> None:
        if not self._want_gpu or self.on_gpu or self.index_type == "hnsw" or int(self.params["rerank"]):
            if self._want_gpu and (self.index_type == "hnsw" or int(self.params["rerank"])):
                log.warning("FAISS has no GPU version of %s: the prototype index stays on the CPU",
                            "HNSW" if self.index_type == "hnsw" else "re-ranking")
            return
        faiss = self._faiss
        self._gpu_res = self._gpu_res or faiss.StandardGpuResources()
        try:
            self._index = faiss.index_cpu_to_gpu(self._gpu_res, self.gpu_device, self._index)
        except RuntimeError as exc:  # e.g. PQ codes of fewer than 8 bits have no GPU kernel
            log.warning("the %s index cannot run on the GPU (%s): it stays on the CPU",
                        self.index_type, str(exc).strip().splitlines()[-1])
            return
        self.on_gpu = True

    def train(self, vectors: ArrayLike, n_total: int | None = None) -> None:
        """Create the structure and train it (ivf / ivfpq k-means) on unit vectors [n, dim].
        ``n_total``: the size of the collection when ``vectors`` is a sample of it (``nlist``
        follows the collection; the sample bounds it to 39 training vectors per list)."""
        if self._index is not None:
            raise ValueError("the index is already built; train() must come before the first add()")
        v = _vectors(vectors, self.dim, "vectors")
        _check_unit(v, "vectors")
        index = self._create(v.shape[0], n_total)
        if not index.is_trained:
            index.train(v)
        if self.index_type == "ivfpq" and int(self.params["rerank"]) > 0:
            refine = self._faiss.IndexRefineFlat(index)
            refine.k_factor = float(self.params["rerank"])
            index = refine
        self._index = index
        self._apply_search_params()
        self._to_gpu()
        log.info("prototype index %s built (%s)", self.index_type,
                 ", ".join(f"{k}={v}" for k, v in self.params.items() if v))

    def _apply_search_params(self) -> None:
        if self.index_type in ("ivf", "ivfpq"):
            ivf = self._faiss.extract_index_ivf(self._index)
            ivf.nprobe = min(int(self.params["nprobe"]), ivf.nlist)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall trade-off of an approximate index."""
        if nprobe is not None:
            self.params["nprobe"] = int(nprobe)
            if self._index is not None and self.index_type in ("ivf", "ivfpq"):
                if self.on_gpu:
                    self._index.nprobe = int(nprobe)
                else:
                    self._apply_search_params()
        if ef_search is not None:
            self.params["ef_search"] = int(ef_search)

    # -- data --------------------------------------------------------------------------------
    def add(self, vectors: ArrayLike, ids: ArrayLike | None = None) -> None:
        """Append unit vectors [n, dim] with int64 ids [n] (default: ntotal .. ntotal + n - 1).
        The first call builds (and trains) the structure on these vectors."""
        v = _vectors(vectors, self.dim, "vectors")
        _check_unit(v, "vectors")
        new_ids = _ids(ids, v.shape[0], self.ntotal)
        if v.shape[0] == 0:
            return
        if self._index is None:
            self.train(v)
        self._index.add(v)
        self._ids = np.concatenate([self._ids, new_ids])
        assert self._index.ntotal == self.ntotal

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products: (scores [Q, k'] float32, ids [Q, k'] int64),
        ``k' = min(k, ntotal)``; missing results (approximate indexes) are id -1, score -inf."""
        q = _vectors(queries, self.dim, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, self.ntotal)
        if kk == 0 or q.shape[0] == 0:
            return np.zeros((q.shape[0], kk), np.float32), np.zeros((q.shape[0], kk), np.int64)
        if self.on_gpu and kk > _GPU_MAX_K:
            raise ValueError(f"k = {kk} exceeds the FAISS GPU limit of {_GPU_MAX_K}")
        if self.index_type == "hnsw":  # per-call parameters: safe for concurrent searches
            hp = self._faiss.SearchParametersHNSW()
            hp.efSearch = max(int(self.params["ef_search"]), kk)
            scores, rows = self._index.search(q, kk, params=hp)
        else:
            scores, rows = self._index.search(q, kk)
        missing = rows < 0
        ids = np.where(missing, -1, self._ids[np.where(missing, 0, rows)])
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return scores, ids

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the index, its ids and parameters to one ``.npz`` file (atomically)."""
        faiss = self._faiss
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "index_type": self.index_type, "params": self.params}
        arrays: dict[str, np.ndarray] = {"ids": self._ids}
        if self._index is not None:
            cpu = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
            arrays["faiss"] = faiss.serialize_index(cpu)
        _save_npz(path, arrays, meta)

    @classmethod
    def load(cls, path: str | Path, use_gpu: bool = False, gpu_device: int = 0) -> "PrototypeIndex":
        meta, arrays = _read_npz(path)
        if meta.get("kind") != cls.kind:
            raise ManifestError(f"expected a FAISS index, found kind {meta.get('kind')!r}", path=path,
                                fix="use spml_deploy.engine.index.load_index")
        out = cls(meta["dim"], meta["index_type"], use_gpu=use_gpu, gpu_device=gpu_device)
        out.params.update(meta["params"])
        out._ids = arrays["ids"].astype(np.int64)
        if "faiss" in arrays:
            out._index = out._faiss.deserialize_index(arrays["faiss"])
            if out._index.ntotal != out.ntotal:
                raise ManifestError(f"index holds {out._index.ntotal} vectors but {out.ntotal} ids",
                                    path=path, fix="rebuild the index")
            out._apply_search_params()
            out._to_gpu()
        return out


    def empty_copy(self, gpu_device: int | None = None) -> "PrototypeIndex":
        """A new, empty index with this one's trained structure (the same coarse quantiser and
        codebooks for ``ivf``/``ivfpq``) and parameters, on GPU ``gpu_device`` when this index
        asked for one; the shards of a :class:`ShardedIndex` are made this way."""
        if self._index is None:
            raise ValueError("empty_copy() needs a trained index (call train() first)")
        faiss = self._faiss
        out = PrototypeIndex(self.dim, self.index_type, use_gpu=self._want_gpu,
                             gpu_device=self.gpu_device if gpu_device is None else gpu_device)
        out.params.update(self.params)
        cpu = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        out._index = faiss.clone_index(cpu)
        out._index.reset()
        out._apply_search_params()
        out._to_gpu()
        return out


AnyIndex = Union[PrototypeIndex, ExactIndex]


# --------------------------------------------------------------------------------------------
# shards


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the top-k lists of several indexes into one (scores [Q, k'], ids [Q, k']).

    ``results`` holds one (scores [Q, k_i], ids [Q, k_i]) pair per index, each sorted by
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
    return (np.take_along_axis(scores, order, axis=1).astype(scores.dtype, copy=False),
            np.take_along_axis(ids, order, axis=1))


class ShardedIndex:
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

    def add(self, vectors: ArrayLike, ids: ArrayLike | None = None) -> None:
        """Append unit vectors [n, dim] with int64 ids [n] (default: ntotal .. ntotal + n - 1),
        each to shard ``id % shards``. The first call builds the structure on these vectors."""
        v = _vectors(vectors, self.dim, "vectors")
        _check_unit(v, "vectors")
        new_ids = _ids(ids, v.shape[0], self.ntotal)
        if v.shape[0] == 0:
            return
        if not self.shards:
            self.train(v)
        owner = new_ids % self.num_shards
        parts = [(shard, np.flatnonzero(owner == s)) for s, shard in enumerate(self.shards)]
        parts = [(shard, rows) for shard, rows in parts if rows.size]
        with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:   # filled in parallel
            list(pool.map(lambda part: part[0].add(v[part[1]], new_ids[part[1]]), parts))

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products over all shards: (scores [Q, k'], ids [Q, k']),
        ``k' = min(k, ntotal)``; missing results are id -1, score -inf."""
        q = _vectors(queries, self.dim, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        live = [s for s in self.shards if s.ntotal]
        if not live:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        if len(live) == 1:
            return live[0].search(q, k)
        with ThreadPoolExecutor(max_workers=len(live)) as pool:
            results = list(pool.map(lambda s: s.search(q, k), live))
        return merge_topk(results, k)

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
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "index_type": self.index_type, "num_shards": self.num_shards,
                "shard_files": [self.shard_path(path, s, self.num_shards).name
                                for s in range(len(self.shards))],
                "shard_ntotal": [s.ntotal for s in self.shards]}
        _save_npz(path, {}, meta)

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


def make_index(dim: int, index_type: str = "flat", **kwargs: Any) -> AnyIndex:
    """A :class:`PrototypeIndex`, or an :class:`ExactIndex` when FAISS is not installed (for any
    ``index_type``, with a warning: exact search is slower but gives the best possible results)."""
    try:
        _faiss()
    except SpmlError:
        log.warning("FAISS is not installed: using exact brute-force search "
                    "(pip install 'spml-deploy[index]' for a FAISS index)")
        return ExactIndex(dim)
    return PrototypeIndex(dim, index_type, **kwargs)


def load_index(path: str | Path, use_gpu: bool = False) -> AnyIndex | ShardedIndex:
    """Read an index written by :meth:`PrototypeIndex.save`, :meth:`ExactIndex.save` or
    :meth:`ShardedIndex.save`."""
    meta = read_index_meta(path)
    if meta.get("kind") == ShardedIndex.kind:
        return ShardedIndex.load(path, use_gpu=use_gpu)
    if meta.get("kind") == ExactIndex.kind:
        return ExactIndex.load(path)
    if meta.get("kind") == PrototypeIndex.kind:
        return PrototypeIndex.load(path, use_gpu=use_gpu)
    raise ManifestError(f"unknown index kind {meta.get('kind')!r}", path=path, fix="rebuild the index")


def build_memory_index(prototypes: ArrayLike, index_type: str = "flat") -> AnyIndex:
    """The prototype memory [n, dim] as an index with id ``i`` = row ``i``: a FAISS index of
    ``index_type`` (``flat`` = exact), or an :class:`ExactIndex` when FAISS is not installed."""
    protos = _vectors(prototypes, int(np.shape(prototypes)[-1]), "memory prototypes")
    index = make_index(protos.shape[1], index_type)
    index.add(protos, np.arange(protos.shape[0], dtype=np.int64))
    return index


def index_is_exact(index: AnyIndex | ShardedIndex) -> bool:
    """True when ``index`` returns exact top-k results (brute force or FAISS ``flat``; a sharded
    index when all its shards do)."""
    if isinstance(index, ShardedIndex):
        return all(index_is_exact(s) for s in index.shards) if index.shards else index.index_type == "flat"
    return _is_exact(index.kind, getattr(index, "index_type", None))


# --------------------------------------------------------------------------------------------
# classifier


class KnnClassifier:
    """kNN label retrieval on an index (spec 7.3 vote: majority of the ``k`` neighbours, ties ->
    smallest class id; missing results do not vote).

    Args:
        index: a :class:`PrototypeIndex` or :class:`ExactIndex` holding unit prototypes.
        labels: class of each prototype [n] (int, ``0..num_classes-1``).
        k: neighbours per query (clipped to ``index.ntotal``).
        num_classes: number of classes (default ``max(labels) + 1``).
        ids: the id of each entry of ``labels`` [n]; default: ``labels[i]`` is the label of id i.
    """

    def __init__(self, index: AnyIndex, labels: ArrayLike, k: int = 20,
                 num_classes: int | None = None, ids: ArrayLike | None = None):
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
        self.index = index
        self.k = int(k)
        self.num_classes = _num_classes(torch.from_numpy(lab), num_classes)
        _check_labels(torch.from_numpy(lab), self.num_classes, "labels")
        if ids is None:
            self._sorted_ids = None
            self._labels = lab
        else:
            idv = _ids(ids, lab.shape[0], 0)
            order = np.argsort(idv, kind="stable")
            self._sorted_ids, self._labels = idv[order], lab[order]

    def neighbor_labels(self, queries: ArrayLike) -> np.ndarray:
        """Labels of the retrieved neighbours [Q, k'] by decreasing similarity (-1 = missing)."""
        if self.index.ntotal == 0:
            raise SpmlError("kNN classification with an empty prototype index",
                            fix="add labelled prototypes to the index first")
        _, ids = self.index.search(queries, self.k)
        found = ids >= 0
        if self._sorted_ids is None:
            pos = np.where(found, ids, 0)
            if found.any() and ids[found].max() >= self._labels.shape[0]:
                raise ValueError("an id returned by the index has no label (ids beyond labels)")
        else:
            pos = np.searchsorted(self._sorted_ids, np.where(found, ids, 0))
            pos = np.clip(pos, 0, self._sorted_ids.shape[0] - 1)
            if (found & (self._sorted_ids[pos] != ids)).any():
                raise ValueError("an id returned by the index has no label in `ids`")
        return np.where(found, self._labels[pos], -1)

    def votes(self, queries: ArrayLike) -> torch.Tensor:
        """Neighbour counts per class [Q, classes] (float64)."""
        return vote_counts(torch.from_numpy(self.neighbor_labels(queries)), self.num_classes)

    def predict(self, queries: ArrayLike) -> torch.Tensor:
        """Majority label [Q] int64 (ties -> smallest class id)."""
        return self.votes(queries).argmax(dim=1)

    def predict_proba(self, queries: ArrayLike) -> torch.Tensor:
        """Fraction of the found neighbours in each class [Q, classes] (float32)."""
        counts = self.votes(queries)
        return (counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)).float()
