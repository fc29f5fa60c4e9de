"""Parity of a candidate backend (ONNX Runtime, TensorRT) against a reference backend.

Measured on synthetic images (smooth colour fields + texture, through ``pipeline.preprocess``) at
sizes different from the export size, so dynamic axes are exercised:

* ``max_abs_diff_embeddings`` / ``max_abs_diff_logits``: largest absolute difference,
* ``mean_cosine`` (and ``min_cosine``) between the reference and candidate embedding of each
  pixel (required >= 0.9999),
* ``label_agreement``: fraction of pixels whose label (argmax of the logits upsampled bilinearly
  to the input size, the pipeline's classifier read-out) is the same (raw figure, reported),
* ``label_agreement_margin``: the same, margin-aware (required >= 0.999): a pixel whose labels
  differ counts as a disagreement only where the reference's top-2 logit margin exceeds the
  numeric tolerance ``margin_tolerance * max |reference logit|`` of the batch. Two labels whose
  logits lie closer than the candidate's rounding error are a tie either way (an untrained
  network has many such pixels, and fp16 flips some of them); a flip of a clear winner is
  counted. Default tolerance: ``1e-4`` (fp32 candidates), ``1e-2`` (fp16: a 2e-3 relative
  error of the embeddings, mean cosine 0.999998, moves two logits apart by up to ~4e-3 of the
  logit scale).

A failure raises :class:`ExportError` with all the numbers (the CLI exits non-zero).
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spml_deploy.engine.backends import Backend
from spml_deploy.config import PreprocessConfig
from spml_deploy.errors import ExportError
from spml_deploy.engine.model import INPUT_MULTIPLE
from spml_deploy.engine.preprocess import preprocess

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
MIN_AGREEMENT = 0.999
#: Numeric tolerance of the margin-aware label agreement, relative to the batch's largest
#: reference logit: fp32 and fp16 candidates.
MARGIN_TOLERANCE = 1e-4
MARGIN_TOLERANCE_HALF = 1e-2


def _round8(v: float) -> int:
    return max(INPUT_MULTIPLE, int(round(v / INPUT_MULTIPLE)) * INPUT_MULTIPLE)


def parity_sizes(export_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Two (height, width) pairs, both different from the export size in both dimensions."""
    h, w = export_hw
    sizes = [(_round8(0.75 * h), _round8(1.25 * w)), (_round8(1.25 * h), _round8(0.5 * w))]
    out = []
    for sh, sw in sizes:
        sh = sh if sh != h else sh + INPUT_MULTIPLE
        sw = sw if sw != w else sw + INPUT_MULTIPLE
        out.append((sh, sw))
    return out


def synthetic_images(n: int, hw: tuple[int, int], seed: int) -> list[np.ndarray]:
    """``n`` RGB uint8 images [H, W, 3]: smooth random colour fields with some texture."""
    rng = np.random.default_rng(seed)
    h, w = hw
    images = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        img += rng.normal(0.0, 12.0, img.shape).astype(np.float32)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def make_inputs(sizes: Sequence[tuple[int, int]], batch: int, num_images: int, seed: int,
                pp: PreprocessConfig) -> list[Tensor]:
    """Preprocessed batches [batch, 3, h, w] (about ``num_images`` images per size)."""
    pp = replace(pp, max_side=0)     # keep the generated size (already a multiple of 8)
    batches = []
    for k, hw in enumerate(sizes):
        n_batches = max(1, math.ceil(num_images / batch))
        images = synthetic_images(n_batches * batch, hw, seed + 1000 * k)
        arrays = [preprocess(img, pp)[0] for img in images]
        for i in range(n_batches):
            batches.append(torch.from_numpy(np.stack(arrays[i * batch:(i + 1) * batch])))
    return batches


