"""Images in and out of the network: resizing, padding and normalising a batch (on the host or
the device), where each image sits in the padded input, and label maps back at the original size.
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


def resize_for_network(image: np.ndarray, pp: PreprocessConfig) -> tuple[np.ndarray, Prepared]:
    """RGB uint8 [H, W, 3] -> the resized uint8 image [rh, rw, 3] (area filter when shrinking,
    bilinear when enlarging; the image itself when the size is kept) + its meta."""
    h, w = image.shape[:2]
    (rh, rw), (ph, pw) = target_size(h, w, pp)
    if (rh, rw) != (h, w):
        interp = cv2.INTER_AREA if rh < h else cv2.INTER_LINEAR
        image = cv2.resize(image, (rw, rh), interpolation=interp)
    return image, Prepared((h, w), (rh, rw), (ph, pw))


def preprocess(image: np.ndarray, pp: PreprocessConfig) -> tuple[np.ndarray, Prepared]:
    """RGB uint8 [H, W, 3] -> normalised float32 [3, S, S'] padded with the mean (zeros), + meta."""
    image, prep = resize_for_network(image, pp)
    (rh, rw), (ph, pw) = prep.resized_hw, prep.padded_hw
    x = (image.astype(np.float32) * np.float32(pp.scale) - np.asarray(pp.mean, np.float32)) \
        / np.asarray(pp.std, np.float32)
    out = np.zeros((3, ph, pw), np.float32)
    out[:, :rh, :rw] = x.transpose(2, 0, 1)
    return out, prep


def prepare_batch(images: list[np.ndarray], pp: PreprocessConfig,
                  device: torch.device | str = "cpu",
                  resized: list[tuple[np.ndarray, Prepared]] | None = None,
                  resize_on_device: bool = False,
                  ) -> tuple[torch.Tensor, list[Prepared]]:
    """A batch of RGB uint8 images (any sizes) -> the network input on ``device``, + metas.

    Returns normalised float32 [B, 3, PH, PW] (PH, PW: the largest padded size of the batch),
    every image at the top-left corner and zeros elsewhere: the same values as stacking
    :func:`preprocess` of each image. The images are resized on the host and sent to the device
    as uint8 (a quarter of the bytes; pinned memory on CUDA); the normalisation runs there, with
    the same float32 operations in the same order as :func:`preprocess`. ``resized``: the
    images' :func:`resize_for_network` results when the caller already has them (a batch job
    resizes in its reader threads). ``resize_on_device`` (without ``resized``): the original
    images go to the device as uint8 and are resized there (:func:`_prepare_on_device`; no
    float work on the host at all; values within a few grey levels of the host resize).
    """
    device = torch.device(device)
    if resize_on_device and resized is None:
        return _prepare_on_device(images, pp, device)
    if resized is None:
        resized = [resize_for_network(im, pp) for im in images]
    elif len(resized) != len(images):
        raise ValueError(f"prepare_batch: {len(resized)} resized images for {len(images)} images")
    ph = max(p.padded_hw[0] for _, p in resized)
    pw = max(p.padded_hw[1] for _, p in resized)
    full = all(p.resized_hw == (ph, pw) for _, p in resized)      # no padding to clear
    host = (torch.empty if full else torch.zeros)((len(images), ph, pw, 3), dtype=torch.uint8,
                                                  pin_memory=device.type == "cuda")
    buf = host.numpy()
    for i, (im, p) in enumerate(resized):
        buf[i, : p.resized_hw[0], : p.resized_hw[1]] = im
    u = host.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()   # [B, 3, PH, PW]
    consts = _small_tensor([list(pp.mean), list(pp.std), [pp.scale] * 3], torch.float32, device)
    mean, std = consts[0].view(1, 3, 1, 1), consts[1].view(1, 3, 1, 1)
    x = u.float().mul_(consts[2, 0]).sub_(mean).div_(std)
    prepped = [p for _, p in resized]
    inside = valid_cells(prepped, ph, pw, device, stride=1)                    # [B, PH, PW]
    return x.masked_fill_(~inside[:, None], 0.0), prepped


def _prepare_on_device(images: list[np.ndarray], pp: PreprocessConfig,
                       device: torch.device) -> tuple[torch.Tensor, list[Prepared]]:
    """:func:`prepare_batch` with the resizing on ``device``: each original uint8 image is
    copied there (pinned, non-blocking on CUDA) and resized with the filters of
    :func:`resize_for_network` -- area averaging when shrinking (the exact pixel-overlap
    weights of OpenCV's ``INTER_AREA``, applied as two small matrix products), bilinear with
    half-pixel centres when enlarging -- then rounded to whole grey levels as OpenCV's uint8
    output is, and normalised. OpenCV's fixed-point arithmetic makes a grey level of difference
    here and there, which ``tests/test_prepare_device.py`` bounds."""
    metas = []
    for im in images:
        h, w = im.shape[:2]
        metas.append(Prepared((h, w), *target_size(h, w, pp)))
    ph = max(m.padded_hw[0] for m in metas)
    pw = max(m.padded_hw[1] for m in metas)
    consts = _small_tensor([list(pp.mean), list(pp.std), [pp.scale] * 3], torch.float32, device)
    mean, std = consts[0].view(3, 1, 1), consts[1].view(3, 1, 1)
    x = torch.zeros((len(images), 3, ph, pw), dtype=torch.float32, device=device)
    for i, (im, m) in enumerate(zip(images, metas)):
        u = torch.from_numpy(np.ascontiguousarray(im, np.uint8))
        if device.type == "cuda":
            u = u.pin_memory()
        u = u.to(device, non_blocking=True).permute(2, 0, 1)[None].float()    # [1, 3, H, W]
        (rh, rw), (h, w) = m.resized_hw, m.orig_hw
        if (rh, rw) != (h, w):
            if rh < h:                                   # separable exact area weights
                u = torch.einsum("oh,bchw,pw->bcop", _area_weights(h, rh, device), u,
                                 _area_weights(w, rw, device))
            else:
                u = F.interpolate(u, size=(rh, rw), mode="bilinear", align_corners=False)
            u = u.round_().clamp_(0.0, 255.0)
        x[i, :, :rh, :rw] = u[0].mul_(consts[2, 0]).sub_(mean).div_(std)
    return x, metas


def _area_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """[n_out, n_in] area-resampling weights for shrinking one axis: output cell ``i`` covers
    input ``[i s, (i + 1) s)`` with ``s = n_in / n_out``; each input pixel weighs its overlap
    with that interval, over ``s`` (rows sum to 1)."""
    s = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64) * s
    j = torch.arange(n_in, dtype=torch.float64)
    overlap = torch.minimum(lo[:, None] + s, j[None] + 1) - torch.maximum(lo[:, None], j[None])
    return (overlap.clamp_min(0.0) / s).to(device=device, dtype=torch.float32)


