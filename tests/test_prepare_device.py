"""Preprocessing with the resize on the device (``pipeline.prepare_batch(resize_on_device=True)``,
the path of ``Pipeline.forward`` on CUDA when the caller did not resize), run here on the CPU:
the network input is within one grey level of the host resize (OpenCV) and the label maps are
the same."""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from runs import make_run
import spml_deploy.engine.forward as forward_mod
from spml_deploy.engine.pipeline import load_pipeline
from spml_deploy.engine.preprocess import prepare_batch


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0.0, 12.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("prep") / "run", num_classes=4)


# shrink by 2 (integer), shrink by 0.43 (fractional), same size, enlarge by 1.6
SIZES = [(256, 192), (300, 200), (128, 96), (80, 50)]


def test_device_resize_is_within_grey_levels_of_the_host_resize(run):
    pp = replace(load_pipeline(run).pp, max_side=128)
    images = [_smooth(h, w, i) for i, (h, w) in enumerate(SIZES)]
    host, host_meta = prepare_batch(images, pp)
    dev, dev_meta = prepare_batch(images, pp, resize_on_device=True)
    assert host_meta == dev_meta and host.shape == dev.shape
    std = torch.tensor(pp.std).view(1, 3, 1, 1) / pp.scale
    levels = ((dev - host) * std).abs()                   # difference in grey levels
    assert torch.equal(dev[2], host[2])                   # size kept: identical
    # area (integer and fractional factors) and bilinear: at most one grey level (rounding)
    assert float(levels.max()) <= 1.0 + 1e-3 and float(levels.mean()) < 0.2
    pad = torch.ones_like(dev, dtype=torch.bool)
    for i, m in enumerate(dev_meta):
        pad[i, :, : m.resized_hw[0], : m.resized_hw[1]] = False
    assert float(dev[pad].abs().max()) == 0.0             # padding stays 0


def test_device_resize_gives_the_same_labels(run, monkeypatch):
    pipe = load_pipeline(run)
    pipe.pp = replace(pipe.pp, max_side=128)
    images = [_smooth(h, w, 10 + i) for i, (h, w) in enumerate(SIZES)]
    ref = pipe.predict(images)
    calls = []
    real = prepare_batch

    def on_device(imgs, pp, device, resized=None, resize_on_device=False):
        calls.append(resized is None)
        return real(imgs, pp, device, resized, resize_on_device=True)

    monkeypatch.setattr(forward_mod, "prepare_batch", on_device)
    got = pipe.predict(images)
    assert calls == [True]
    same = sum(int((a.labels == b.labels).sum()) for a, b in zip(ref, got))
    total = sum(a.labels.size for a in ref)
    assert same / total >= 0.99
