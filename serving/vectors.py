"""Where the segments' vectors live: the prototype index file of an index folder, and the
pending files of the batches not yet merged into it.

An index folder holds ``segments.sqlite`` (metadata only, :mod:`spml_deploy.serving.store`),
``prototypes.npz`` (the prototype index, :mod:`spml_deploy.engine.index`: every segment's unit
vector with id = its store id and label = its predicted class; with ``index build --shards N``
also the shard files it names) and ``pending/`` (``<first id>.npy`` per added batch: its
vectors [S, D] float32, ids ``first .. first + S - 1``, not yet in the index file).

Crash safety. :func:`add_batch` writes a batch's vectors to its pending file (temporary file,
fsync, rename) BEFORE committing its images and segments to SQLite in one transaction;
:func:`sync_index` merges the pending batches into the index, saves the index file (atomically)
and only then deletes their pending files. So every committed segment has its vector in the
index file or in a pending file at every moment: a killed ``index build`` / ``index add`` loses
nothing it committed, and ``index add`` resumes it. A pending file whose batch was never
committed (killed between the two steps) is deleted by the next writer. Only a writer (holding
the folder's lock, :func:`exclusive`) saves the index or deletes pending files; readers complete
the index in memory.

A store id with a vector nowhere (a deleted ``pending/``, an index file replaced by hand) is an
error for readers (:class:`StoreError` naming the fix); ``index add`` repairs it by deleting those
segments' images from the store (:func:`prepare_write`) and segmenting them again.

Stores of schema 1 kept the vectors in SQLite as well: readers take missing vectors from that
column; ``index add`` migrates the folder first (:func:`migrate_store`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from spml_deploy.errors import ConfigError, ManifestError, SpmlError
from spml_deploy.serving.store import ImageRecord, SegmentStore, StoreError

log = logging.getLogger(__name__)

INDEX_FILE = "prototypes.npz"
PENDING_DIR = "pending"
LOCK_FILE = ".lock"
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
FILL_CHUNK = 1 << 18      # segments read and added to the index at a time
TRAIN_SAMPLE = 1 << 20    # most vectors a new ivf/ivfpq structure is trained on

# (vectors [b - a, D] float32, labels [b - a] int64) of the store ids a <= id < b
Reader = Callable[[int, int], "tuple[np.ndarray, np.ndarray]"]


def _index_api():
    from spml_deploy.engine import index as index_module

    return index_module


def new_index(dim: int, index_type: str, options: dict[str, Any] | None = None):
    """An empty index of ``index_type`` (inner product on unit vectors, with ids and labels): a
    FAISS ``PrototypeIndex`` (on the GPU when faiss-gpu sees one), or the exact brute-force
    ``ExactIndex`` when FAISS is not installed; with ``options["shards"]`` > 1 a
    ``ShardedIndex`` of such indexes (on several GPUs when faiss-gpu sees them)."""
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"unknown index type '{index_type}'",
                          fix=f"choose one of {', '.join(INDEX_TYPES)}")
    api = _index_api()
    opts = dict(options or {})
    opts.setdefault("use_gpu", api.gpu_available())
    shards = int(opts.pop("shards", 1))
    if shards > 1:
        return api.ShardedIndex(dim, shards, index_type, **opts)
    return api.make_index(dim, index_type, **opts)


def load_index_file(path: Path):
    """The index saved at ``path`` (on the GPU when faiss-gpu sees one)."""
    api = _index_api()
    return api.load_index(path, use_gpu=api.gpu_available())


@contextlib.contextmanager
def exclusive(index_dir: Path, required: bool = True) -> Iterator[bool]:
    """The exclusive lock on the index folder (one writer at a time); yields whether it is held.
    ``required``: raise :class:`SpmlError` when another process holds it (else yield False, as
    for a folder where the lock file cannot be created)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    try:
        f = open(Path(index_dir) / LOCK_FILE, "a")
    except OSError as exc:
        if required:
            raise SpmlError(f"cannot create the lock file ({exc})", path=index_dir,
                            fix="make the index folder writable") from exc
        yield False
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError as exc:
            if required:
                raise SpmlError("another process is writing this index", path=index_dir,
                                fix="wait for the other 'index build/add' to finish") from exc
            held = False
        try:
            yield held
        finally:
            if held:
                fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# pending batches


