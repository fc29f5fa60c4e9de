"""THE one implementation of image -> embeddings -> classifier -> refine -> labels.

Every backend (torch, ONNX Runtime, TensorRT) produces the same two tensors for a batch of
preprocessed images — unit embeddings ``phi`` [B, D, h, w] and class logits [B, C, h, w] at
stride 4 — and everything after that is this module's host code, shared by all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from spml_deploy.config import PreprocessConfig


@dataclass(frozen=True)
class Prepared:
    """Where a preprocessed image sits inside its padded network input."""

    orig_hw: tuple[int, int]      # original image size
    resized_hw: tuple[int, int]   # size after resizing (top-left corner of the padded input)
    padded_hw: tuple[int, int]    # network input size


def target_size(h: int, w: int, pp: PreprocessConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, padded) sizes: longest side -> ``max_side`` (0: keep), pad to a multiple."""
    if pp.max_side > 0:
        s = pp.max_side / max(h, w)
        rh, rw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        side = int(math.ceil(pp.max_side / pp.pad_multiple) * pp.pad_multiple)
        return (rh, rw), (side, side)
    m = pp.pad_multiple
    return (h, w), (int(math.ceil(h / m) * m), int(math.ceil(w / m) * m))


def preprocess(image: np.ndarray, pp: PreprocessConfig) -> tuple[np.ndarray, Prepared]:
    """RGB uint8 [H, W, 3] -> normalised float32 [3, S, S'] padded with the mean (zeros), + meta."""
    h, w = image.shape[:2]
    (rh, rw), (ph, pw) = target_size(h, w, pp)
    if (rh, rw) != (h, w):
        interp = cv2.INTER_AREA if rh < h else cv2.INTER_LINEAR
        image = cv2.resize(image, (rw, rh), interpolation=interp)
    x = (image.astype(np.float32) * np.float32(pp.scale) - np.asarray(pp.mean, np.float32)) \
        / np.asarray(pp.std, np.float32)
    out = np.zeros((3, ph, pw), np.float32)
    out[:, :rh, :rw] = x.transpose(2, 0, 1)
    return out, Prepared((h, w), (rh, rw), (ph, pw))


def upsample_to_input(t: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """[..., h, w] scores at stride 4 -> the resized image's size (bilinear, padding cropped)."""
    ph, pw = prep.padded_hw
    rh, rw = prep.resized_hw
    t = F.interpolate(t[None] if t.dim() == 3 else t, size=(ph, pw), mode="bilinear",
                      align_corners=False)
    return t[..., :rh, :rw]


def labels_to_original(labels: np.ndarray, prep: Prepared) -> np.ndarray:
    """Label map at the resized size -> original size (nearest), uint8."""
    h, w = prep.orig_hw
    if labels.shape != (h, w):
        labels = cv2.resize(labels.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return labels.astype(np.uint8)


@torch.no_grad()
def predict_logits(net: torch.nn.Module, classifier: torch.nn.Module, image: np.ndarray,
                   pp: PreprocessConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Class logits [C, H, W] at the original image size from the torch modules (eval mode)."""
    x, prep = preprocess(image, pp)
    e = net(torch.from_numpy(x)[None].to(device))
    logits = classifier(F.normalize(e, dim=1, eps=1e-12))
    logits = upsample_to_input(logits, prep)
    return F.interpolate(logits, size=prep.orig_hw, mode="bilinear", align_corners=False)[0]



