"""FAISS index of unit prototypes (inner product = cosine) with int64 ids and labels:
``flat`` (exact), ``ivf``, ``ivfpq``, ``hnsw``; CPU, or GPU when faiss-gpu is installed and
asked for. FAISS is optional (``pip install 'spml-deploy[index]'``)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from spml_deploy.engine.index.common import (INDEX_TYPES, ArrayLike, StoredIndex, as_ids,
                                             as_labels, as_vectors, check_unit, read_index_meta,
                                             read_npz, save_npz)
from spml_deploy.engine.index.exact import ExactIndex
from spml_deploy.errors import ManifestError, SpmlError, require

log = logging.getLogger(__name__)

GPU_MAX_K = 2048


def _faiss() -> Any:
    return require("faiss", "index", "the FAISS prototype index")


def gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    try:
        faiss = _faiss()
    except SpmlError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class PrototypeIndex(StoredIndex):
    """FAISS inner-product index of unit prototypes with int64 ids and labels (-1 = none).

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
        self._labels = np.zeros(0, dtype=np.int64)
        # ivfpq keeps no exact vectors: they stay in the file they were read from (``_stored``:
        # path, count) plus those added since (``_added``); other types reconstruct them
        self._stored: tuple[Path, int] | None = None
        self._added: list[np.ndarray] = []
        if use_gpu and not gpu_available():
            log.warning("FAISS GPU support or a GPU is missing: the prototype index runs on the CPU "
                        "(install faiss-gpu: pip install 'spml-deploy[gpu]')")
            self._want_gpu = False

    # -- structure ---------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def vectors(self) -> np.ndarray:
        """The stored unit vectors in insertion order [ntotal, dim] (float32), exact: read back
        from the FAISS structure (``flat``, ``ivf``, ``hnsw``) or, for ``ivfpq`` (lossy codes),
        from the index file and the vectors added since it was read."""
        if self.ntotal == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.index_type != "ivfpq":
            faiss = self._faiss
            cpu = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
            if self.index_type == "ivf":
                faiss.extract_index_ivf(cpu).make_direct_map()
            out = cpu.reconstruct_n(0, self.ntotal)
            if self.index_type == "ivf" and not self.on_gpu:
                faiss.extract_index_ivf(cpu).make_direct_map(False)
            return np.ascontiguousarray(out, np.float32)
        parts = []
        if self._stored is not None:
            path, n = self._stored
            v = read_npz(path, names=("vectors",))[1].get("vectors")
            if v is None or v.shape[0] < n:
                raise ManifestError("this ivfpq index file holds no exact vectors (written by an "
                                    "older version)", path=path,
                                    fix="rebuild the index (spml-deploy index build)")
            parts.append(v[:n])
        return np.concatenate(parts + self._added).astype(np.float32, copy=False)

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
        v = as_vectors(vectors, self.dim, "vectors")
        check_unit(v, "vectors")
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
    def add(self, vectors: ArrayLike, ids: ArrayLike | None = None,
            labels: ArrayLike | None = None) -> None:
        """Append unit vectors [n, dim] with int64 ids [n] (default: ntotal .. ntotal + n - 1)
        and labels [n] (default -1, none). The first call builds (and trains) the structure on
        these vectors."""
        v = as_vectors(vectors, self.dim, "vectors")
        check_unit(v, "vectors")
        new_ids, new_labels = as_ids(ids, v.shape[0], self.ntotal), as_labels(labels, v.shape[0])
        if v.shape[0] == 0:
            return
        if self._index is None:
            self.train(v)
        self._index.add(v)
        self._ids = np.concatenate([self._ids, new_ids])
        self._labels = np.concatenate([self._labels, new_labels])
        self._checked_classes = None
        if self.index_type == "ivfpq":
            self._added.append(v)
        assert self._index.ntotal == self.ntotal

    def search_labels(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` inner products: (scores [Q, k'] float32, ids [Q, k'] int64, labels [Q, k']
        int64), ``k' = min(k, ntotal)``; missing results (approximate indexes) are id -1,
        score -inf, label -1."""
        q = as_vectors(queries, self.dim, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, self.ntotal)
        if kk == 0 or q.shape[0] == 0:
            empty = np.zeros((q.shape[0], kk), np.int64)
            return np.zeros((q.shape[0], kk), np.float32), empty, empty.copy()
        if self.on_gpu and kk > GPU_MAX_K:
            raise ValueError(f"k = {kk} exceeds the FAISS GPU limit of {GPU_MAX_K}")
        if self.index_type == "hnsw":  # per-call parameters: safe for concurrent searches
            hp = self._faiss.SearchParametersHNSW()
            hp.efSearch = max(int(self.params["ef_search"]), kk)
            scores, rows = self._index.search(q, kk, params=hp)
        else:
            scores, rows = self._index.search(q, kk)
        missing = rows < 0
        safe = np.where(missing, 0, rows)
        ids = np.where(missing, -1, self._ids[safe])
        labels = np.where(missing, -1, self._labels[safe])
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return scores, ids, labels

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ids, labels, the exact vectors and (except for ``flat``, rebuilt from the
        vectors when read) the FAISS structure to one ``.npz`` file (atomically)."""
        faiss = self._faiss
        meta = {"kind": self.kind, "dim": self.dim, "index_type": self.index_type,
                "params": self.params, "trained": self._index is not None}
        arrays: dict[str, np.ndarray] = {"ids": self._ids, "labels": self._labels,
                                         "vectors": self.vectors()}
        if self._index is not None and self.index_type != "flat":
            cpu = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
            arrays["faiss"] = faiss.serialize_index(cpu)
        save_npz(path, arrays, meta)
        if self.index_type == "ivfpq":
            self._stored, self._added = (Path(path), self.ntotal), []

    @classmethod
    def load(cls, path: str | Path, use_gpu: bool = False, gpu_device: int = 0) -> "PrototypeIndex":
        """Read a FAISS index (format 1 or 2) written by :meth:`save`."""
        path = Path(path)
        flat = read_index_meta(path).get("index_type") == "flat"
        names = ("ids", "labels", "faiss") + (("vectors",) if flat else ())
        meta, arrays = read_npz(path, names=names)
        if meta.get("kind") != cls.kind:
            raise ManifestError(f"expected a FAISS index, found kind {meta.get('kind')!r}", path=path,
                                fix="use spml_deploy.engine.index.load_index")
        out = cls(meta["dim"], meta["index_type"], use_gpu=use_gpu, gpu_device=gpu_device)
        out.params.update(meta["params"])
        out._ids = arrays["ids"].astype(np.int64)
        out._labels = (arrays["labels"].astype(np.int64) if "labels" in arrays
                       else np.full(out.ntotal, -1, np.int64))
        if "faiss" in arrays:
            out._index = out._faiss.deserialize_index(arrays["faiss"])
        elif "vectors" in arrays and (meta.get("trained") or out.ntotal):
            out._index = out._faiss.IndexFlatIP(out.dim)
            out._index.add(np.ascontiguousarray(arrays["vectors"], np.float32))
        if out._index is not None:
            if out._index.ntotal != out.ntotal:
                raise ManifestError(f"index holds {out._index.ntotal} vectors but {out.ntotal} ids",
                                    path=path, fix="rebuild the index")
            out._apply_search_params()
            out._to_gpu()
        if out.index_type == "ivfpq":
            out._stored = (path, out.ntotal)
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



def make_index(dim: int, index_type: str = "flat", **kwargs: Any) -> PrototypeIndex | ExactIndex:
    """A :class:`PrototypeIndex`, or an :class:`ExactIndex` when FAISS is not installed (for any
    ``index_type``, with a warning: exact search is slower but gives the best possible results)."""
    try:
        _faiss()
    except SpmlError:
        log.warning("FAISS is not installed: using exact brute-force search "
                    "(pip install 'spml-deploy[index]' for a FAISS index)")
        return ExactIndex(dim)
    return PrototypeIndex(dim, index_type, **kwargs)
