"""Augmentation, normalisation and the decoded-image cache shared by the training loops.

* :func:`scale_crop` (spec 1.2, embedding network and classifier): flip p=0.5, rescale
  ``U(scale_range)`` (image bilinear, label maps nearest), pad to at least ``crop`` (labels with
  VOID), random ``crop`` x ``crop`` window.
* :func:`fit_in_canvas` (CAM classifier): flip p=0.5 and the *whole* image rescaled into a
  ``crop`` x ``crop`` canvas at a random place, so that no tagged object is cut out.
* :func:`photometric` (classifier, spec 7.1): grayscale and Gaussian blur.
* :func:`normalize`: uint8 crops -> network input, ``(x * scale - mean) / std`` in float32 (the
  operations of the inference preprocessing); the padding outside a crop's image is zero, which
  is the mean colour after normalisation.
* :class:`DecodedCache`: decoded files kept in memory up to a byte budget.

Every random draw comes from the caller's ``numpy.random.Generator``, in a fixed order, so a
seed gives the same crops.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from spml_deploy.config import VOID, PreprocessConfig
from spml_deploy.data.imageio import read_image

__all__ = ["Crop", "random_flip", "scale_crop", "fit_in_canvas", "photometric", "normalize",
           "DecodedCache", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Crop:
    """One augmented window: ``image`` uint8 [crop, crop, 3] (zeros where padded), ``label``
    uint8 [crop, crop] (VOID where padded), ``region`` int32 [crop, crop] (0 where padded; None
    when no region map was given); the image fills rows ``< valid[0]`` and columns
    ``< valid[1]``, padding the rest."""

    image: np.ndarray
    label: np.ndarray
    region: np.ndarray | None
    valid: tuple[int, int]


def random_flip(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays mirrored left-right together with probability 0.5 (one draw from ``rng``)."""
    if rng.random() < 0.5:
        return tuple(a[:, ::-1] for a in arrays)
    return arrays


def scale_crop(image: np.ndarray, label: np.ndarray, crop: int,
               scale_range: tuple[float, float], rng: np.random.Generator,
               region: np.ndarray | None = None) -> Crop:
    """Flip, rescale, pad and crop an image [H, W, 3] with its label map [H, W] (and region map).

    Draws from ``rng``: flip, scale, top row, left column.
    """
    arrays = (image, label) if region is None else (image, label, region)
    image, label, *rest = random_flip(rng, *arrays)
    s = float(rng.uniform(*scale_range))
    h, w = label.shape
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    image = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(np.ascontiguousarray(label), (nw, nh), interpolation=cv2.INTER_NEAREST)
    y0 = int(rng.integers(0, max(crop, nh) - crop + 1))
    x0 = int(rng.integers(0, max(crop, nw) - crop + 1))
    vh, vw = min(crop, nh - y0), min(crop, nw - x0)
    win = (slice(y0, y0 + vh), slice(x0, x0 + vw))
    out_img = np.zeros((crop, crop, 3), np.uint8)
    out_img[:vh, :vw] = image[win]
    out_lab = np.full((crop, crop), VOID, np.uint8)
    out_lab[:vh, :vw] = label[win]
    out_reg = None
    if rest:
        reg = cv2.resize(np.ascontiguousarray(rest[0]).astype(np.int32), (nw, nh),
                         interpolation=cv2.INTER_NEAREST)
        out_reg = np.zeros((crop, crop), np.int32)
        out_reg[:vh, :vw] = reg[win]
    return Crop(out_img, out_lab, out_reg, (vh, vw))


def fit_in_canvas(image: np.ndarray, crop: int, scale_range: tuple[float, float],
                  rng: np.random.Generator, pad_value: np.ndarray) -> np.ndarray:
    """The whole image [H, W, 3] (maybe flipped) rescaled so that its longer side is
    ``crop * U(lo, min(hi, 1))``, at a random place of a uint8 [crop, crop, 3] canvas filled with
    ``pad_value``. Draws from ``rng``: flip, scale, top row, left column."""
    (image,) = random_flip(rng, image)
    h, w = image.shape[:2]
    lo, hi = scale_range
    hi = min(hi, 1.0)
    lo = min(lo, hi)
    s = float(rng.uniform(lo, hi)) * crop / max(h, w)
    nh, nw = max(1, min(crop, int(round(h * s)))), max(1, min(crop, int(round(w * s))))
    small = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.empty((crop, crop, 3), np.uint8)
    canvas[:] = pad_value
    y0 = int(rng.integers(0, crop - nh + 1))
    x0 = int(rng.integers(0, crop - nw + 1))
    canvas[y0:y0 + nh, x0:x0 + nw] = small
    return canvas


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grayscale (0.3, 0.59, 0.11) with p 0.3, 5x5 Gaussian blur sigma U(0.1, 5) with p 0.5."""
    if rng.random() < 0.3:
        g = image.astype(np.float32) @ np.array([0.3, 0.59, 0.11], np.float32)
        image = np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (5, 5), float(rng.uniform(0.1, 5.0)))
    return image


def normalize(batch: np.ndarray, pp: PreprocessConfig, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32,
              valid: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """uint8 RGB images [B, H, W, 3] -> normalised [B, 3, H, W] of ``dtype`` on ``device``.

    ``valid``: per image, the (rows, columns) its picture fills from the top-left corner; the
    rest is set to zero (the mean colour). The uint8 values travel to ``device`` and are
    normalised there.
    """
    # contiguous NCHW: torch 2.13 CPU corrupts memory in the backward pass of the tiny backbone
    # (width 4, 32 x 32) when given the channels-last strides that a bare permute leaves
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
    x = x.to(dtype).contiguous()
    mean = torch.tensor(pp.mean, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    x = (x * pp.scale - mean) / std
    for i, (vh, vw) in enumerate(valid or ()):
        x[i, :, vh:] = 0.0
        x[i, :, :vh, vw:] = 0.0
    return x


class DecodedCache:
    """Decoded files (images, label maps) kept in memory, keyed by path and reader, until their
    total size reaches ``budget`` bytes (None: no limit); later files are read every time."""

    def __init__(self, budget: int | None = DEFAULT_CACHE_BYTES):
        self.budget = budget
        self.used = 0
        self._store: dict[tuple[str, Callable], np.ndarray] = {}

    def get(self, path: str | Path,
            read: Callable[[Path], np.ndarray] = read_image) -> np.ndarray:
        """The array ``read(path)`` gives, decoded once while the budget allows."""
        key = (str(path), read)
        hit = self._store.get(key)
        if hit is not None:
            return hit
        arr = read(Path(path))
        if self.budget is None or self.used + arr.nbytes <= self.budget:
            self._store[key] = arr
            self.used += arr.nbytes
        return arr
