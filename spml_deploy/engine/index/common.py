"""What every prototype index shares: input checks, the vote on retrieved labels and the file
format.

File format (one ``.npz`` per index, written atomically): ``meta`` (JSON: ``format_version``,
``kind`` = ``exact`` | ``faiss`` | ``sharded``, ``dim``, ``index_type``, parameters), ``ids``
[N] int64, ``labels`` [N] int64 (-1 = none), ``vectors`` [N, D] float32 (the unit prototypes,
so that any index can be rebuilt, re-trained or searched exactly from its file) and, for FAISS
``ivf`` / ``ivfpq`` / ``hnsw``, ``faiss`` (the serialised trained structure). Format 1 (written
before labels and vectors were kept) is read too: its labels are -1, and a FAISS file of it
holds vectors only inside the FAISS structure (exact for ``flat``).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from spml_deploy.errors import ManifestError, SpmlError

ArrayLike = Union[np.ndarray, torch.Tensor]
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


def as_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def as_vectors(x: ArrayLike, dim: int, what: str, dtype: Any = np.float32) -> np.ndarray:
    """``x`` as a contiguous finite numpy array [n, dim] of ``dtype`` (ValueError otherwise)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what}: expected [n, {dim}], got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=dtype)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return a


def check_unit(a: np.ndarray, what: str) -> None:
    norms = np.linalg.norm(a, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
    if bad.size:
        raise ValueError(f"{what}: row {int(bad[0])} has norm {norms[bad[0]]:.4g}; prototypes must be "
                         "unit vectors (normalise them; drop empty segments)")


def as_ids(ids: ArrayLike | None, n: int, start: int) -> np.ndarray:
    """int64 ids [n]; default ``start .. start + n - 1``."""
    if ids is None:
        return np.arange(start, start + n, dtype=np.int64)
    a = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    a = np.ascontiguousarray(a.reshape(-1), dtype=np.int64)
    if a.shape[0] != n:
        raise ValueError(f"ids: expected {n} ids (one per vector), got {a.shape[0]}")
    return a


def as_labels(labels: ArrayLike | None, n: int) -> np.ndarray:
    """int64 labels [n] (-1 = none); default all -1. Labels below -1 raise ValueError."""
    if labels is None:
        return np.full(n, -1, np.int64)
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    a = np.ascontiguousarray(a.reshape(-1), dtype=np.int64)
    if a.shape[0] != n:
        raise ValueError(f"labels: expected {n} labels (one per vector), got {a.shape[0]}")
    if a.size and int(a.min()) < -1:
        raise ValueError(f"labels: {int(a.min())} is not a class (use -1 for 'no label')")
    return a


def check_labels(labels: torch.Tensor, num_classes: int, what: str, allow_none: bool = False) -> None:
    """ValueError unless every label lies in 0..num_classes-1 (or is -1 with ``allow_none``)."""
    if not labels.numel():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < (-1 if allow_none else 0) or hi >= num_classes:
        raise ValueError(
            f"{what}: labels must lie in 0..{num_classes - 1}, found {lo}..{hi} "
            "(drop VOID prototypes before retrieval)")


def vote_counts(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Votes per class [queries, classes] (float64) of neighbour labels [queries, k]; entries
    < 0 (missing neighbours, unlabelled prototypes) do not vote."""
    valid = neighbor_labels >= 0
    counts = torch.zeros(neighbor_labels.shape[0], num_classes, dtype=torch.float64,
                         device=neighbor_labels.device)
    return counts.scatter_add_(1, neighbor_labels.clamp_min(0), valid.to(torch.float64))


def vote_of(neighbor_labels: torch.Tensor, num_classes: int, soft: bool,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The spec 7.3 vote of neighbour labels [queries, k]: majority class [queries] int64 (ties
    -> smallest class id), or with ``soft`` the fraction of the voting neighbours in each class
    [queries, classes] in ``dtype`` (rows sum to 1; all zero for a query without voters)."""
    counts = vote_counts(neighbor_labels, num_classes)
    if not soft:
        return counts.argmax(dim=1)  # argmax returns the first (smallest) maximum
    return (counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)).to(dtype)


class LabelledIndex:
    """The label side of every index: ``vote`` on top of the index's ``search_labels``."""

    ntotal: int

    def search_labels(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products: (scores [Q, k'] decreasing, ids [Q, k'] int64),
        ``k' = min(k, ntotal)``; missing results (approximate indexes) are id -1, score -inf."""
        scores, ids, _ = self.search_labels(queries, k)
        return scores, ids

    def vote(self, queries: ArrayLike, k: int, num_classes: int, soft: bool = False) -> torch.Tensor:
        """kNN vote of unit queries [Q, D] over the ``k`` nearest prototypes (spec 7.3):
        majority label [Q] int64 (ties -> smallest class id), or with ``soft`` the fraction of
        the neighbours in each class [Q, num_classes] (float32). Unlabelled (-1) and missing
        neighbours do not vote. Results are on the device of ``queries`` when it is a tensor."""
        require_votable(self, num_classes)
        _, _, lab = self.search_labels(queries, k)
        out = vote_of(torch.from_numpy(lab), num_classes, soft)
        return out.to(queries.device) if isinstance(queries, torch.Tensor) else out

    @property
    def labels(self) -> np.ndarray:
        raise NotImplementedError


class StoredIndex(LabelledIndex):
    """An index that keeps its ids and labels in insertion order (``_ids``, ``_labels``: int64
    arrays [ntotal]; label -1 = none): the exact and the FAISS index."""

    _ids: np.ndarray
    _labels: np.ndarray

    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """Stored ids in insertion order [ntotal]."""
        return self._ids.copy()

    @property
    def labels(self) -> np.ndarray:
        """Label of every stored vector in insertion order [ntotal] (-1 = none)."""
        return self._labels.copy()


def require_votable(index: Any, num_classes: int) -> None:
    """SpmlError for an empty index; ValueError for labels outside -1..num_classes-1 (checked
    once per ``num_classes``)."""
    if index.ntotal == 0:
        raise SpmlError("kNN vote over an empty prototype index",
                        fix="add labelled prototypes to the index first (build the memory from at "
                            "least one labelled image)")
    if getattr(index, "_checked_classes", None) != num_classes:
        check_labels(torch.from_numpy(index.labels), num_classes, "index labels", allow_none=True)
        index._checked_classes = num_classes


# --------------------------------------------------------------------------------------------
# files


def save_npz(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``meta`` (JSON, with ``format_version``) and ``arrays`` to one ``.npz`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps({"format_version": FORMAT_VERSION, **meta})),
                     **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_npz(path: str | Path, names: tuple[str, ...] | None = None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a saved index; ``names``: read only these arrays (those present)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            wanted = ["meta"] + [n for n in (z.files if names is None else names)
                                 if n in z.files and n != "meta"]
            arrays = {k: z[k] for k in wanted}
        meta = json.loads(str(arrays.pop("meta")))
    except FileNotFoundError:
        raise ManifestError("prototype index file not found", path=path,
                            fix="build the index first (spml-deploy index build)") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ManifestError(f"not a readable prototype index ({exc})", path=path,
                            fix="rebuild the index; the file is corrupt or from another tool") from None
    if meta.get("format_version") not in READABLE_FORMATS:
        raise ManifestError(f"prototype index format {meta.get('format_version')} is not supported "
                            f"(this version reads {', '.join(map(str, READABLE_FORMATS))})",
                            path=path, fix="rebuild the index")
    return meta, arrays


def read_index_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved index (kind, dim, index_type, ...) without reading its data."""
    return read_npz(path, names=())[0]


def meta_is_exact(meta: dict[str, Any]) -> bool:
    """True when a saved index (its :func:`read_index_meta`) returns exact top-k results."""
    return meta.get("kind") == "exact" or meta.get("index_type") == "flat"