def pending_batches(index_dir: Path) -> list[tuple[int, int, Path]]:
    """(first id, end id (exclusive), file) of every pending batch, by first id."""
    out = []
    for p in (Path(index_dir) / PENDING_DIR).glob("*.npy"):
        if p.stem.isdigit():
            first = int(p.stem)
            with contextlib.suppress(FileNotFoundError):      # merged by a writer meanwhile
                out.append((first, first + int(np.load(p, mmap_mode="r").shape[0]), p))
    return sorted(out, key=lambda t: t[0])


def write_pending(index_dir: Path, first: int, vectors: np.ndarray) -> Path:
    """Write the vectors [S, D] of ids ``first ..`` durably: temporary file, fsync, rename."""
    folder = Path(index_dir) / PENDING_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"{int(first):012d}.npy"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):           # the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def add_batch(index_dir: Path, store: SegmentStore, records: Sequence[ImageRecord]) -> np.ndarray:
    """Add one batch of images: their vectors to a pending file, then their images and segments
    to the store in one transaction. Returns the new segment ids [N]. The caller holds the
    folder's lock (:func:`exclusive`)."""
    vectors = [r.vectors for r in records if r.num_segments]
    first = store.next_id()
    path = write_pending(index_dir, first, np.concatenate(vectors)) if vectors else None
    try:
        ids = store.add_images(records)
    except BaseException:
        if path is not None and store.next_id() == first:     # not committed: not pending
            path.unlink(missing_ok=True)
        raise
    if ids.size and int(ids[0]) != first:
        raise StoreError(f"the batch got ids from {int(ids[0])}, its pending file says {first}",
                         path=store.path, fix="only one process may write an index at a time")
    return ids


