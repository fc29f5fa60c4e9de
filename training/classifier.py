"""The softmax classifier on frozen embeddings (spec 7.1): f1 (and f2) trained on pseudo labels.

The embedding network stays in eval mode and receives no gradient (pitfall 14). Each step takes
augmented crops (flip, scale U(0.5, 2.0), crop, grayscale p 0.3, Gaussian blur p 0.5), computes
their unit embeddings without gradient, and trains the classifier with cross-entropy on the label
map (VOID and unlabelled codes ignored), the logits bilinearly upsampled to the label size.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spml_deploy.config import RunConfig
from spml_deploy.data.imageio import read_label_png
from spml_deploy.engine.model import PixelClassifier, param_groups
from spml_deploy.training.augment import DecodedCache, normalize, photometric, scale_crop
from spml_deploy.training.schedule import LRSchedule, make_optimizer

log = logging.getLogger(__name__)

STANDALONE_DROPOUT = 0.65


def train_classifier(net: torch.nn.Module, items: list[tuple[Path, Path]], cfg: RunConfig,
                     num_classes: int, device: torch.device, iters: int, seed: int = 0,
                     progress: bool = True, desc: str = "classifier f1") -> PixelClassifier:
    """Fit a stand-alone :class:`PixelClassifier` on (image path, label PNG path) pairs.

    The poly schedule with the spec-6 warm-up and SGD whatever ``train.schedule`` and
    ``train.optimizer`` say (spec 7.1); decoded images and labels stay in memory.
    """
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    clf = PixelClassifier(cfg.model.embed_dim, num_classes, STANDALONE_DROPOUT).to(device)
    groups = param_groups(net, clf, cfg.train.lr, cfg.train.weight_decay)
    groups = [g for g in groups if g["name"].startswith("classifier")]
    opt = make_optimizer(groups, cfg.train, "sgd")
    schedule = LRSchedule(cfg.train.lr, iters, cfg.train.warmup, "poly")
    cache = DecodedCache(None)
    batch = cfg.train.batch
    bar = tqdm(range(iters), desc=desc, disable=not progress, unit="it", leave=False)
    for step in bar:
        schedule.apply(opt, step)
        rng = np.random.default_rng([seed, 4242, step])
        idx = rng.choice(len(items), size=batch, replace=len(items) < batch)
        crops = []
        for i in idx:
            image = photometric(cache.get(items[i][0]), rng)
            crops.append(scale_crop(image, cache.get(items[i][1], read_label_png),
                                    cfg.train.crop, (0.5, 2.0), rng))
        x = normalize(np.stack([c.image for c in crops]), cfg.preprocess, device,
                      valid=[c.valid for c in crops])
        y = torch.from_numpy(np.stack([c.label for c in crops]).astype(np.int64)).to(device)
        with torch.no_grad():
            phi = F.normalize(net(x), dim=1, eps=1e-12)
        logits = F.interpolate(clf(phi), size=y.shape[-2:], mode="bilinear", align_corners=False)
        target = torch.where(y >= num_classes, torch.full_like(y, -100), y)
        if not (target >= 0).any():
            continue
        loss = F.cross_entropy(logits, target, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(CE=f"{loss.item():.3f}", refresh=False)
    clf.eval()
    return clf
