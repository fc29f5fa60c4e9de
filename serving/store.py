"""SQLite metadata store of a segment index (``INDEX_DIR/segments.sqlite``).

Tables
------
* ``meta(key TEXT PRIMARY KEY, value TEXT)``: JSON values - ``schema_version``, ``model_fingerprint``
  (sha256 of the model's weights file, equal for a run and its bundles), ``manifest_sha256``,
  ``model_path``, ``embed_dim`` (D), ``index_type``, ``index_options``, ``classes``, ``test_grid``,
  ``kmeans_iters``, ``mask_encoding``.
* ``images(id INTEGER PRIMARY KEY, path TEXT UNIQUE, rel TEXT, width, height, num_segments,
  content_sha256 TEXT)``: every indexed image: ``path`` absolute (for the local user), ``rel``
  relative to the images root of ``index build`` (meta ``images_root``; what the HTTP service
  shows), ``content_sha256`` the :func:`content_hash` of its decoded pixels (recognises a query
  image that is in the index; NULL in stores written before the column, which is added the
  first time such a store is written to).
* ``segments(id INTEGER PRIMARY KEY, image_id, segment_index, x, y, w, h, area, class_id,
  mask_rle BLOB)``: ``id`` IS the prototype index id. Ids are dense: 0, 1, 2, ... in the order
  the segments were added. Box and area are in original image pixels.

The store keeps metadata only: the segments' vectors live in the prototype index file(s) of the
folder, with ``class_id`` as their label (:mod:`spml_deploy.serving.vectors`, which also says how
a batch's vectors are made durable before its commit). Stores of schema 1 kept every vector in a
``segments.vector`` BLOB column as well: :attr:`SegmentStore.has_vector_column` tells them apart,
:meth:`SegmentStore.column_vectors` reads that column and :meth:`SegmentStore.drop_vector_column`
ends it (``index add`` migrates such a store).

Masks (``mask_encoding = "rle-bbox-u32"``): the segment mask at ORIGINAL image resolution,
cropped to the segment's box (h rows x w columns), flattened row-major and run-length encoded as
little-endian uint32 run lengths alternating outside/inside, starting with an outside run (which
may be 0). :func:`rle_encode` / :func:`rle_decode`.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from spml_deploy.errors import SpmlError

STORE_FILE = "segments.sqlite"
STORE_SCHEMA_VERSION = 2
MASK_ENCODING = "rle-bbox-u32"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    rel TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    num_segments INTEGER NOT NULL,
    content_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    segment_index INTEGER NOT NULL,
    x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
    area INTEGER NOT NULL,
    class_id INTEGER NOT NULL,
    mask_rle BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_image ON segments(image_id);
"""
_HASH_INDEX = "CREATE INDEX IF NOT EXISTS images_hash ON images(content_sha256)"


class StoreError(SpmlError):
    """The segment store is missing, corrupt or does not match the index/model."""


# --------------------------------------------------------------------------------------------
# run-length encoding of masks


def rle_encode(mask: np.ndarray) -> bytes:
    """Boolean mask [h, w] -> uint32 LE run lengths (row-major), alternating 0/1, starting with 0."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    if flat.size == 0:
        return b""
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate([[0], runs])
    return runs.astype("<u4").tobytes()


def rle_decode(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: bool [h, w]."""
    h, w = int(shape[0]), int(shape[1])
    runs = np.frombuffer(data, dtype="<u4").astype(np.int64)
    if int(runs.sum()) != h * w:
        raise StoreError(f"mask RLE covers {int(runs.sum())} pixels, expected {h}x{w} = {h * w}",
                         fix="the store is corrupt; rebuild the index (spml-deploy index build)")
    values = (np.arange(runs.size) % 2).astype(bool)
    return np.repeat(values, runs).reshape(h, w)


def content_hash(image: np.ndarray) -> str:
    """sha256 (hex) of a decoded image: its shape and its pixel bytes (RGB uint8 [H, W, 3] as
    ``imageio.read_image`` returns it). The same picture re-encoded losslessly, or uploaded
    instead of read from disk, has the same hash; a resized or re-compressed (JPEG) one does not."""
    arr = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# records


@dataclass
class ImageRecord:
    """One image to add: absolute ``path``, relative name, original size, its segments."""

    path: str
    rel: str
    width: int
    height: int
    boxes: np.ndarray                 # [S, 4] int (x, y, w, h) in original pixels
    areas: np.ndarray                 # [S] int pixels at original size
    class_ids: np.ndarray             # [S] int predicted class
    masks: list[bytes]                # S RLE blobs (rle-bbox-u32)
    vectors: np.ndarray               # [S, D] float32 unit prototypes (for the index, not SQLite)
    content_sha256: str | None = None  # content_hash of the decoded image

    @property
    def num_segments(self) -> int:
        return int(self.vectors.shape[0])