def labels_from_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits [B, C, h, w] -> labels [B, H, W] (bilinear upsampling to ``size``, then argmax)."""
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return up.argmax(dim=1)


def label_agreement(ref_logits: Tensor, cand_logits: Tensor,
                    size: tuple[int, int] | None = None) -> float:
    """Fraction of pixels with the same label from two logit maps [B, C, h, w].

    Labels are the argmax of the logits upsampled (bilinear) to ``size`` (default 4x, the input
    size of a stride-4 map). Both maps must have the same shape.
    """
    if ref_logits.shape != cand_logits.shape:
        raise ExportError(f"logit shapes differ: reference {tuple(ref_logits.shape)}, candidate "
                          f"{tuple(cand_logits.shape)}")
    size = size or (ref_logits.shape[-2] * 4, ref_logits.shape[-1] * 4)
    a = labels_from_logits(ref_logits.cpu(), size)
    b = labels_from_logits(cand_logits.cpu(), size)
    return float((a == b).double().mean())


def label_disagreements(ref_logits: Tensor, cand_logits: Tensor, size: tuple[int, int],
                        tolerance: float) -> tuple[int, int, int]:
    """Label disagreements of two logit maps [B, C, h, w] read out at ``size``.

    Returns ``(pixels, differ, counted)``: the number of pixels, of pixels whose labels differ,
    and of those where the reference's top-2 margin (of the upsampled logits) exceeds the
    absolute ``tolerance`` (the others are near-ties whose flip is within the numeric error).
    """
    if ref_logits.shape != cand_logits.shape:
        raise ExportError(f"logit shapes differ: reference {tuple(ref_logits.shape)}, candidate "
                          f"{tuple(cand_logits.shape)}")
    up = F.interpolate(ref_logits.float(), size=size, mode="bilinear", align_corners=False)
    a = up.argmax(dim=1)
    differ = a != labels_from_logits(cand_logits, size)
    if up.shape[1] > 1:
        top2 = up.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > tolerance
    else:
        clear = torch.ones_like(differ)
    return a.numel(), int(differ.sum()), int((differ & clear).sum())


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel cosine [B, h, w] of embeddings [B, D, h, w] (float64)."""
    a, b = a.double(), b.double()
    num = (a * b).sum(dim=1)
    den = a.norm(dim=1).clamp_min(1e-12) * b.norm(dim=1).clamp_min(1e-12)
    return num / den


