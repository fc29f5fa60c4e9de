"""Segment retrieval: queries against a built index (:mod:`spml_deploy.serving.ingest`).

An index folder holds ``segments.sqlite`` (:mod:`spml_deploy.serving.store`: images, segments,
meta; no vectors) and ``prototypes.npz`` (the prototype index: the segments' vectors, ids = store
ids, labels = their classes), plus ``pending/`` batches not yet merged into it; every open
completes the index from them (:mod:`spml_deploy.serving.vectors`).

:meth:`Retriever.query` finds the segments most similar to a point, a box or a mask on a query
image (:func:`spml_deploy.serving.segments.query_vector`), optionally keeping only one predicted
class. By default the query image's own segments are left out when the image is in the index
(recognised by the :func:`~spml_deploy.serving.store.content_hash` of its decoded pixels, stored
per image): otherwise its neighbouring segments fill the top of the list.

Hits name their image three ways: ``image`` the absolute path on the indexing machine (for
local use: drawing, the CLI), ``image_rel`` the path relative to the folder given to ``index
build`` (what the HTTP service returns, never the server's file system layout) and ``image_id``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spml_deploy.artifacts import model_folder
from spml_deploy.data.imageio import atomic_write_bytes, read_image
from spml_deploy.engine.backends import load_backend
from spml_deploy.engine.bundle import Bundle
from spml_deploy.errors import SpmlError
from spml_deploy.serving.ingest import check_model, open_model, stored_flip
from spml_deploy.serving.segments import (QueryError, SegmentedImage, query_vector, read_mask,
                                          segment_images)
from spml_deploy.serving.store import STORE_FILE, SegmentRow, SegmentStore, content_hash
from spml_deploy.serving.vectors import exclusive, sync_index

log = logging.getLogger(__name__)


@dataclass
class Hit:
    """One retrieved segment."""

    score: float                    # cosine similarity to the query prototype
    image: str                      # indexed image: absolute path on the indexing machine
    segment_id: int                 # store/FAISS id
    box: tuple[int, int, int, int]  # x, y, w, h in original pixels
    class_id: int
    class_name: str
    area: int
    row: SegmentRow = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    image_rel: str = ""             # path relative to the images root of 'index build'
    image_id: int = -1              # the store's id of the image

    def to_dict(self, local_paths: bool = False) -> dict[str, Any]:
        """JSON form: ``image`` is the relative name; ``local_paths`` adds ``path`` (absolute,
        for a local user; the HTTP service never sends it)."""
        out = {"score": round(float(self.score), 6), "image": self.image_rel,
               "image_id": self.image_id, "segment_id": self.segment_id, "box": list(self.box),
               "class_id": self.class_id, "class": self.class_name, "area": self.area}
        if local_paths:
            out["path"] = self.image
        return out




class Retriever:
    """An opened index (store + prototype index) and its model, for repeated queries.

    Thread-safe for concurrent queries when the backend is (the HTTP service serialises the
    network calls with a lock).
    """

    def __init__(self, index_dir: str | Path, model_path: str | Path | Bundle | None = None,
                 backend: str = "torch", device: str = "cpu", backend_obj=None,
                 **backend_options: Any):
        """``model_path`` (default: the index's model) is opened and verified here unless
        ``backend_obj``, an opened backend of that model, is given."""
        self.index_dir = Path(index_dir)
        self._own_backend = backend_obj is None
        self.store = SegmentStore(self.index_dir / STORE_FILE)
        try:
            self.meta = self.store.meta()
            model = model_path or self.meta["model_path"]
            if backend_obj is None:
                bundle = open_model(model)
                folder, self.manifest = bundle.folder, bundle.manifest
            else:
                folder = model.folder if isinstance(model, Bundle) else model_folder(model)
                self.manifest = backend_obj.manifest
            check_model(self.meta, self.manifest, folder)
            with exclusive(self.index_dir, required=False) as writer:   # no add running
                self.index = sync_index(self.index_dir, self.store, save=writer)
            if backend_obj is None:
                backend_obj = load_backend(bundle, kind=backend, device=device, **backend_options)
            self.backend = backend_obj
        except BaseException:
            self.store.close()
            raise
        self.grid = tuple(self.meta["test_grid"])
        self.iters = int(self.meta["kmeans_iters"])
        self.flip = stored_flip(self.meta)
        self.classes = list(self.meta["classes"])
        self.unhashed_images = self.store.images_without_hash()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def segment(self, image: np.ndarray) -> SegmentedImage:
        """The query image's segments (same grid, iterations and flip averaging as the index)."""
        return segment_images(self.backend, self.manifest.preprocess, [image], self.grid,
                              self.iters, len(self.classes), self.flip)[0]  # type: ignore[arg-type]

    def class_id(self, class_name: str | None) -> int | None:
        if class_name is None:
            return None
        if class_name in self.classes:
            return self.classes.index(class_name)
        raise QueryError(f"unknown class '{class_name}'",
                         fix=f"choose one of {', '.join(self.classes)}")

    def search(self, vector: np.ndarray, k: int = 10, class_id: int | None = None,
               exclude_images: dict[int, int] | None = None) -> list[Hit]:
        """Top-``k`` segments by cosine similarity to ``vector`` [D]; with ``class_id`` only
        segments predicted as that class; ``exclude_images`` ({image id: its segment count}, see
        :meth:`self_images`) leaves out the segments of those images. The search goes deeper
        until k segments pass the filters (or the index is exhausted)."""
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}", fix="e.g. -k 10")
        n = len(self)
        if n == 0:
            return []
        skip = dict(exclude_images or {})
        depth = min(n, (k if class_id is None else max(4 * k, 64)) + sum(skip.values()))
        q = np.ascontiguousarray(vector, np.float32).reshape(1, -1)
        while True:
            scores, ids = self.index.search(q, depth)
            scores, ids = np.asarray(scores)[0], np.asarray(ids)[0]
            ok = ids >= 0
            rows = self.store.segments(ids[ok].tolist())
            hits = [Hit(float(s), r.image_path, r.id, tuple(r.box), r.class_id,
                        self._name(r.class_id), r.area, r, r.image_rel, r.image_id)
                    for s, r in zip(scores[ok], rows) if r.image_id not in skip]
            if class_id is not None:
                hits = [h for h in hits if h.class_id == class_id]
            if len(hits) >= k or depth >= n:
                return hits[:k]
            depth = min(n, depth * 4)

    def self_images(self, image: np.ndarray) -> tuple[dict[int, int], bool | None]:
        """The indexed copies of ``image`` (same decoded pixels): ({image id: segment count},
        whether the image is in the index: True, False, or None when it is not found but some
        images were indexed before content hashes were stored, so it cannot be told)."""
        found = self.store.images_with_hash(content_hash(image))
        if found:
            return found, True
        return found, (None if self.unhashed_images else False)

    def query(self, image: np.ndarray | str | Path, point: Any = None, box: Any = None,
              mask: np.ndarray | str | Path | None = None, k: int = 10,
              class_name: str | None = None, exclude_self: bool = True,
              seg: SegmentedImage | None = None) -> tuple[list[Hit], dict[str, Any]]:
        """Hits for a point / box / mask on ``image`` (array or path), and the query's description.

        ``exclude_self``: leave out the segments of the query image itself when it is in the
        index (same decoded pixels). The description says so: ``in_index`` (True / False / None:
        cannot be told, see :meth:`self_images`) and ``excluded_images`` (how many indexed
        images were left out). ``seg``: the query image's :meth:`segment`, when the caller has it.
        """
        class_id = self.class_id(class_name)
        if not isinstance(image, np.ndarray):
            image = read_image(image)
        if mask is not None and not isinstance(mask, np.ndarray):
            mask = read_mask(mask)
        seg = self.segment(image) if seg is None else seg
        vec, desc = query_vector(seg, point=point, box=box, mask=mask)
        if "class_id" in desc:
            desc["class"] = self._name(desc["class_id"])
        copies, in_index = self.self_images(image)
        skip = copies if exclude_self else {}
        desc.update(in_index=in_index, excluded_images=len(skip))
        return self.search(vec, k, class_id, exclude_images=skip), desc

    def _name(self, class_id: int) -> str:
        return self.classes[class_id] if 0 <= class_id < len(self.classes) else str(class_id)

    def info(self) -> dict[str, Any]:
        return {"index_dir": str(self.index_dir), "segments": len(self),
                "images": self.store.num_images(), "index_type": self.meta["index_type"],
                "embed_dim": self.meta["embed_dim"], "flip": self.flip, "classes": self.classes}

    def close(self) -> None:
        self.store.close()
        if self._own_backend:
            self.backend.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(index_dir: str | Path, model_path: str | Path | None, image: str | Path | np.ndarray,
          point: Any = None, box: Any = None, mask: str | Path | np.ndarray | None = None,
          k: int = 10, class_name: str | None = None, backend: str = "torch",
          device: str = "cpu", exclude_self: bool = True) -> list[Hit]:
    """Top-``k`` indexed segments most similar to a point / box / mask on ``image``.

    ``model_path`` None: the model the index was built with. ``class_name``: keep only hits
    predicted as that class. ``exclude_self``: see :meth:`Retriever.query`. Raises
    :class:`QueryError` for out-of-image points/boxes.
    """
    with Retriever(index_dir, model_path, backend=backend, device=device) as r:
        hits, _ = r.query(image, point=point, box=box, mask=mask, k=k, class_name=class_name,
                          exclude_self=exclude_self)
    return hits