@dataclass
class SegmentRow:
    """One stored segment (``id`` = its prototype index id)."""

    id: int
    image_path: str
    image_rel: str
    segment_index: int
    box: tuple[int, int, int, int]    # x, y, w, h in original pixels
    area: int
    class_id: int
    mask_rle: bytes = field(repr=False)
    image_size: tuple[int, int] = (0, 0)   # (width, height)
    image_id: int = -1                     # the store's id of the image

    def mask(self) -> np.ndarray:
        """The segment mask inside its box, bool [h, w]."""
        return rle_decode(self.mask_rle, (self.box[3], self.box[2]))

    def full_mask(self) -> np.ndarray:
        """The segment mask at the original image size, bool [height, width]."""
        w_img, h_img = self.image_size
        out = np.zeros((h_img, w_img), bool)
        x, y, w, h = self.box
        out[y:y + h, x:x + w] = self.mask()
        return out


# --------------------------------------------------------------------------------------------
# the store


class SegmentStore:
    """SQLite store of images and segments; thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError("no segment store here", path=self.path,
                             fix="build the index first: spml-deploy index build MODEL IMAGES --out DIR")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._con = sqlite3.connect(str(self.path), check_same_thread=False,
                                        isolation_level=None, timeout=60.0)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=FULL")
            self._con.executescript(_SCHEMA)
            columns = {r[1] for r in self._con.execute("PRAGMA table_info(images)")}
            seg_columns = {r[1] for r in self._con.execute("PRAGMA table_info(segments)")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"not a readable SQLite segment store ({exc})", path=self.path,
                             fix="rebuild the index (spml-deploy index build)") from exc
        self._has_hash = "content_sha256" in columns      # stores from before the column: no
        self.has_vector_column = "vector" in seg_columns   # schema 1: vectors in SQLite too
        if self._has_hash:
            self._con.execute(_HASH_INDEX)

    def _add_hash_column(self) -> None:
        """Give a store from before content hashes the column (its old images keep NULL)."""
        if not self._has_hash:
            self._con.execute("ALTER TABLE images ADD COLUMN content_sha256 TEXT")
            self._con.execute(_HASH_INDEX)
            self._has_hash = True

    # ---------------------------------------------------------------- meta
    def set_meta(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                      [(k, json.dumps(v)) for k, v in values.items()])
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def meta(self) -> dict[str, Any]:
        with self._lock:
            rows = self._con.execute("SELECT key, value FROM meta").fetchall()
        return {k: json.loads(v) for k, v in rows}

    # ---------------------------------------------------------------- writing
    def add_images(self, records: Iterable[ImageRecord]) -> np.ndarray:
        """Insert images and their segments in ONE transaction; returns the new segment ids [N].

        Ids continue the dense sequence (:meth:`next_id` .. ``next_id() + N - 1``) in record
        order; the caller makes the records' vectors durable first (see
        :func:`spml_deploy.serving.vectors.add_batch`). Images already in the store (same path)
        must be filtered out by the caller.
        """
        records = list(records)
        if self.has_vector_column:
            raise StoreError("this store has the old layout (vectors in SQLite) and cannot take "
                             "new segments as it is", path=self.path,
                             fix="add images with 'spml-deploy index add', which migrates it first")
        with self._lock:
            self._add_hash_column()
            self._con.execute("BEGIN IMMEDIATE")
            try:
                next_id = self._con.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM segments") \
                    .fetchone()[0]
                first = next_id
                for rec in records:
                    cur = self._con.execute(
                        "INSERT INTO images(path, rel, width, height, num_segments, "
                        "content_sha256) VALUES (?, ?, ?, ?, ?, ?)",
                        (rec.path, rec.rel, int(rec.width), int(rec.height), rec.num_segments,
                         rec.content_sha256))
                    image_id = cur.lastrowid
                    rows = [(next_id + s, image_id, s, *(int(v) for v in rec.boxes[s]),
                             int(rec.areas[s]), int(rec.class_ids[s]), rec.masks[s])
                            for s in range(rec.num_segments)]
                    self._con.executemany(
                        "INSERT INTO segments(id, image_id, segment_index, x, y, w, h, area, "
                        "class_id, mask_rle) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    next_id += rec.num_segments
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
        return np.arange(first, next_id, dtype=np.int64)

    # ---------------------------------------------------------------- reading
    def count(self) -> int:
        """Number of segments (= the next id)."""
        with self._lock:
            n, top = self._con.execute("SELECT COUNT(*), COALESCE(MAX(id) + 1, 0) FROM segments") \
                .fetchone()
        if n != top:
            raise StoreError(f"segment ids are not dense ({n} rows, largest id {top - 1})",
                             path=self.path, fix="rebuild the index (spml-deploy index build)")
        return int(n)

    def num_images(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def image_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._con.execute("SELECT path FROM images")}

    def images_with_hash(self, sha256: str) -> dict[int, int]:
        """{image id: number of segments} of the indexed images whose content hash is ``sha256``."""
        if not self._has_hash:
            return {}
        with self._lock:
            rows = self._con.execute("SELECT id, num_segments FROM images WHERE content_sha256 = ?",
                                     (sha256,)).fetchall()
        return {int(i): int(n) for i, n in rows}

    def images_without_hash(self) -> int:
        """Number of images indexed before content hashes were stored (their copies cannot be
        recognised)."""
        with self._lock:
            if not self._has_hash:
                return int(self._con.execute("SELECT COUNT(*) FROM images").fetchone()[0])
            return int(self._con.execute("SELECT COUNT(*) FROM images "
                                         "WHERE content_sha256 IS NULL").fetchone()[0])

    def next_id(self) -> int:
        """The id the next added segment gets (the largest id + 1; 0 for an empty store)."""
        with self._lock:
            return int(self._con.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM segments")
                       .fetchone()[0])

    def class_ids(self, start: int, stop: int) -> np.ndarray:
        """Predicted classes (the index labels) of the segments ``start <= id < stop``, int64
        [stop - start] in id order."""
        with self._lock:
            rows = self._con.execute("SELECT class_id FROM segments WHERE id >= ? AND id < ? "
                                     "ORDER BY id", (int(start), int(stop))).fetchall()
        if len(rows) != stop - start:
            raise StoreError(f"segments {start}..{stop - 1} are not all in the store", path=self.path,
                             fix="rebuild the index (spml-deploy index build)")
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def column_vectors(self, start: int, stop: int, dim: int) -> np.ndarray:
        """Schema 1 only: the vectors [stop - start, dim] float32 of the segments ``start <= id <
        stop`` from the ``segments.vector`` column."""
        if not self.has_vector_column:
            raise StoreError("this store keeps no vectors (they live in the index file)",
                             path=self.path, fix="read them from the prototype index")
        with self._lock:
            rows = self._con.execute("SELECT vector FROM segments WHERE id >= ? AND id < ? "
                                     "ORDER BY id", (int(start), int(stop))).fetchall()
        if len(rows) != stop - start:
            raise StoreError(f"segments {start}..{stop - 1} are not all in the store", path=self.path,
                             fix="rebuild the index (spml-deploy index build)")
        if not rows:
            return np.zeros((0, dim), np.float32)
        vecs = np.frombuffer(b"".join(r[0] for r in rows), dtype="<f4").astype(np.float32)
        return vecs.reshape(len(rows), dim)

    # ---------------------------------------------------------------- maintenance
    def drop_vector_column(self) -> None:
        """Schema 1 -> current: drop ``segments.vector`` and record the schema version in one
        transaction, then give the space back (VACUUM). Only once the vectors are saved in the
        index file."""
        with self._lock:
            if not self.has_vector_column:
                return
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.execute("ALTER TABLE segments DROP COLUMN vector")
                self._con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                  ("schema_version", json.dumps(STORE_SCHEMA_VERSION)))
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self.has_vector_column = False
            self._con.execute("VACUUM")

    def truncate(self, n: int) -> int:
        """Delete the segments with ``id >= n`` and the images they belong to (so that ``index
        add`` segments those images again); returns the number of images deleted."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                images = [r[0] for r in self._con.execute(
                    "SELECT DISTINCT image_id FROM segments WHERE id >= ?", (int(n),))]
                self._con.executemany("DELETE FROM segments WHERE image_id = ?",
                                      [(i,) for i in images])
                self._con.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in images])
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
        return len(images)

    def segments(self, ids: Iterable[int]) -> list[SegmentRow]:
        """Rows for ``ids`` in the given order (unknown ids raise :class:`StoreError`)."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        found: dict[int, SegmentRow] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                q = ("SELECT s.id, i.path, i.rel, s.segment_index, s.x, s.y, s.w, s.h, s.area, "
                     "s.class_id, s.mask_rle, i.width, i.height, i.id FROM segments s "
                     "JOIN images i ON i.id = s.image_id WHERE s.id IN "
                     f"({','.join('?' * len(chunk))})")
                for r in self._con.execute(q, chunk):
                    found[r[0]] = SegmentRow(r[0], r[1], r[2], r[3], (r[4], r[5], r[6], r[7]),
                                             r[8], r[9], bytes(r[10]), (r[11], r[12]), r[13])
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"the prototype index returned ids {missing[:5]} that the store does not "
                             "hold", path=self.path,
                             fix="the index and store are out of sync; rebuild the index")
        return [found[i] for i in ids]

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> "SegmentStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