def _small_tensor(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A few host values as a tensor on ``device``. On CUDA through pinned memory and a
    non-blocking copy: a plain ``torch.tensor(..., device=cuda)`` copies synchronously, which
    waits for the GPU's queued work (the network of the previous batch) and so would stop the
    next batch's preparation from overlapping it."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def valid_cells(prepped: list[Prepared], h: int, w: int, device: torch.device | str = "cpu",
                stride: int = 4) -> torch.Tensor:
    """bool [B, h, w]: the cells of a batch's stride-``stride`` embedding grid that cover the
    resized image (not padding); image ``i`` covers ``ceil(resized / stride)`` rows and columns."""
    rows, cols = _small_tensor([[-(-p.resized_hw[0] // stride) for p in prepped],
                                [-(-p.resized_hw[1] // stride) for p in prepped]],
                               torch.long, device)
    return ((torch.arange(h, device=device)[None, :, None] < rows[:, None, None])
            & (torch.arange(w, device=device)[None, None, :] < cols[:, None, None]))


def upsample_to_input(t: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """[..., h, w] scores at stride 4 -> the resized image's size (bilinear, padding cropped)."""
    ph, pw = prep.padded_hw
    rh, rw = prep.resized_hw
    t = F.interpolate(t[None] if t.dim() == 3 else t, size=(ph, pw), mode="bilinear",
                      align_corners=False)
    return t[..., :rh, :rw]


def labels_to_original(labels: np.ndarray, prep: Prepared) -> np.ndarray:
    """Label map at the resized size -> original size (nearest), uint8 (a new C-contiguous
    array; never a view of ``labels``)."""
    h, w = prep.orig_hw
    if labels.shape != (h, w):
        return cv2.resize(np.ascontiguousarray(labels, np.uint8), (w, h),
                          interpolation=cv2.INTER_NEAREST)
    return np.array(labels, np.uint8, order="C")




def class_argmax(scores: torch.Tensor) -> np.ndarray:
    """Per-pixel class of a score map: ``scores.argmax(1)`` as uint8, on the host.

    ``scores``: [B, C, H, W] (C <= 256) on any device -> uint8 [B, H, W] numpy array, the first
    maximum on ties (like ``torch.argmax``). On CUDA it is ``torch.argmax`` plus one copy to the
    host. On the CPU ``torch.argmax`` over a non-innermost dimension is slow (in the segment
    job it took 5-15x longer than this), so the same result comes from one running maximum over
    the classes in numpy: a class replaces the current winner only where it is strictly larger,
    which keeps the first maximum. (A NaN score never wins here, where ``torch.argmax`` would
    pick it; score maps from the classifiers hold no NaN.)
    """
    if scores.dim() != 4 or scores.shape[1] > 256:
        raise ValueError("class_argmax: scores must be [B, C<=256, H, W], got "
                         f"{tuple(scores.shape)}")
    if scores.device.type != "cpu":
        return scores.argmax(1).to(torch.uint8).cpu().numpy()
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    s = scores.detach().numpy()
    best = s[:, 0].copy()
    idx = np.zeros(best.shape, np.uint8)
    for c in range(1, s.shape[1]):
        wins = s[:, c] > best
        np.maximum(best, s[:, c], out=best)
        idx[wins] = c
    return idx