# --------------------------------------------------------------------------------------------
# reading vectors wherever they are


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique ids -> [(first, end)) intervals of consecutive ids."""
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    firsts = np.concatenate([[0], breaks])
    lasts = np.concatenate([breaks, [ids.size]]) - 1
    return [(int(ids[a]), int(ids[b]) + 1) for a, b in zip(firsts, lasts)]


class _Vectors:
    """The vectors of store ids, from (in this order) the schema-1 column, indexes being
    replaced (``olds``) and the pending batches; labels from the store."""

    def __init__(self, store: SegmentStore, dim: int, pending: list[tuple[int, int, Path]],
                 olds: Sequence[Any] = ()):
        self.store, self.dim, self.pending = store, dim, pending
        self.old_ids = np.zeros(0, np.int64)
        self.old_vecs = np.zeros((0, dim), np.float32)
        if olds:
            ids = np.concatenate([np.asarray(o.ids, np.int64) for o in olds])
            vecs = np.concatenate([o.vectors() for o in olds])
            ids, first = np.unique(ids, return_index=True)
            keep = ids >= 0
            self.old_ids, self.old_vecs = ids[keep], vecs[first[keep]]

    def covered(self, start: int, stop: int) -> int:
        """The first id in ``start .. stop - 1`` with no vector (``stop``: none missing)."""
        if self.store.has_vector_column:
            return stop
        cur = start
        for a, b in sorted([(f, e) for f, e, _ in self.pending] + _runs(self.old_ids)):
            if a > cur:
                break
            cur = max(cur, b)
        return min(cur, stop)

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        labels = self.store.class_ids(a, b)
        if self.store.has_vector_column:
            return self.store.column_vectors(a, b, self.dim), labels
        out = np.empty((b - a, self.dim), np.float32)
        pos = np.searchsorted(self.old_ids, np.arange(a, b))
        hit = pos < self.old_ids.size
        hit[hit] = self.old_ids[pos[hit]] == np.arange(a, b)[hit]
        out[hit] = self.old_vecs[pos[hit]]
        for first, end, path in self.pending:
            lo, hi = max(a, first), min(b, end)
            if lo < hi:
                out[lo - a:hi - a] = np.load(path, mmap_mode="r")[lo - first:hi - first]
        return out, labels


def fill_index(index, read: Reader, start: int, stop: int) -> None:
    """Add the vectors of ids ``start <= id < stop`` (``read(a, b)``: vectors and labels of ids
    ``a .. b - 1``) to ``index``, ``FILL_CHUNK`` at a time (memory stays bounded for any
    collection). A new index is first trained once, on an even sample of at most
    ``TRAIN_SAMPLE`` of them (every shard of a sharded index gets that structure)."""
    if stop <= start:
        return
    if not index.is_trained:
        step = max(1, -(-(stop - start) // TRAIN_SAMPLE))
        sample = [read(a, min(stop, a + FILL_CHUNK))[0][(start - a) % step::step]
                  for a in range(start, stop, FILL_CHUNK)]
        index.train(np.concatenate(sample), n_total=stop - start)
    for a in range(start, stop, FILL_CHUNK):
        b = min(stop, a + FILL_CHUNK)
        vecs, labels = read(a, b)
        index.add(vecs, np.arange(a, b, dtype=np.int64), labels)


# --------------------------------------------------------------------------------------------
# the index against the store


def _load_or_salvage(path: Path) -> tuple[Any, list[Any]]:
    """(the index at ``path`` or None, indexes whose vectors may serve a rebuild). A sharded
    index whose save was interrupted (shard files newer than the file naming them) does not
    load; its shard files are read one by one instead."""
    if not path.is_file():
        return None, []
    try:
        return load_index_file(path), []
    except ManifestError as exc:
        api = _index_api()
        try:
            meta = api.read_index_meta(path)
        except ManifestError:
            raise exc from None
        if meta.get("kind") != "sharded":
            raise
        log.warning("index %s does not load (%s): rebuilding it from its shard files", path,
                    exc.message)
        return None, [api.load_index(path.with_name(name)) for name in meta["shard_files"]
                      if path.with_name(name).is_file()]


class _Moved(Exception):
    """A pending file vanished while it was read (a writer merged it): read again."""


def sync_index(index_dir: Path, store: SegmentStore, save: bool = False, warn_lag: bool = True):
    """Open the index and make it hold exactly the store's segments (ids ``0 .. n - 1``).

    The index file normally holds ids ``0 .. ntotal - 1``; ids ``>= ntotal`` (batches still
    pending: an add running or killed) are added from the pending files (schema 1: from the
    store's vector column). An index file whose ids are not such a prefix (never written this
    way: a file replaced by hand) is rebuilt from its own vectors and the pending ones.
    ``save``: the caller holds the folder's lock (:func:`exclusive`): write the completed index
    back (atomically), then delete the merged and the orphan pending files. ``warn_lag``: log a
    lagging index. Raises :class:`StoreError` when some store ids have a vector nowhere.
    """
    for attempt in range(3):
        try:
            return _sync(Path(index_dir), store, save, warn_lag and attempt == 0)
        except (_Moved, StoreError):
            if save or attempt == 2:
                raise
            time.sleep(0.2)          # a writer is merging: read its result


def _sync(index_dir: Path, store: SegmentStore, save: bool, warn_lag: bool):
    meta = store.meta()
    dim = int(meta["embed_dim"])
    path = index_dir / INDEX_FILE
    if store.has_vector_column:
        log.warning("%s has the old layout (vectors in SQLite, schema 1): vectors missing from "
                    "the index are read from it; 'spml-deploy index add' migrates the folder",
                    store.path)
    index, olds = _load_or_salvage(path)
    pending = pending_batches(index_dir)
    n = store.count()                     # after the index: a writer commits before it saves
    have = int(index.ntotal) if index is not None else 0
    if index is not None and (have > n or not np.array_equal(index.ids, np.arange(have))):
        log.warning("index %s does not match its store (%d prototypes, store %d segments): "
                    "rebuilding it", path, have, n)
        olds, index, have = [index], None, 0
    elif have < n and warn_lag:
        log.warning("index %s lags its store by %d segments (interrupted add): completing it",
                    path, n - have)
    source = _Vectors(store, dim, pending, olds)
    complete = source.covered(have, n)
    if complete < n:
        raise StoreError(f"segments {complete}..{n - 1} of the store have no vector (neither in "
                         f"{INDEX_FILE} nor in {PENDING_DIR}/)", path=index_dir,
                         fix="run 'spml-deploy index add INDEX_DIR IMAGES' with the indexed "
                             "images (it segments those images again), or build a new index")
    if index is None:
        index = new_index(dim, meta["index_type"], meta.get("index_options"))
    try:
        fill_index(index, source.read, have, n)
    except FileNotFoundError as exc:
        raise _Moved(str(exc)) from exc
    if save:
        saved = True
        if have < n:
            try:
                index.save(path)           # atomic: temporary file + os.replace
            except OSError as exc:
                saved = False
                log.warning("cannot write the completed index to %s (%s); using it in memory",
                            path, exc)
        for first, end, p in pending:
            if (saved and end <= n) or first >= n:       # merged, or never committed
                p.unlink(missing_ok=True)
    return index


def _indexed_count(path: Path) -> int:
    """How many vectors the index file at ``path`` holds (0 when there is none), read cheaply."""
    if not path.is_file():
        return 0
    api = _index_api()
    meta = api.read_index_meta(path)
    if meta.get("kind") == "sharded":
        return int(sum(meta["shard_ntotal"]))
    return int(api.read_npz(path, names=("ids",))[1]["ids"].shape[0])


def migrate_store(index_dir: Path, store: SegmentStore) -> None:
    """A schema-1 folder (vectors in SQLite) -> the current layout: build the complete index
    (labels = classes) from the vector column, save it, then drop the column."""
    if not store.has_vector_column:
        return
    meta = store.meta()
    n = store.count()
    log.warning("%s has the old layout (vectors in SQLite, schema 1): moving its %d vectors to "
                "%s", store.path, n, INDEX_FILE)
    index = new_index(int(meta["embed_dim"]), meta["index_type"], meta.get("index_options"))
    fill_index(index, _Vectors(store, int(meta["embed_dim"]), []).read, 0, n)
    if n:
        index.save(Path(index_dir) / INDEX_FILE)
    store.drop_vector_column()


def prepare_write(index_dir: Path, store: SegmentStore) -> None:
    """Before a writer adds batches (holding the lock): migrate a schema-1 store, delete pending
    files of batches never committed, and delete from the store the images of segments whose
    vector is nowhere (so that this add segments them again)."""
    index_dir = Path(index_dir)
    migrate_store(index_dir, store)
    n = store.next_id()
    pending = []
    for first, end, p in pending_batches(index_dir):
        if first >= n:
            p.unlink(missing_ok=True)
        else:
            pending.append((first, end, p))
    have = min(_indexed_count(index_dir / INDEX_FILE), n)
    complete = _Vectors(store, int(store.meta()["embed_dim"]), pending).covered(have, n)
    if complete < n:
        dropped = store.truncate(complete)
        log.warning("segments %d..%d of the store had no vector (neither in %s nor in %s/): their "
                    "%d images are segmented again", complete, n - 1, INDEX_FILE, PENDING_DIR,
                    dropped)
        for first, _, p in pending:
            if first >= complete:
                p.unlink(missing_ok=True)
