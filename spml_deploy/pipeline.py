"""THE one implementation of image -> embeddings -> classifier -> refine -> labels.

Every backend (torch, ONNX Runtime, TensorRT) produces the same two tensors for a batch of
preprocessed images — unit embeddings ``phi`` [B, D, h, w] and class logits [B, C, h, w] at
stride 4 — and everything after that is this module's host code, shared by all of them.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from spml_deploy.config import PreprocessConfig

log = logging.getLogger(__name__)


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


def crf_at_original(image: np.ndarray, scores: torch.Tensor, prep: Prepared) -> np.ndarray:
    """DenseCRF marginals float32 [C, H, W] of one image (spec 7.5): its class scores at the
    resized size [1, C, rh, rw] resized (bilinear) to the original size H x W and refined with
    the original RGB image (uint8 [H, W, 3]). Needs the optional CRF package."""
    from spml_deploy.crf import dense_crf

    s = F.interpolate(scores.float(), size=prep.orig_hw, mode="bilinear", align_corners=False)[0]
    return dense_crf(np.ascontiguousarray(image, np.uint8), s.cpu().numpy())


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


@torch.no_grad()
def predict_logits(net: torch.nn.Module, classifier: torch.nn.Module, image: np.ndarray,
                   pp: PreprocessConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Class logits [C, H, W] at the original image size from the torch modules (eval mode)."""
    x, prep = preprocess(image, pp)
    e = net(torch.from_numpy(x)[None].to(device))
    logits = classifier(F.normalize(e, dim=1, eps=1e-12))
    logits = upsample_to_input(logits, prep)
    return F.interpolate(logits, size=prep.orig_hw, mode="bilinear", align_corners=False)[0]





# --------------------------------------------------------------------------------------------
# The full pipeline: backend -> classifier (softmax or kNN) -> optional random walk -> labels


@dataclass
class Prediction:
    """One image's result: label map at the original size (uint8 class ids) and timings."""

    labels: np.ndarray
    class_names: list[str]
    timings: dict[str, float]
    scores: np.ndarray | None = None     # [C, H, W] class scores when asked for


@dataclass
class Staged:
    """A batch between :meth:`Pipeline.forward` and :meth:`Pipeline.finish`: the input images,
    their placement in the padded input [PH, PW], the network outputs (unit embeddings
    [B, D, h, w], logits [B, C, h, w]) and the seconds spent per stage so far."""

    images: list[np.ndarray]
    prepped: list[Prepared]
    padded_hw: tuple[int, int]
    phi: torch.Tensor
    logits: torch.Tensor
    timings: dict[str, float]


@dataclass(frozen=True)
class PipelineOptions:
    classifier: str = "softmax"          # "softmax" (the trained f0/f1) or "knn" (prototype memory)
    refine: bool = False                 # random-walk refinement (spec 7.2)
    test_grid: tuple[int, int] = (12, 12)
    kmeans_iters: int = 10
    knn_k: int = 20
    knn_search: str = "auto"             # "auto" | "index" (the memory's FAISS index) | "exact"
    rw_beta: float = 5.0
    rw_alpha: float = 20.0
    rw_squarings: int = 6
    rw_method: str = "auto"
    keep_scores: bool = False
    crf: bool = False                    # DenseCRF at the original size (spec 7.5; optional package)


