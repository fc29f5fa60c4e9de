"""CAM classifier: mechanics with fixed weights, inference helpers, caching, and a tiny CPU fit."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

from spml_deploy.config import MODEL_PRESETS, ModelConfig, TrainConfig
from spml_deploy.data.dataset import Box
from spml_deploy.errors import ManifestError, TrainingError
from spml_deploy.training import cam as cam_mod
from spml_deploy.training.cam import (CamNet, box_cam, cam_config_hash, compute_cams,
                                      load_cam_model, train_cam)


def _cfg(num_classes: int = 3, width: int = 8) -> ModelConfig:
    return ModelConfig(num_classes=num_classes, **{**MODEL_PRESETS["tiny"], "width": width})


class PoolBackbone(nn.Module):
    """Stand-in backbone: the image averaged over 8 x 8 blocks (3 channels, stride 8)."""

    out_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 8)


def _fixed_model() -> CamNet:
    m = CamNet(_cfg())
    m.backbone = PoolBackbone()
    m.classifier = nn.Conv2d(3, 2, 1, bias=True)
    with torch.no_grad():
        m.classifier.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])[:, :, None, None])
        m.classifier.bias.copy_(torch.tensor([0.5, -0.25]))
    return m.eval()


@dataclass
class Rec:
    path: Path
    tags: tuple
    file_name: str = "x.png"


# ---------------------------------------------------------------------------------------------
# mechanics with fixed weights


def test_logits_are_pooled_scores_and_cams_are_relu_of_the_weights():
    m = _fixed_model()
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, :32, :32] = 2.0          # channel 0 = 2 in the top-left quadrant, 0 elsewhere
    x[0, 0, 32:, 32:] = -1.0         # and -1 in the bottom-right quadrant
    with torch.no_grad():
        logits, cams = m(x), m.cams(x)
    # mean of channel 0 over the image = (2 * 1024 - 1024) / 4096 = 0.25
    assert torch.allclose(logits, torch.tensor([[0.25 + 0.5, -0.25 - 0.25]]))
    assert cams.shape == (1, 2, 64, 64)
    # class 1 CAM = relu(f0) (no bias): 2 deep inside the top-left quadrant, 0 in the bottom right
    assert torch.allclose(cams[0, 0, 4:28, 4:28], torch.tensor(2.0))
    assert torch.allclose(cams[0, 0, 36:, 36:], torch.tensor(0.0))
    # class 2 CAM = relu(-f0): 1 deep inside the bottom-right quadrant
    assert torch.allclose(cams[0, 1, 36:60, 36:60], torch.tensor(1.0))
    assert float(cams.min()) >= 0.0
    # sizes that are not multiples of 8 are padded and cropped back
    assert m.cams(torch.zeros(2, 3, 60, 52)).shape == (2, 2, 60, 52)


def test_compute_cams_normalises_present_classes_and_zeroes_absent_ones():
    m = _fixed_model()
    img = np.full((64, 64, 3), 124, np.uint8)       # ~ImageNet mean red -> f0 ~ 0
    img[8:24, 40:56, 0] = 255                        # red patch on the right: class 1 evidence
    out = compute_cams(m, img, [1])
    assert out.shape == (2, 64, 64) and out.dtype == np.float32
    assert (out[1] == 0).all()                       # class 2 not asked for
    assert out[0].max() == pytest.approx(1.0)
    peak = np.unravel_index(out[0].argmax(), out[0].shape)
    assert 8 <= peak[0] < 24 and 40 <= peak[1] < 56
    # the backbone is flip-equivariant: averaging with the mirrored image changes nothing
    np.testing.assert_allclose(compute_cams(m, img, [1], flip=True), out, atol=1e-6)
    multi = compute_cams(m, img, [1, 2], scales=(1.0, 0.5))
    assert multi.shape == (2, 64, 64) and multi.max() <= 1.0 + 1e-6
    assert compute_cams(m, img, []).sum() == 0
    # a record gives its tags and its box classes
    rec = type("R", (), {"tags": (1,), "boxes": (Box(2, 0, 0, 8, 8),)})()
    assert cam_mod.cam_classes(rec) == [1, 2]


def test_box_cam_normalises_inside_the_box():
    cams = np.zeros((2, 10, 10), np.float32)
    cams[1, 2:5, 2:5] = np.arange(9, dtype=np.float32).reshape(3, 3) + 1
    cams[1, 9, 9] = 100.0                             # outside the box: ignored
    b = box_cam(cams, Box(2, 2, 2, 3, 3))
    np.testing.assert_allclose(b, (np.arange(9).reshape(3, 3) + 1) / 9.0)


# ---------------------------------------------------------------------------------------------
# training on a tiny synthetic dataset


def _scenes(folder: Path, n: int, seed: int):
    """64 x 64 noisy images: a red square (class 1) and/or a blue disc (class 2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    recs, gts = [], []
    for i in range(n):
        img = rng.normal(90, 20, (64, 64, 3)).clip(0, 255)
        gt = np.zeros((64, 64), np.uint8)
        kind = i % 4                                   # none, square, disc, both
        tags = []
        if kind in (1, 3):
            s = rng.integers(20, 28)
            y, x = rng.integers(0, 64 - s, size=2)
            img[y:y + s, x:x + s] = (220, 60, 60)
            gt[y:y + s, x:x + s] = 1
            tags.append(1)
        if kind in (2, 3):
            r = rng.integers(10, 14)
            cy, cx = rng.integers(r, 64 - r, size=2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[disc] = (60, 60, 220)
            gt[disc] = 2
            tags.append(2)
        p = folder / f"{i}.png"
        Image.fromarray(img.astype(np.uint8)).save(p)
        recs.append(Rec(p, tuple(sorted(set(np.unique(gt).tolist()) - {0}))))
        gts.append((img.astype(np.uint8), gt))
    return recs, gts


@pytest.fixture
def one_thread():
    """The tiny network is dominated by threading overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_trained_cams_localise_the_right_object(tmp_path, one_thread):
    recs, gts = _scenes(tmp_path, 48, seed=0)
    mcfg = _cfg()
    tcfg = TrainConfig(cam_iters=200, batch=8, crop=64, lr=0.01, warmup=10, seed=0)
    out = train_cam(recs, mcfg, tcfg, "cpu", tmp_path / "cam.pt", progress=False)
    ck = torch.load(out, weights_only=True)
    assert ck["final_loss"] < 0.3
    model = load_cam_model(out, mcfg)
    near, ratios, specific = 0, [], []
    total = 0
    for img, gt in gts:
        tags = sorted(set(np.unique(gt).tolist()) - {0})
        cams = compute_cams(model, img, tags, flip=True)
        for c in tags:
            total += 1
            peak = np.unravel_index(cams[c - 1].argmax(), gt.shape)
            # from scratch at stride 8 the peak may sit on the object's rim: allow one cell
            near += ndimage.distance_transform_edt(gt != c)[peak] <= 8
            ratios.append(cams[c - 1][gt == c].mean() / max(cams[c - 1][gt == 0].mean(), 1e-6))
            other = 3 - c
            if other in tags:
                specific.append(cams[c - 1][gt == c].mean() > cams[c - 1][gt == other].mean())
    assert near >= 0.9 * total, f"{near}/{total} CAM peaks near their object"
    assert np.median(ratios) > 4.0
    assert np.mean(specific) >= 0.8
    # a second call with the same config reuses the file
    stamp = out.stat().st_mtime_ns
    assert train_cam(recs, mcfg, tcfg, "cpu", tmp_path / "cam.pt", progress=False) == out
    assert out.stat().st_mtime_ns == stamp


def test_config_hash_tracks_config_and_data(tmp_path):
    recs = [Rec(tmp_path / "a.png", (1,)), Rec(tmp_path / "b.png", ())]
    base = cam_config_hash(recs, _cfg(), TrainConfig())
    assert base == cam_config_hash(list(recs), _cfg(), TrainConfig())
    assert base != cam_config_hash(recs, _cfg(), TrainConfig(cam_iters=7))
    assert base != cam_config_hash(recs, _cfg(width=4), TrainConfig())
    assert base != cam_config_hash([recs[0], Rec(tmp_path / "b.png", (2,))], _cfg(), TrainConfig())


def test_corrupt_or_mismatched_weights_are_retrained_and_checked(tmp_path, one_thread):
    recs, _ = _scenes(tmp_path, 4, seed=1)
    mcfg = _cfg(width=4)
    tcfg = TrainConfig(cam_iters=2, batch=2, crop=32, warmup=0)
    path = tmp_path / "cam.pt"
    path.write_bytes(b"garbage")
    train_cam(recs, mcfg, tcfg, "cpu", path, progress=False)
    ck = torch.load(path, weights_only=True)
    assert ck["config_hash"] == cam_config_hash(recs, mcfg, tcfg)
    load_cam_model(path, mcfg)                                  # loads cleanly
    with pytest.raises(ManifestError, match="classes"):
        load_cam_model(path, _cfg(num_classes=5, width=4))
    with pytest.raises(ManifestError, match="missing"):
        load_cam_model(tmp_path / "nope.pt", mcfg)


def test_training_errors(tmp_path, monkeypatch, one_thread):
    recs, _ = _scenes(tmp_path, 4, seed=2)
    mcfg = _cfg(width=4)
    tcfg = TrainConfig(cam_iters=3, batch=2, crop=32, warmup=0)
    with pytest.raises(TrainingError, match="no training image has a foreground tag"):
        train_cam([Rec(r.path, ()) for r in recs], mcfg, tcfg, "cpu", tmp_path / "c.pt", progress=False)
    monkeypatch.setattr(CamNet, "forward", lambda self, x: torch.full((x.shape[0], 2), float("nan")))
    with pytest.raises(TrainingError, match="at step 0"):
        train_cam(recs, mcfg, tcfg, "cpu", tmp_path / "c.pt", progress=False)
    assert not (tmp_path / "c.pt").exists()
