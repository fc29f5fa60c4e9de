"""Class activation maps for tag and box supervision (spec "Substitutes", spec 1.1).

SEAM's classifier is not available, so ``train`` first fits a multi-label classifier with the
same backbone as the embedding network and global average pooling, on the image tags, and takes
its class activation maps (Zhou et al. 2016):

* :class:`CamNet`: backbone (stride 8) -> 1x1 convolution to ``C-1`` foreground scores ->
  global average pooling -> multi-label logits. ``CAM_c = ReLU(w_c . f)`` at every feature
  position (the 1x1 convolution without its bias; the bias only shifts the pooled logit).
* :func:`train_cam`: BCE on the tags; augmentation
  (:func:`spml_deploy.training.augment.fit_in_canvas`): horizontal flip p=0.5 and a random
  rescale that keeps the *whole* image inside the crop, placed at a random position of a
  ``crop x crop`` canvas padded with the mean colour -- a crop that cut an object out would make
  its tag wrong. SGD (momentum, weight decay of the train config) with the poly schedule and a
  linear warm-up over ``min(warmup, cam_iters // 10)`` steps; the classifier learns 10x faster.
  Weights are cached: a file whose config hash matches is reused.
* :func:`compute_cams`: per-class maps at image size, ReLU'd, optionally averaged over scales and
  flips, each divided by its maximum; absent classes are zero.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spml_deploy.artifacts import atomic_torch_save
from spml_deploy.config import ModelConfig, PreprocessConfig, TrainConfig, to_dict
from spml_deploy.errors import ConfigError, ManifestError, TrainingError
from spml_deploy.engine.model import INPUT_MULTIPLE, SCRATCH_BN_MOMENTUM, SPEC_BN_MOMENTUM, EmbeddingNet
from spml_deploy.engine.pretrained import load_pretrained_backbone, resolve_stem
from spml_deploy.training.augment import DecodedCache, fit_in_canvas, normalize
from spml_deploy.training.schedule import LRSchedule, make_optimizer
from spml_deploy.training.label_rules import box_extent, normalize_in_box

log = logging.getLogger(__name__)

__all__ = ["CAM_VERSION", "CamNet", "cam_config_hash", "train_cam", "load_cam_model",
           "compute_cams", "cam_classes", "box_cam", "normalize_in_box"]

CAM_VERSION = 1  # bump when training changes in a way that invalidates cached weights
LR_MULT_CLASSIFIER = 10.0


class CamNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier gives class activation maps.

    ``forward``: images [B,3,H,W] -> logits [B,C-1] (foreground classes 1..C-1, class c at c-1).
    ``cams``: images [B,3,H,W] -> ReLU'd CAMs [B,C-1,H,W] (bilinear upsampling of the stride-8
    maps). H and W need not be multiples of 8 for ``cams`` (the input is padded).
    """

    def __init__(self, cfg: ModelConfig, pretrained: str | Path | None = None, stem: str | None = None):
        super().__init__()
        if cfg.num_classes < 2:
            raise ConfigError(f"a CAM classifier needs at least one foreground class "
                              f"(model.num_classes={cfg.num_classes})")
        stem = stem or resolve_stem(cfg, pretrained)
        momentum = SPEC_BN_MOMENTUM if pretrained else SCRATCH_BN_MOMENTUM
        net = EmbeddingNet(cfg, stem=stem, bn_momentum=momentum)
        if pretrained:
            load_pretrained_backbone(net, pretrained, freeze=True)
        self.backbone = net.backbone           # the embedding network's backbone, head dropped
        self.stem = stem
        self.num_fg = cfg.num_classes - 1
        self.classifier = nn.Conv2d(self.backbone.out_channels, self.num_fg, 1, bias=True)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def features(self, x: Tensor) -> Tensor:
        """Images [B,3,H,W] -> backbone features [B,F,ceil(H/8),ceil(W/8)]."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B,3,H,W] -> multi-label logits [B,C-1] (GAP of the 1x1 classifier)."""
        return self.classifier(self.features(x)).mean(dim=(2, 3))

    def cam_maps(self, feats: Tensor) -> Tensor:
        """Features [B,F,h,w] -> ReLU'd CAMs [B,C-1,h,w] (classifier weights, no bias)."""
        return F.relu(F.conv2d(feats, self.classifier.weight))

    def cams(self, x: Tensor) -> Tensor:
        """Images [B,3,H,W] -> ReLU'd CAMs [B,C-1,H,W] upsampled bilinearly to the input size."""
        h, w = x.shape[-2:]
        ph, pw = -h % INPUT_MULTIPLE, -w % INPUT_MULTIPLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        maps = self.cam_maps(self.features(x))
        maps = F.interpolate(maps, size=(h + ph, w + pw), mode="bilinear", align_corners=False)
        return maps[..., :h, :w]