def parity(reference: Backend, candidate: Backend, sizes: Sequence[tuple[int, int]],
           batch: int = 2, num_images: int = 4, seed: int = 0, min_cosine: float = MIN_COSINE,
           min_agreement: float = MIN_AGREEMENT, check: bool = True,
           margin_tolerance: float = MARGIN_TOLERANCE) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` at ``sizes``; raise ExportError on failure.

    Returns ``max_abs_diff_embeddings``, ``max_abs_diff_logits``, ``mean_cosine``,
    ``min_cosine``, ``label_agreement`` (raw), ``label_agreement_margin`` (margin-aware, the
    gate; ``margin_tolerance`` relative to the batch's largest reference logit, see the module
    docstring), ``near_tie_flips`` (forgiven pixels), the sizes, batch, number of images and
    pixels, the thresholds and ``passed``. With ``check=False`` nothing is raised (the dict says
    passed).
    """
    if not sizes:
        raise ExportError("parity needs at least one input size")
    pp = reference.manifest.preprocess
    stats = {"emb": 0.0, "log": 0.0, "cos_sum": 0.0, "cos_min": 1.0, "differ": 0, "counted": 0,
             "px": 0, "images": 0}
    per_size = []
    for x in make_inputs(sizes, batch, num_images, seed, pp):
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        with torch.inference_mode():
            rp, rl = (t.detach().float().cpu() for t in reference(x))
            cp, cl = (t.detach().float().cpu() for t in candidate(x))
        if rp.shape != cp.shape or rl.shape != cl.shape:
            raise ExportError(f"{candidate.name} output shapes {tuple(cp.shape)}, {tuple(cl.shape)} "
                              f"differ from {reference.name}'s {tuple(rp.shape)}, "
                              f"{tuple(rl.shape)} at input {tuple(x.shape)}",
                              fix="the export's dynamic axes are broken; re-export with --dynamic")
        cos = _cosine(rp, cp)
        finite = bool(torch.isfinite(cp).all() and torch.isfinite(cl).all())
        emb = float((rp - cp).abs().max()) if finite else math.inf
        lgt = float((rl - cl).abs().max()) if finite else math.inf
        tol = margin_tolerance * float(rl.abs().max()) if finite else 0.0
        px, differ, counted = label_disagreements(rl, cl, hw, tol)
        if not finite:
            counted = differ = px
        stats["emb"] = max(stats["emb"], emb)
        stats["log"] = max(stats["log"], lgt)
        stats["cos_sum"] += float(cos.sum()) if finite else -math.inf
        stats["cos_min"] = min(stats["cos_min"], float(cos.min()) if finite else -1.0)
        stats["differ"] += differ
        stats["counted"] += counted
        stats["px"] += px
        stats["images"] += x.shape[0]
        per_size.append({"input": list(x.shape), "max_abs_diff_embeddings": emb,
                         "mean_cosine": float(cos.mean()), "label_agreement": 1 - differ / px,
                         "label_agreement_margin": 1 - counted / px, "margin_abs": tol})
    n_emb_px = sum(p["input"][0] * (p["input"][2] // 4) * (p["input"][3] // 4) for p in per_size)
    result = {
        "reference": reference.name,
        "candidate": candidate.name,
        "sizes": [list(s) for s in sizes],
        "batch": batch,
        "num_images": stats["images"],
        "pixels": stats["px"],
        "max_abs_diff_embeddings": stats["emb"],
        "max_abs_diff_logits": stats["log"],
        "mean_cosine": stats["cos_sum"] / n_emb_px,
        "min_cosine": stats["cos_min"],
        "label_agreement": 1 - stats["differ"] / stats["px"],
        "label_agreement_margin": 1 - stats["counted"] / stats["px"],
        "near_tie_flips": stats["differ"] - stats["counted"],
        "margin_tolerance": margin_tolerance,
        "thresholds": {"mean_cosine": min_cosine, "label_agreement_margin": min_agreement},
        "per_batch": per_size,
    }
    result["passed"] = bool(result["mean_cosine"] >= min_cosine
                            and result["label_agreement_margin"] >= min_agreement)
    log.info("parity %s vs %s: %s", candidate.name, reference.name, format_parity(result))
    if check and not result["passed"]:
        err = ExportError(f"parity check failed for {candidate.name} vs {reference.name}: "
                          f"{format_parity(result)}",
                          fix="inspect the exported graph (opset, --half); the numbers above must "
                              f"reach mean cosine >= {min_cosine} and margin-aware label "
                              f"agreement >= {min_agreement}")
        err.report = result  # type: ignore[attr-defined]
        raise err
    return result


def format_parity(result: dict[str, Any]) -> str:
    """One line with the parity numbers."""
    sizes = ", ".join(f"{h}x{w}" for h, w in result["sizes"])
    return (f"max|d emb| {result['max_abs_diff_embeddings']:.3g}, max|d logits| "
            f"{result['max_abs_diff_logits']:.3g}, mean cosine {result['mean_cosine']:.7f} "
            f"(min {result['min_cosine']:.6f}), label agreement "
            f"{100 * result['label_agreement']:.3f}% ({100 * result['label_agreement_margin']:.3f}% "
            f"margin-aware: {result['near_tie_flips']} near-tie flips within "
            f"{result['margin_tolerance']:g} x max|logit| forgiven) at {sizes} "
            f"(batch {result['batch']}, {result['num_images']} images)")


def margin_tolerance(half: bool) -> float:
    """The margin-aware agreement's relative tolerance for an fp16 (``half``) or fp32 export."""
    return MARGIN_TOLERANCE_HALF if half else MARGIN_TOLERANCE
