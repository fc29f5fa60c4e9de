"""Optional fully connected (dense) CRF post-processing of class scores (spec 7.5).

The CRF is an optional last step of ``segment`` (``--crf``): nothing in the default pipeline
imports it. It runs Krähenbühl & Koltun's mean-field inference through ``pydensecrf``, the
Python binding of their C++ code (permutohedral-lattice filtering, so the Gaussian filtering is
an approximation of the exact sums; see tests/test_crf.py for how close). The original
``pydensecrf`` sdist on PyPI (1.0rc3) does not build on Python >= 3.11 or with Cython 3; the
``pydensecrf2`` fork installs the same ``pydensecrf`` module and builds with a plain
``pip install`` (it pins Cython 0.29 in its build requirements).

The model solved here, for N pixels and C classes, with ``p`` the given scores (not
renormalised), ``U_i(l) = -log(max(p_l(i), 1e-5))``, pairwise kernels

    k_G(i, j) = exp(-|pos_i - pos_j|^2 / (2 * 1^2))                                  weight 3
    k_B(i, j) = exp(-|pos_i - pos_j|^2 / (2 * 67^2) - |rgb_i - rgb_j|^2 / (2 * 3^2))   weight 4

(positions in pixels of the original image, colours in uint8 units), each used with pydensecrf's
symmetric normalisation ``D^-1/2 K D^-1/2`` (``D_i = sum_j k(i, j)``, the pixel itself included)
and Potts compatibility, and 10 mean-field iterations:

    Q = softmax(-U);   repeat:  Q = softmax(-U + sum_k w_k * D_k^-1/2 K_k D_k^-1/2 Q)
"""
from __future__ import annotations

import importlib
import logging

import numpy as np
import torch
import torch.nn.functional as F

from spml_deploy.engine.preprocess import Prepared
from spml_deploy.errors import MissingDependencyError

log = logging.getLogger(__name__)

MODULE = "pydensecrf.densecrf"
INSTALL_HINT = ("pip install 'spml-deploy[crf]' or pip install pydensecrf2==1.1  (a maintained fork of pydensecrf that installs the "
                "same 'pydensecrf' module; it is built from source, so it needs a C++ compiler "
                "(g++) and takes about a minute. The original 'pydensecrf' 1.0rc3 sdist does not "
                "build on Python 3.11 or with Cython 3)")


def _import_densecrf():
    """The ``pydensecrf.densecrf`` module, or :class:`MissingDependencyError` with the recipe."""
    try:
        return importlib.import_module(MODULE)
    except ImportError as exc:
        raise MissingDependencyError("pydensecrf", "crf", "DenseCRF post-processing (--crf)",
                                     fix=INSTALL_HINT) from exc


def crf_available() -> bool:
    """True when ``pydensecrf`` (from ``pydensecrf2``) can be imported."""
    try:
        _import_densecrf()
    except MissingDependencyError:
        return False
    return True


def require_crf() -> None:
    """Raise :class:`MissingDependencyError` (naming the install recipe) unless the CRF package
    is importable; call it before any image is processed."""
    _import_densecrf()


def dense_crf(image: np.ndarray, scores: np.ndarray, *, iters: int = 10,
              gauss_sxy: float = 1.0, gauss_weight: float = 3.0,
              bilateral_sxy: float = 67.0, bilateral_srgb: float = 3.0,
              bilateral_weight: float = 4.0, min_prob: float = 1e-5) -> np.ndarray:
    """Refine class scores with a fully connected CRF (defaults: spec 7.5).

    ``image``: the original-resolution RGB image, uint8 [H, W, 3]. ``scores``: class scores
    [C, H, W] at the same size (probabilities; used as given, not renormalised; values below
    ``min_prob`` are clamped before the log). Returns the mean-field marginals, float32
    [C, H, W], which sum to 1 over the classes at every pixel.
    """
    dcrf = _import_densecrf()
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"dense_crf: scores must be [C, H, W], got shape {scores.shape}")
    C, H, W = scores.shape
    if image.dtype != np.uint8 or image.shape != (H, W, 3):
        raise ValueError(f"dense_crf: image must be uint8 [H, W, 3] = [{H}, {W}, 3] like the "
                         f"scores, got {image.dtype} {image.shape}")
    if iters < 0:
        raise ValueError(f"dense_crf: iters must be >= 0, got {iters}")
    unary = -np.log(np.maximum(scores.reshape(C, H * W).astype(np.float32), np.float32(min_prob)))
    crf = dcrf.DenseCRF2D(W, H, C)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
    crf.addPairwiseGaussian(sxy=float(gauss_sxy), compat=float(gauss_weight))
    crf.addPairwiseBilateral(sxy=float(bilateral_sxy), srgb=float(bilateral_srgb),
                             rgbim=np.ascontiguousarray(image), compat=float(bilateral_weight))
    q = np.array(crf.inference(int(iters)), dtype=np.float32)        # [C, H*W]
    return q.reshape(C, H, W)

def crf_at_original(image: np.ndarray, scores: torch.Tensor, prep: Prepared) -> np.ndarray:
    """DenseCRF marginals float32 [C, H, W] of one image (spec 7.5): its class scores at the
    resized size [1, C, rh, rw] resized (bilinear) to the original size H x W and refined with
    the original RGB image (uint8 [H, W, 3]). Needs the optional CRF package."""
    s = F.interpolate(scores.float(), size=prep.orig_hw, mode="bilinear", align_corners=False)[0]
    return dense_crf(np.ascontiguousarray(image, np.uint8), s.cpu().numpy())
