"""Retrieval quality on a dataset with ground-truth masks: precision@k of point queries.

For every object of the query split (a connected region of one class in the ground-truth mask,
at least ``min_area`` pixels), the query is a point deep inside it (the maximum of its distance
transform); a hit counts as correct when the ground-truth class under the hit's segment mask
(majority of its pixels) is the object's class. Precision@k is the mean over queries of the
fraction of correct hits. The confusion counts where the hits go (query class x hit class), so
a report says which classes are mistaken for which.

This is the measure of issue 6's target (precision@10 >= 0.8 on the built-in scenes); the tests
and ``benchmarks/retrieval_quality.py`` both use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spml_deploy.data.imageio import read_image, read_label_png


@dataclass
class PrecisionReport:
    precision: float              # mean over queries of the fraction of correct hits
    queries: int
    per_class: dict[int, float]   # query class -> mean precision of its queries
    confusion: np.ndarray         # [classes, classes] hit counts: query class x hit class

    def format(self, class_names: list[str] | None = None) -> str:
        name = (lambda c: class_names[c]) if class_names else str
        per = ", ".join(f"{name(c)} {p:.2f}" for c, p in sorted(self.per_class.items()))
        return f"precision@k {self.precision:.3f} over {self.queries} queries ({per})"


def _mask_path(dataset: Path, image_name: str) -> Path:
    return dataset / "masks" / (Path(image_name).stem + ".png")


def query_points(mask: np.ndarray, min_area: int = 30) -> list[tuple[int, int, int]]:
    """(x, y, class) of one point deep inside every connected object region of ``mask``
    (class 0 = background is skipped; regions under ``min_area`` pixels too)."""
    import cv2

    out = []
    for c in np.unique(mask):
        if c == 0:
            continue
        n, comp = cv2.connectedComponents((mask == c).astype(np.uint8))
        for j in range(1, n):
            region = (comp == j).astype(np.uint8)
            if region.sum() < min_area:
                continue
            dist = cv2.distanceTransform(region, cv2.DIST_L2, 3)
            y, x = np.unravel_index(np.argmax(dist), dist.shape)
            out.append((int(x), int(y), int(c)))
    return out


def point_query_precision(retriever, dataset: str | Path, k: int = 10, split: str = "val",
                          num_classes: int = 256, min_area: int = 30) -> PrecisionReport:
    """Precision@``k`` of point queries on the ``split`` images of ``dataset`` (a dataset folder
    with ``images/<split>_*`` and ``masks/``) against ``retriever``'s index, whose images must
    have ground-truth masks in the same ``masks/`` folder (matched by file stem)."""
    dataset = Path(dataset)
    gt_cache: dict[str, np.ndarray] = {}
    precisions: list[float] = []
    by_class: dict[int, list[float]] = {}
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for img_path in sorted((dataset / "images").glob(f"{split}_*")):
        mask = read_label_png(_mask_path(dataset, img_path.name))
        image = read_image(img_path)
        for x, y, c in query_points(mask, min_area):
            hits, _ = retriever.query(image, point=(x, y), k=k)
            ok = 0
            for h in hits:
                name = Path(h.image).name
                if name not in gt_cache:
                    gt_cache[name] = read_label_png(_mask_path(dataset, name))
                under = gt_cache[name][h.row.full_mask()]
                got = int(np.bincount(under, minlength=num_classes).argmax())
                confusion[c, got] += 1
                ok += int(got == c)
            p = ok / max(1, len(hits))
            precisions.append(p)
            by_class.setdefault(c, []).append(p)
    return PrecisionReport(float(np.mean(precisions)) if precisions else 0.0, len(precisions),
                           {c: float(np.mean(v)) for c, v in by_class.items()}, confusion)