# ----------------------------------------------------------------------------------------------
# training


def _tag_matrix(records: Sequence[Any], num_classes: int) -> np.ndarray:
    t = np.zeros((len(records), num_classes - 1), np.float32)
    for i, r in enumerate(records):
        for c in getattr(r, "tags", ()) or ():
            c = int(c)
            if not 1 <= c < num_classes:
                raise TrainingError(f"image '{getattr(r, 'file_name', r)}' has tag {c}, outside "
                                    f"1..{num_classes - 1}", fix="check model.num_classes")
            t[i, c - 1] = 1.0
    return t


def _file_stamp(path: Any) -> list[int]:
    """(size, mtime) of an image file, so that an edited image invalidates cached weights."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return []
    return [st.st_size, st.st_mtime_ns]


def cam_config_hash(records: Sequence[Any], model_cfg: ModelConfig, train_cfg: TrainConfig,
                    preprocess: PreprocessConfig | None = None) -> str:
    """sha256 over everything that determines the CAM weights: config, image paths with their
    size and mtime, and tags."""
    preprocess = preprocess or PreprocessConfig()
    t = train_cfg
    data = [[str(getattr(r, "path", "")), _file_stamp(getattr(r, "path", None)),
             sorted(int(c) for c in (getattr(r, "tags", ()) or ()))] for r in records]
    ident = {"version": CAM_VERSION, "model": to_dict(model_cfg),
             "mean": list(preprocess.mean), "std": list(preprocess.std),
             "train": {"iters": t.cam_iters, "batch": t.batch, "crop": t.crop, "lr": t.lr,
                       "momentum": t.momentum, "weight_decay": t.weight_decay, "warmup": t.warmup,
                       "scale_range": list(t.scale_range), "seed": t.seed,
                       "pretrained": t.pretrained},
             "data": data}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _read_checkpoint(path: Path) -> dict | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        log.warning("CAM weights %s are unreadable (%s); retraining", path, exc)
        return None
    if not isinstance(obj, dict) or "state_dict" not in obj or "config_hash" not in obj:
        log.warning("CAM weights %s are not a CAM checkpoint; retraining", path)
        return None
    return obj


def train_cam(records: Sequence[Any], model_cfg: ModelConfig, train_cfg: TrainConfig,
              device: str | torch.device, out_path: str | Path, progress: bool = True,
              preprocess: PreprocessConfig | None = None) -> Path:
    """Fit the CAM classifier on the records' tags and save it; reuse a matching cached file.

    Args:
        records: image records (``path``, ``tags``).
        model_cfg: backbone choice and ``num_classes``.
        train_cfg: ``cam_iters`` iterations of ``batch`` crops of size ``crop``; ``lr``,
            ``momentum``, ``weight_decay``, ``warmup``, ``scale_range``, ``seed``, ``pretrained``.
        device: torch device. out_path: weights file (``torch.save`` of a dict with
            ``state_dict``, ``config_hash``, ``stem``, ``num_classes``; load with
            :func:`load_cam_model`, ``weights_only=True``).
        progress: tqdm bar with the loss.

    Returns:
        ``out_path`` as a Path.
    """
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    preprocess = preprocess or PreprocessConfig()
    records = list(records)
    C = model_cfg.num_classes
    if not records:
        raise TrainingError("no training images for the CAM classifier",
                            fix="check the dataset's train split")
    tags = _tag_matrix(records, C)
    if not tags.any():
        raise TrainingError("no training image has a foreground tag, so no CAM can be learnt",
                            fix="add tags (or boxes) to annotations.json")
    digest = cam_config_hash(records, model_cfg, train_cfg, preprocess)
    if out_path.is_file():
        ck = _read_checkpoint(out_path)
        if ck is not None and ck.get("config_hash") == digest:
            log.info("reusing CAM classifier %s (config hash matches)", out_path)
            return out_path
        if ck is not None:
            log.info("CAM classifier %s was trained with another config; retraining", out_path)

    device = torch.device(device)
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng([train_cfg.seed, 7919])
    pretrained = train_cfg.pretrained or None
    model = CamNet(model_cfg, pretrained=pretrained).to(device)
    model.train()
    groups = [
        dict(params=[p for p in model.backbone.parameters() if p.requires_grad], lr_mult=1.0),
        dict(params=list(model.classifier.parameters()), lr_mult=LR_MULT_CLASSIFIER),
    ]
    opt = make_optimizer(groups, train_cfg, "sgd")
    iters = int(train_cfg.cam_iters)
    schedule = LRSchedule(train_cfg.lr, iters, min(int(train_cfg.warmup), iters // 10), "poly",
                          ramp="linear")
    pad = np.round(np.asarray(preprocess.mean) / preprocess.scale).clip(0, 255).astype(np.uint8)
    crop = int(train_cfg.crop) - int(train_cfg.crop) % INPUT_MULTIPLE
    if crop < INPUT_MULTIPLE:
        raise ConfigError(f"train.crop={train_cfg.crop} is too small for the CAM classifier",
                          fix=f"use a crop of at least {INPUT_MULTIPLE}")
    batch = max(1, min(int(train_cfg.batch), len(records)))
    cache = DecodedCache()
    tags_t = torch.from_numpy(tags).to(device)
    order = rng.permutation(len(records))
    pos = 0
    bar = tqdm(range(iters), desc="CAM classifier", unit="it", disable=not progress, leave=False)
    loss_v = float("nan")
    for step in bar:
        schedule.apply(opt, step)
        idx = []
        for _ in range(batch):
            if pos == len(order):
                order, pos = rng.permutation(len(records)), 0
            idx.append(int(order[pos]))
            pos += 1
        imgs = np.stack([fit_in_canvas(cache.get(records[i].path), crop, train_cfg.scale_range,
                                       rng, pad) for i in idx])
        x = normalize(imgs, preprocess, device)
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, tags_t[idx])
        if not torch.isfinite(loss):
            raise TrainingError(f"CAM classifier loss became {loss.item()} at step {step}",
                                fix="lower train.lr or check the images")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        bar.set_postfix(bce=f"{loss_v:.4f}", refresh=False)
    bar.close()
    log.info("CAM classifier: %d iterations, final BCE %.4f", iters, loss_v)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "config_hash": digest, "stem": model.stem,
                       "num_classes": C, "backbone": model_cfg.backbone, "iters": iters,
                       "final_loss": loss_v}, out_path)
    return out_path


def load_cam_model(path: str | Path, model_cfg: ModelConfig, device: str | torch.device = "cpu"
                   ) -> CamNet:
    """A trained :class:`CamNet` in eval mode (weights-only load; stem taken from the file)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError("CAM classifier weights are missing", path=path,
                            fix="run training with tags or boxes supervision (it trains them)")
    ck = _read_checkpoint(path)
    if ck is None:
        raise ManifestError("CAM classifier weights are corrupt", path=path,
                            fix="delete the file; training recreates it")
    if int(ck.get("num_classes", -1)) != model_cfg.num_classes:
        raise ManifestError(f"CAM classifier has {ck.get('num_classes')} classes, the model "
                            f"config {model_cfg.num_classes}", path=path,
                            fix="delete the file; training recreates it")
    model = CamNet(model_cfg, stem=str(ck.get("stem") or "deep"))
    model.load_state_dict(ck["state_dict"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# inference


def cam_classes(source: Any) -> list[int]:
    """Foreground classes to compute CAMs for: a record's tags and box classes, or class ids."""
    if hasattr(source, "tags") or hasattr(source, "boxes"):
        ids = set(int(c) for c in (getattr(source, "tags", ()) or ()))
        ids |= {int(b.category) for b in (getattr(source, "boxes", ()) or ())}
        return sorted(ids)
    return sorted({int(c) for c in source})


@torch.no_grad()
def compute_cams(model: CamNet, image: np.ndarray, classes: Any,
                 preprocess: PreprocessConfig | None = None,
                 device: str | torch.device | None = None, *, scales: Iterable[float] = (1.0,),
                 flip: bool = False) -> np.ndarray:
    """Normalised CAMs of one image for its present classes (spec 1.1).

    For every scale the image is resized (bilinear), the original and (``flip``) its mirror are
    run as one batch, the ReLU'd maps are brought back to image size and summed; each present
    class's map is then divided by its maximum (left at zero if it has no positive value).

    Args:
        model: a :class:`CamNet` (put in eval mode by the caller or :func:`load_cam_model`).
        image: height x width x 3 uint8 RGB.
        classes: a record (its tags and box classes) or foreground class ids.
        preprocess: normalisation (mean/std/scale); default ImageNet.
        device: where to run (default: the model's device).

    Returns:
        float32 array [C-1, height, width] (class c at index c-1) in [0, 1]; zero for classes
        not in ``classes``.
    """
    preprocess = preprocess or PreprocessConfig()
    param = next(model.parameters())
    dev = torch.device(device) if device is not None else param.device
    dtype = param.dtype
    present = cam_classes(classes)
    h, w = image.shape[:2]
    out = np.zeros((model.num_fg, h, w), np.float32)
    if not present:
        return out
    if min(present) < 1 or max(present) > model.num_fg:
        raise TrainingError(f"CAM classes {present} outside 1..{model.num_fg}")
    sel = torch.tensor([c - 1 for c in present], device=dev)
    acc = torch.zeros((len(present), h, w), device=dev, dtype=dtype)
    for s in scales:
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        img = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        batch = np.stack([img, img[:, ::-1]]) if flip else img[None]
        x = normalize(batch, preprocess, dev, dtype)
        maps = model.cams(x)[:, sel]                                      # [1|2, P, nh, nw]
        if flip:
            maps = maps[0:1] + maps[1:2].flip(-1)
        if (nh, nw) != (h, w):
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        acc += maps[0]
    peak = acc.flatten(1).amax(dim=1).clamp_min(0)
    acc = torch.where(peak[:, None, None] > 0, acc / peak.clamp_min(1e-12)[:, None, None],
                      torch.zeros_like(acc))
    out[[c - 1 for c in present]] = acc.float().cpu().numpy()
    return out


def box_cam(cams: np.ndarray, box: Any) -> np.ndarray:
    """The CAM of a box's class inside the box, normalised to [0, 1] within the box.

    Args:
        cams: [C-1, H, W] from :func:`compute_cams`. box: ``category, x, y, w, h``.

    Returns:
        float32 array box-height x box-width (pixel extent of :func:`box_extent`).
    """
    h, w = cams.shape[1:]
    return normalize_in_box(cams[int(box.category) - 1], box_extent(box, h, w))