class Pipeline:
    """Batch inference shared by every backend.

    ``backend(x)`` maps normalised images [B, 3, H, W] to (unit embeddings, logits) at stride 4.
    ``memory`` (for ``classifier='knn'``) is an object with ``vote(queries [M, D]) -> labels [M]``
    (see :mod:`spml_deploy.index`).
    """

    def __init__(self, backend, preprocess_cfg: PreprocessConfig, class_names: list[str],
                 palette: list[list[int]], options: PipelineOptions = PipelineOptions(),
                 memory=None):
        if options.classifier not in ("softmax", "knn"):
            from spml_deploy.errors import ConfigError

            raise ConfigError(f"unknown classifier '{options.classifier}'", fix="use softmax or knn")
        if options.classifier == "knn" and memory is None:
            from spml_deploy.errors import ConfigError

            raise ConfigError("the kNN classifier needs a prototype memory, and this run/bundle "
                              "has none", fix="use --classifier softmax, or build the memory "
                              "(spml-deploy train finishes with it)")
        if options.crf:
            from spml_deploy.crf import require_crf

            require_crf()          # MissingDependencyError with the install recipe, before any image
        self.backend = backend
        self.pp = preprocess_cfg
        self.class_names = list(class_names)
        self.palette = palette
        self.opt = options
        self.memory = memory
        self.device = getattr(backend, "device", torch.device("cpu"))
        self._timings: dict[str, float] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def pop_timings(self) -> dict[str, float]:
        """Seconds per stage summed over the :meth:`predict` calls since the last pop."""
        with self._lock:
            t, self._timings = self._timings, {}
        return t

    def _tick(self, timings: dict[str, float], key: str, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - t0
        return now

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Label maps for a list of RGB uint8 images (any sizes): :meth:`finish` of
        :meth:`forward`."""
        staged = self.forward(images)
        results = self.finish(staged)
        with self._lock:
            for k, v in staged.timings.items():
                self._timings[k] = self._timings.get(k, 0.0) + v
        return results

    @torch.no_grad()
    def forward(self, images: list[np.ndarray],
                resized: list[tuple[np.ndarray, Prepared]] | None = None) -> "Staged":
        """First half of :meth:`predict`: preprocessing and the network (the backend call).

        ``resized``: :func:`resize_for_network` of every image with this pipeline's ``pp``, when
        the caller resized them already (e.g. in reader threads); without them, on CUDA the
        images are resized on the device (``prepare_batch(resize_on_device=True)``). A batch job can run
        :meth:`finish` of one batch in a second thread while this runs for the next one
        (``forward`` calls must come from one thread, as must ``finish`` calls).
        """
        timings: dict[str, float] = {}
        t = time.perf_counter()
        xt, prepped = prepare_batch(images, self.pp, self.device, resized,
                                    resize_on_device=self.device.type == "cuda")
        t = self._tick(timings, "read+preprocess", t)
        phi, logits = self.backend(xt)
        self._tick(timings, "network", t)
        return Staged(images, prepped, tuple(xt.shape[-2:]), phi, logits, timings)

    @torch.no_grad()
    def finish(self, staged: "Staged") -> list[Prediction]:
        """Second half of :meth:`predict`: classifier (softmax or kNN), optional random walk
        and CRF, label maps at the original sizes. Adds its stage times to ``staged.timings``."""
        timings, images, prepped, phi = staged.timings, staged.images, staged.prepped, staged.phi
        t = time.perf_counter()
        B, _, h, w = phi.shape
        valid = valid_cells(prepped, h, w, phi.device)
        if self.opt.classifier == "softmax":
            scores = torch.softmax(staged.logits.float(), dim=1)
        else:
            scores = self._knn_scores(phi, valid)
        t = self._tick(timings, "classifier", t)
        if self.opt.refine:
            scores = self._refine(scores, phi, valid)
            t = self._tick(timings, "refine", t)
        up = F.interpolate(scores, size=staged.padded_hw, mode="bilinear", align_corners=False)
        if self.opt.crf:
            t = self._tick(timings, "postprocess", t)
            crf_q = self._crf(images, up, prepped)                       # [C, H, W] each
            t = self._tick(timings, "crf", t)
        labels = None if self.opt.crf else class_argmax(up)              # [B, ph, pw] uint8
        results = []
        for i, p in enumerate(prepped):
            rh, rw = p.resized_hw
            keep = None
            if self.opt.crf:
                lab = class_argmax(torch.from_numpy(crf_q[i])[None])[0]
                if self.opt.keep_scores:
                    keep = crf_q[i]
            else:
                lab = labels_to_original(labels[i, :rh, :rw], p)
                if self.opt.keep_scores:
                    keep = F.interpolate(up[i: i + 1, :, :rh, :rw], size=p.orig_hw,
                                         mode="bilinear", align_corners=False)[0].cpu().numpy()
            results.append(Prediction(lab, self.class_names, {}, keep))
        self._tick(timings, "postprocess", t)
        n = len(images)
        per_image = {k: v / n for k, v in timings.items()}
        for r in results:
            r.timings = per_image
        return results

    def _crf(self, images: list[np.ndarray], up: torch.Tensor,
             prepped: list[Prepared]) -> list[np.ndarray]:
        """DenseCRF marginals [C, H, W] per image (:func:`crf_at_original` of the upsampled
        scores ``up`` [B, C, PH, PW] cropped to the resized image)."""
        return [crf_at_original(images[i], up[i: i + 1, :, : p.resized_hw[0], : p.resized_hw[1]], p)
                for i, p in enumerate(prepped)]

    def _knn_scores(self, phi: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One-hot class scores [B, C, h, w]: every pixel takes its k-means segment's kNN vote."""
        from spml_deploy.prototypes import segment_memory

        (protos, _, _, pix) = segment_memory(phi, None, valid, self.opt.test_grid,
                                             iters=self.opt.kmeans_iters, return_index=True)
        C = len(self.class_names)
        seg_labels = self.memory.vote(protos).to(phi.device)           # [M]
        lab = torch.where(pix >= 0, seg_labels[pix.clamp_min(0)], 0)    # [B, h, w]
        return F.one_hot(lab, C).permute(0, 3, 1, 2).float()

    def _refine(self, scores: torch.Tensor, phi: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Random walk on the 1/8 grid (spec 7.2) over the valid (non-padding) cells; classes
        that win no pixel of the image are treated as absent (zeroed before the walk)."""
        from spml_deploy.refine import normalize_score_map, random_walk

        B, C, h, w = scores.shape
        h8, w8 = max(1, h // 2), max(1, w // 2)
        s8 = F.interpolate(scores, size=(h8, w8), mode="bilinear", align_corners=False)
        v8 = F.interpolate(valid[:, None].float(), size=(h8, w8), mode="area")[:, 0] >= 0.5
        present = F.one_hot(scores.argmax(1), C).flatten(1, 2).amax(1).bool()      # [B, C]
        s8 = normalize_score_map(s8, present, v8)
        p8 = F.normalize(F.interpolate(phi.float(), size=(h8, w8), mode="bilinear",
                                       align_corners=False), dim=1, eps=1e-12)
        out = random_walk(s8.flatten(2), p8.flatten(2), method=self.opt.rw_method,
                          beta=self.opt.rw_beta, alpha=self.opt.rw_alpha,
                          squarings=self.opt.rw_squarings, valid=v8.flatten(1))
        return F.interpolate(out.view(B, C, h8, w8), size=(h, w), mode="bilinear",
                             align_corners=False)


class PrototypeMemory:
    """The training set's segment prototypes with their labels, for kNN label retrieval (spec 7.3).

    Two exact searches and one index:

    * ``index``: the memory's saved index (``memory_index.npz``: FAISS ``flat`` = exact, or an
      approximate ``ivf``/``ivfpq``/``hnsw`` for large memories), searched through
      :class:`spml_deploy.index.KnnClassifier`;
    * otherwise the grouped exact top-k of :class:`spml_deploy.index.MemoryMatrix` (a matmul +
      top-k on CUDA).

    ``search="auto"`` uses the index when it is approximate and the exact top-k when the index is
    exact: both return the same neighbours (tested), and on the CPU the grouped top-k is 1.7x
    faster than FAISS ``IndexFlatIP`` for a batch of 576 queries over 13.8k prototypes (2-core
    development machine, one thread: 38 vs 64 ms). ``search="index"`` always uses the index,
    ``"exact"`` never.
    """

    SEARCHES = ("auto", "index", "exact")

    def __init__(self, prototypes: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 20,
                 device: torch.device | str = "cpu", index=None, search: str = "auto"):
        from spml_deploy.errors import ConfigError
        from spml_deploy.index import KnnClassifier, MemoryMatrix, index_is_exact

        if search not in self.SEARCHES:
            raise ConfigError(f"unknown kNN search '{search}'", fix=f"use one of {', '.join(self.SEARCHES)}")
        self.protos = torch.from_numpy(np.ascontiguousarray(prototypes, np.float32)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
        self.num_classes = num_classes
        self.k = k
        self._labels_checked = False                 # range check on the first vote only
        use_index = index is not None and (search == "index"
                                           or (search == "auto" and not index_is_exact(index)))
        if search == "index" and index is None:
            raise ConfigError("kNN search 'index' was asked for, but this memory has no index",
                              fix="use --knn-search auto, or re-run 'spml-deploy train --resume' "
                                  "to write memory_index.npz")
        self.index = index if use_index else None
        self.search = "index" if use_index else "exact"
        if self.index is not None:
            self._knn = KnnClassifier(self.index, self.labels.cpu().numpy(), k=k,
                                      num_classes=num_classes)
        else:
            self._matrix = MemoryMatrix(self.protos)  # laid out once for the exact top-k search

    @classmethod
    def load(cls, path: str | Path, num_classes: int, k: int = 20, device="cpu",
             index_path: str | Path | None = None, search: str = "auto") -> "PrototypeMemory":
        """Read ``memory.npz`` (and, when given, the memory's index ``index_path``). Without FAISS
        installed a FAISS index cannot be read: ``auto`` then falls back to the exact search
        (with a warning), ``index`` fails with the install hint."""
        from spml_deploy.errors import ManifestError, MissingDependencyError

        try:
            with np.load(path, allow_pickle=False) as z:
                protos, labels = z["prototypes"], z["labels"]
        except (OSError, KeyError, ValueError) as exc:
            raise ManifestError(f"prototype memory is unreadable ({exc})", path=path,
                                fix="re-run 'spml-deploy train --resume' to rebuild it") from exc
        index = None
        if index_path is not None and search != "exact":
            from spml_deploy.index import gpu_available, load_index, meta_is_exact, read_index_meta

            # 'auto' searches an exact (flat) index by the exact top-k: no need to read it
            if search == "index" or not meta_is_exact(read_index_meta(index_path)):
                try:
                    index = load_index(index_path, use_gpu=torch.device(device).type == "cuda"
                                       and gpu_available())
                except MissingDependencyError:
                    if search == "index":
                        raise
                    log.warning("the prototype memory's FAISS index needs FAISS (pip install "
                                "'spml-deploy[index]'); using the exact search over %s",
                                Path(path).name)
            if index is not None and index.ntotal != protos.shape[0]:
                raise ManifestError(f"the memory index holds {index.ntotal} prototypes but the "
                                    f"memory {protos.shape[0]}", path=index_path,
                                    fix="delete it and re-run 'spml-deploy train --resume' to "
                                        "rebuild it")
        return cls(protos, labels, num_classes, k, device, index=index, search=search)

    def vote(self, queries: torch.Tensor) -> torch.Tensor:
        """Majority label of the k most similar memory prototypes, per query [M, D] -> [M]
        (ties -> smallest class id)."""
        from spml_deploy.index import topk_vote

        if self.index is not None:
            return self._knn.predict(queries.detach().float().cpu().numpy()).to(self.protos.device)
        out = topk_vote(queries.to(self.protos), self._matrix, self.labels, k=self.k,
                        num_classes=self.num_classes, check_labels=not self._labels_checked)
        self._labels_checked = True
        return out


def load_pipeline(path: str | Path, backend: str = "torch", device: str = "cpu",
                  options: PipelineOptions = PipelineOptions(), **backend_options) -> "Pipeline":
    """A :class:`Pipeline` for a run folder or bundle: its backend, classes, palette, memory."""
    from dataclasses import replace as _replace

    from spml_deploy.artifacts import model_folder, read_manifest
    from spml_deploy.backends import load_backend

    if options.crf:
        from spml_deploy.crf import require_crf

        require_crf()              # fail before reading the model when the CRF package is absent
    folder = model_folder(path)
    manifest = read_manifest(folder, verify=True)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():     # run folders carry the segmentation settings of their training
        import json

        seg = json.loads(cfg_path.read_text()).get("segmentation", {})
        if "test_grid" in seg and options.test_grid == PipelineOptions.test_grid:
            options = _replace(options, test_grid=tuple(seg["test_grid"]))
    memory = None
    if options.classifier == "knn" and "memory" not in manifest.files:
        from spml_deploy.errors import ConfigError

        baseline = manifest.training.get("baseline")
        if baseline:
            raise ConfigError(f"--classifier knn needs a prototype memory, and this {baseline} "
                              "baseline run has none (its training stopped after the network)",
                              path=folder, fix="use --classifier softmax; for kNN, train a run "
                              "that builds the memory (SPML: 'spml-deploy train' without "
                              "--baseline)")
        raise ConfigError("--classifier knn needs a prototype memory (memory.npz), and this "
                          f"{'bundle' if manifest.kind == 'bundle' else 'run'} has none",
                          path=folder,
                          fix="use --classifier softmax; for a run whose training was "
                              "interrupted, finish it with 'spml-deploy train ... --resume' "
                              "(its last stage builds the memory), then export again")
    if options.classifier == "knn":
        index_file = manifest.files.get("memory_index")
        memory = PrototypeMemory.load(folder / manifest.files["memory"]["path"],
                                      manifest.num_classes, options.knn_k, device,
                                      index_path=folder / index_file["path"] if index_file else None,
                                      search=options.knn_search)
    be = load_backend(folder, kind=backend, device=device, **backend_options)
    return Pipeline(be, manifest.preprocess, manifest.classes, manifest.palette, options, memory)
