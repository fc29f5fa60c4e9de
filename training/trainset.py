"""Training samples: weak label maps and over-segmentations prepared once, then augmented per step.

Preparation turns each training image's weak annotation into a pixel label map (class ids,
``UNL`` = ``num_classes`` for unlabelled-but-used pixels, ``VOID`` = 255) and computes its
over-segmentation; both are cached as files in the run folder so that a resumed or repeated run
does not redo them. The torch ``Dataset`` reads image, label map and regions from disk and applies
the augmentation of spec section 1.2 (:func:`spml_deploy.training.augment.scale_crop`, then
:func:`~spml_deploy.training.augment.normalize`), keeping decoded files in a :class:`DecodedCache`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spml_deploy.config import VOID, RunConfig
from spml_deploy.data.dataset import Dataset, ImageRecord
from spml_deploy.data.imageio import read_image, read_label_png, write_label_png
from spml_deploy.training.augment import DEFAULT_CACHE_BYTES, DecodedCache, normalize, scale_crop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedItem:
    """Paths of one prepared training image."""

    stem: str
    image: Path
    label: Path        # uint8 PNG: class ids, UNL = num_classes, VOID = 255
    region: Path       # over-segmentation ids (< 256)
    tags: tuple[int, ...]


def _read_region(path: Path) -> np.ndarray:
    """An over-segmentation file (``.npz`` with ``region``, or a label PNG) as int32 [H, W]."""
    region = np.load(path)["region"] if path.suffix == ".npz" else read_label_png(path)
    return region.astype(np.int32)


def prepare(dataset: Dataset, records: list[ImageRecord], supervision: str, cfg: RunConfig,
            cache_dir: Path, device: str = "cpu", cams: dict | None = None,
            progress: bool = True) -> list[PreparedItem]:
    """Weak label maps and over-segmentations for ``records``, cached under ``cache_dir``.

    ``cams`` maps a record stem to its class activation maps (tags and boxes supervision).
    """
    from spml_deploy.training.overseg import OversegCache
    from spml_deploy.training.weak_labels import check_supervision, weak_label_map, weak_tags

    check_supervision(records, supervision)

    label_dir = cache_dir / f"labels-{supervision}"
    overseg = OversegCache(cache_dir / "overseg", method=cfg.train.overseg,
                           max_regions=cfg.train.overseg_regions)
    C = dataset.num_classes
    items = []
    for rec in tqdm(records, desc=f"preparing {supervision} labels", disable=not progress,
                    unit="img", leave=False):
        label_path = label_dir / f"{rec.stem}.png"
        image = None
        if not label_path.is_file():
            cam = None if cams is None else cams.get(rec.stem)
            label = weak_label_map(rec, supervision, C, cfg.train, cams=cam, strict=False)
            if cfg.compat.unlabeled_as_void:
                label = np.where((label >= C) & (label != VOID), VOID, label).astype(np.uint8)
            write_label_png(label_path, label)
        else:
            label = read_label_png(label_path)
        region_path = overseg.path_for(rec.path)
        if not region_path.is_file():
            image = read_image(rec.path) if image is None else image
            overseg.get(rec.path, image)
        vec = weak_tags(rec, supervision, label, C)
        tags = tuple(int(i) for i in np.flatnonzero(vec) if i > 0)
        items.append(PreparedItem(rec.stem, Path(rec.path), label_path, region_path, tags))
    return items


class TrainSet(torch.utils.data.Dataset):
    """Augmented crops of prepared items; sample ``i`` of epoch ``e`` is deterministic in the seed."""

    def __init__(self, items: list[PreparedItem], cfg: RunConfig, num_classes: int, seed: int):
        self.items = items
        self.cfg = cfg
        self.num_classes = num_classes
        self.seed = seed
        # one cache per loading process: the budget is shared by the DataLoader workers
        self.cache = DecodedCache(DEFAULT_CACHE_BYTES // max(1, cfg.train.workers))

    def __len__(self) -> int:
        return len(self.items)

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3], label map uint8 [H, W] and region map int32 [H, W] of an item."""
        it = self.items[idx]
        image = self.cache.get(it.image)
        label = self.cache.get(it.label, read_label_png)
        region = self.cache.get(it.region, _read_region)
        return image, label, region

    def sample(self, idx: int, draw: int) -> dict[str, torch.Tensor]:
        """Crop number ``draw`` of item ``idx`` (the RNG is seeded by (seed, draw, idx)):
        ``image`` float32 [3, crop, crop], ``label`` and ``region`` int64 [crop, crop], ``tags``
        float32 [C] (1 for the item's tags), ``index``."""
        rng = np.random.default_rng([self.seed, draw, idx])
        image, label, region = self.load(idx)
        t = self.cfg.train
        c = scale_crop(image, label, t.crop, t.scale_range, rng, region=region)
        img = normalize(c.image[None], self.cfg.preprocess, valid=[c.valid])[0]
        tags = np.zeros(self.num_classes, np.float32)
        tags[list(self.items[idx].tags)] = 1.0
        return {"image": img, "label": torch.from_numpy(c.label.astype(np.int64)),
                "region": torch.from_numpy(c.region.astype(np.int64)),
                "tags": torch.from_numpy(tags), "index": torch.tensor(idx)}

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        idx, draw = key
        return self.sample(idx, draw)


class StepSampler(torch.utils.data.Sampler):
    """Yields (item, draw) keys for steps ``start..total``: batch of step t is a deterministic
    function of (seed, t), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, n_items: int, batch: int, start: int, total: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.n, self.batch, self.start, self.total, self.seed = n_items, batch, start, total, seed
        self.rank, self.world = rank, world
        self.per_rank = batch // world

    def __iter__(self):
        lo = self.rank * self.per_rank
        for step in range(self.start, self.total):
            rng = np.random.default_rng([self.seed, 7919, step])
            idx = rng.choice(self.n, size=self.batch, replace=self.n < self.batch)
            for j in range(lo, lo + self.per_rank):     # this process's share of the step
                yield (int(idx[j]), step * self.batch + j)

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.per_rank
