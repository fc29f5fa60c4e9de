"""THE one implementation of image -> embeddings -> classifier -> refine -> labels.

Every backend (torch, ONNX Runtime, TensorRT) produces the same two tensors for a batch of
preprocessed images — unit embeddings ``phi`` [B, D, h, w] and class logits [B, C, h, w] at
stride 4 — and everything after that is this module's host code, shared by all of them.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from dataclasses import replace as _replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spml_deploy.config import PreprocessConfig, SegmentationConfig
from spml_deploy.engine.backends import load_backend
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.engine.crf import crf_at_original, require_crf
from spml_deploy.engine.forward import Engine
from spml_deploy.engine.index import load_memory
from spml_deploy.engine.preprocess import Prepared, class_argmax, labels_to_original, valid_cells
from spml_deploy.engine.prototypes import segment_memory
from spml_deploy.engine.refine import refine_labels
from spml_deploy.errors import ConfigError

log = logging.getLogger(__name__)


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
    """How the pipeline classifies and refines.

    The fields named in :attr:`FROM_SEGMENTATION` override the model's segmentation settings
    (``spml.json``'s ``segmentation`` section, the run's training configuration): None inherits
    the model's value, any other value wins, even one equal to a default.
    """

    classifier: str = "softmax"          # "softmax" (the trained f0/f1) or "knn" (prototype memory)
    refine: bool = False                 # random-walk refinement (spec 7.2)
    test_grid: tuple[int, int] | None = None     # k-means grid of the kNN read-out
    kmeans_iters: int | None = None
    knn_k: int | None = None
    rw_beta: float | None = None
    rw_alpha: float | None = None
    rw_squarings: int | None = None
    rw_method: str = "auto"
    keep_scores: bool = False
    crf: bool = False                    # DenseCRF at the original size (spec 7.5; optional package)

    FROM_SEGMENTATION = ("test_grid", "kmeans_iters", "knn_k", "rw_beta", "rw_alpha",
                         "rw_squarings")

    def resolved(self, segmentation: SegmentationConfig) -> "PipelineOptions":
        """These options with every unset (None) segmentation field taken from
        ``segmentation``."""
        inherit = {name: getattr(segmentation, name) for name in self.FROM_SEGMENTATION
                   if getattr(self, name) is None}
        return _replace(self, **inherit) if inherit else self


class Pipeline:
    """Batch inference shared by every backend.

    ``backend(x)`` maps normalised images [B, 3, H, W] to (unit embeddings, logits) at stride 4.
    ``memory`` (for ``classifier='knn'``): the training memory as a labelled prototype index
    (:mod:`spml_deploy.engine.index`, e.g. :func:`~spml_deploy.engine.index.load_memory`),
    voted with ``options.knn_k`` neighbours. Options left unset (None) take their value from
    ``segmentation`` (the model's settings; default :class:`SegmentationConfig`).
    """

    def __init__(self, backend, preprocess_cfg: PreprocessConfig, class_names: list[str],
                 palette: list[list[int]], options: PipelineOptions = PipelineOptions(),
                 memory=None, segmentation: SegmentationConfig | None = None):
        options = options.resolved(segmentation or SegmentationConfig())
        if options.classifier not in ("softmax", "knn"):
            raise ConfigError(f"unknown classifier '{options.classifier}'", fix="use softmax or knn")
        if options.classifier == "knn" and memory is None:
            raise ConfigError("the kNN classifier needs a prototype memory, and this run/bundle "
                              "has none", fix="use --classifier softmax, or build the memory "
                              "(spml-deploy train finishes with it)")
        if options.crf:
            require_crf()          # MissingDependencyError with the install recipe, before any image
        self.backend = backend
        self.class_names = list(class_names)
        self.palette = palette
        self.opt = options
        self.memory = memory
        self.engine = Engine(backend, preprocess_cfg)
        self.device = self.engine.device
        self._timings: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def pp(self) -> PreprocessConfig:
        """The preprocessing of the model (the engine's)."""
        return self.engine.pp

    @pp.setter
    def pp(self, value: PreprocessConfig) -> None:
        self.engine.pp = value

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
        fw = self.engine.run(images, resized=resized)
        return Staged(images, fw.prepped, fw.padded_hw, fw.phi, fw.logits, dict(fw.seconds))

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

        (protos, _, _, pix) = segment_memory(phi, None, valid, self.opt.test_grid,
                                             iters=self.opt.kmeans_iters, return_index=True)
        C = len(self.class_names)
        seg_labels = self.memory.vote(protos, self.opt.knn_k, C).to(phi.device)      # [M]
        lab = torch.where(pix >= 0, seg_labels[pix.clamp_min(0)], 0)    # [B, h, w]
        return F.one_hot(lab, C).permute(0, 3, 1, 2).float()

    def _refine(self, scores: torch.Tensor, phi: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Random walk (spec 7.2, :func:`refine_labels` at the stride-4 size: a grid of half its
        cells, i.e. the 1/8 grid) over the valid (non-padding) cells; classes that win no pixel
        of the image are treated as absent (zeroed before the walk). Returns the refined scores
        [B, C, h, w]."""
        C = scores.shape[1]
        present = F.one_hot(scores.argmax(1), C).flatten(1, 2).amax(1).bool()      # [B, C]
        _, out = refine_labels(scores, phi.float(), present, tuple(scores.shape[-2:]), stride=2,
                               valid=valid, method=self.opt.rw_method, beta=self.opt.rw_beta,
                               alpha=self.opt.rw_alpha, squarings=self.opt.rw_squarings,
                               return_scores=True)
        return out

def load_pipeline(model: str | Path | Bundle, backend: str = "torch", device: str = "cpu",
                  options: PipelineOptions = PipelineOptions(), **backend_options) -> "Pipeline":
    """A :class:`Pipeline` for a run folder, bundle or opened :class:`Bundle`: its backend,
    classes, palette, memory, and its segmentation settings under ``options``' overrides."""
    if options.crf:
        require_crf()              # fail before reading the model when the CRF package is absent
    bundle = load_bundle(model)
    folder, manifest = bundle.folder, bundle.manifest
    options = options.resolved(bundle.segmentation)
    memory = None
    if options.classifier == "knn" and "memory" not in manifest.files:
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
        index_file = manifest.files.get("memory_index")     # runs written before memory.npz held the index
        memory = load_memory(folder / manifest.files["memory"]["path"],
                             folder / index_file["path"] if index_file else None, device)
    be = load_backend(bundle, kind=backend, device=device, **backend_options)
    return Pipeline(be, manifest.preprocess, manifest.classes, manifest.palette, options, memory,
                    segmentation=bundle.segmentation)
