"""Preset values that depend on the image size, checked against what they are for."""
from __future__ import annotations

import math

import torch

from spml_deploy.config import preset
from spml_deploy.engine.refine import refine_labels


def _small_object_scene(size: int = 128, obj: tuple[int, int] = (6, 9), cos: float = 0.94):
    """Scores [1, 2, size, size] and unit embeddings [1, 2, size/8, size/8]: a 3x3-cell object
    (class 1) on background (class 0); the object's embedding has cosine ``cos`` to the
    background's, and the scores are right but soft (object 0.9 / 0.1 inside it)."""
    g = size // 8
    a, b = obj
    phi = torch.zeros(1, 2, g, g)
    phi[0, 0] = 1.0
    theta = math.acos(cos)
    phi[0, :, a:b, a:b] = torch.tensor([math.cos(theta), math.sin(theta)])[:, None, None]
    scores = torch.zeros(1, 2, size, size)
    scores[0, 0] = 1.0
    scores[0, :, 8 * a:8 * b, 8 * a:8 * b] = torch.tensor([0.1, 0.9])[:, None, None]
    return scores, phi


def test_tiny_preset_walk_keeps_small_objects():
    """The tiny preset's 128 px images give a 16x16 walk grid. With the spec's 6 squarings
    (64 steps, meant for ~62x62 grids) a small object whose embedding is close to the
    background's is washed out; with the tiny preset's squarings it survives. The resnet
    presets (512 px images) keep the spec's value."""
    tiny = preset("points", "tiny", 2).segmentation
    assert preset("points", "resnet50", 2).segmentation.rw_squarings == 6
    assert tiny.rw_squarings < 6
    scores, phi = _small_object_scene()
    inside = (slice(48, 72), slice(48, 72))

    def walk(squarings: int) -> torch.Tensor:
        return refine_labels(scores, phi, None, (128, 128), beta=tiny.rw_beta,
                             alpha=tiny.rw_alpha, squarings=squarings)[0]

    kept = walk(tiny.rw_squarings)
    assert (kept[inside] == 1).float().mean() > 0.75
    assert (kept == 1).sum() < 2 * 24 * 24                      # and it does not spread
    assert (walk(6)[inside] == 1).float().mean() < 0.1