# --------------------------------------------------------------------------------------------
# drawing


def render_hits(hits: Sequence[Hit], out_png: str | Path, *, tile: int = 192, cols: int = 5,
                query_image: np.ndarray | None = None, query_mask: np.ndarray | None = None,
                store: SegmentStore | None = None) -> Path:
    """Grid of the retrieved segments highlighted in their images (PNG, written atomically).

    Each tile: the image region around the segment's box (with a margin), the segment tinted and
    outlined, the rank, score and class. ``query_image`` (+ bool ``query_mask``) adds the query
    as the first tile. Unreadable hit images become grey tiles.
    """
    import cv2
    from PIL import Image
    import io

    tiles = []
    if query_image is not None:
        qm = query_mask if query_mask is not None else np.zeros(query_image.shape[:2], bool)
        tiles.append(_tile(query_image, qm, None, "query", tile, (255, 80, 80)))
    for rank, h in enumerate(hits, 1):
        row = h.row if h.row is not None else (store.segments([h.segment_id])[0] if store else None)
        label = f"#{rank} {h.score:.2f} {h.class_name}"
        try:
            img = read_image(h.image)
            m = row.full_mask() if row is not None else np.zeros(img.shape[:2], bool)
            if m.shape != img.shape[:2]:
                raise SpmlError("image changed since it was indexed", path=h.image)
            tiles.append(_tile(img, m, h.box, label, tile, (80, 255, 80)))
        except SpmlError as exc:
            log.warning("render_hits: %s", exc)
            blank = np.full((tile, tile, 3), 96, np.uint8)
            cv2.putText(blank, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
            tiles.append(blank)
    if not tiles:
        tiles.append(np.full((tile, tile, 3), 96, np.uint8))
    ncol = max(1, min(cols, len(tiles)))
    nrow = -(-len(tiles) // ncol)
    grid = np.full((nrow * tile, ncol * tile, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncol)
        grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = t
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return atomic_write_bytes(out_png, buf.getvalue())


def _tile(image: np.ndarray, mask: np.ndarray, box, label: str, size: int,
          colour: tuple[int, int, int]) -> np.ndarray:
    import cv2

    H, W = image.shape[:2]
    if box is None:
        ys, xs = np.nonzero(mask)
        box = (0, 0, W, H) if ys.size == 0 else (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                  ys.max() - ys.min() + 1)
    x, y, w, h = (int(v) for v in box)
    side = int(max(w, h) * 1.6) + 8
    cx, cy = x + w / 2, y + h / 2
    x0 = int(np.clip(cx - side / 2, 0, max(0, W - side)))
    y0 = int(np.clip(cy - side / 2, 0, max(0, H - side)))
    x1, y1 = min(W, x0 + side), min(H, y0 + side)
    img = image.astype(np.float32)
    tint = np.asarray(colour, np.float32)
    img[mask] = 0.55 * img[mask] + 0.45 * tint
    img = img.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    img = np.ascontiguousarray(img)
    cv2.drawContours(img, contours, -1, colour, max(1, int(round(max(W, H) / 256))))
    crop = img[y0:y1, x0:x1]
    ch, cw = crop.shape[:2]
    s = size / max(ch, cw)
    crop = cv2.resize(crop, (max(1, int(round(cw * s))), max(1, int(round(ch * s)))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST)
    out = np.full((size, size, 3), 32, np.uint8)
    out[: crop.shape[0], : crop.shape[1]] = crop[:size, :size]
    cv2.rectangle(out, (0, 0), (size - 1, 16), (0, 0, 0), -1)
    cv2.putText(out, label[:32], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out
