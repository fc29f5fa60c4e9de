"""The softmax classifier on frozen embeddings (spec 7.1): f1 (and f2) trained on pseudo labels.

The embedding network stays in eval mode and receives no gradient (pitfall 14). Each step takes
augmented crops (flip, scale U(0.5, 2.0), crop, grayscale p 0.3, Gaussian blur p 0.5), computes
their unit embeddings without gradient, and trains the classifier with cross-entropy on the label
map (VOID and unlabelled codes ignored), the logits bilinearly upsampled to the label size.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spml_deploy.config import RunConfig
from spml_deploy.data.imageio import read_image, read_label_png
from spml_deploy.engine.model import PixelClassifier, param_groups
from spml_deploy.training.trainset import augment

log = logging.getLogger(__name__)

STANDALONE_DROPOUT = 0.65


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grayscale (0.3, 0.59, 0.11) with p 0.3, 5x5 Gaussian blur sigma U(0.1, 5) with p 0.5."""
    if rng.random() < 0.3:
        g = image.astype(np.float32) @ np.array([0.3, 0.59, 0.11], np.float32)
        image = np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (5, 5), float(rng.uniform(0.1, 5.0)))
    return image


def train_classifier(net: torch.nn.Module, items: list[tuple[Path, Path]], cfg: RunConfig,
                     num_classes: int, device: torch.device, iters: int, seed: int = 0,
                     progress: bool = True, desc: str = "classifier f1") -> PixelClassifier:
    """Fit a stand-alone :class:`PixelClassifier` on (image path, label PNG path) pairs."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    clf = PixelClassifier(cfg.model.embed_dim, num_classes, STANDALONE_DROPOUT).to(device)
    groups = param_groups(net, clf, cfg.train.lr, cfg.train.weight_decay)
    groups = [g for g in groups if g["name"].startswith("classifier")]
    opt = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    pp = cfg.preprocess
    batch = cfg.train.batch
    bar = tqdm(range(iters), desc=desc, disable=not progress, unit="it", leave=False)
    for step in bar:
        lr = cfg.train.lr * (1 - step / iters) ** 0.9
        if step < cfg.train.warmup:
            lr = min(cfg.train.lr * (0.1 * (1 - step / cfg.train.warmup) + step / cfg.train.warmup), lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        rng = np.random.default_rng([seed, 4242, step])
        idx = rng.choice(len(items), size=batch, replace=len(items) < batch)
        xs, ys = [], []
        for i in idx:
            if i not in cache:
                cache[i] = (read_image(items[i][0]), read_label_png(items[i][1]))
            image, label = cache[i]
            image = photometric(image, rng)
            x, y, _ = augment(image, label, np.zeros(label.shape, np.int32), cfg.train.crop,
                              (0.5, 2.0), rng, pp.mean, pp.std)
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.stack(xs)).to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
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
