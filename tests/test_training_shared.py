"""The pieces the training loops share: learning-rate schedule, optimizer factory, augmentation,
normalisation, decoded-file cache."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from spml_deploy.config import VOID, PreprocessConfig, preset
from spml_deploy.errors import ConfigError
from spml_deploy.training.augment import (DecodedCache, fit_in_canvas, normalize, random_flip,
                                          scale_crop)
from spml_deploy.training.schedule import LRSchedule, make_optimizer


def test_schedule_warmup_and_poly():
    """Spec 6: from 0.1 x base, capped by the poly decay base * (1 - t/T)^0.9."""
    s = LRSchedule.of(preset("points", "resnet50", 21).train)
    assert (s.base, s.total, s.warmup, s.decay) == (3e-3, 30000, 100, "poly")
    assert s.at(0) == pytest.approx(3e-4)
    assert s.at(50) < s.at(99) <= 3e-3
    assert s.at(50) == pytest.approx(3e-3 * (0.1 * 0.5 + 0.5))
    assert s.at(15000) == pytest.approx(3e-3 * 0.5 ** 0.9)
    assert s.at(30000) == s.at(29999) > 0          # t is held below T


def test_schedule_cosine_and_unknown_names():
    cos = LRSchedule(3e-3, 1000, 100, "cosine")
    assert cos.at(0) == pytest.approx(3e-4)
    assert cos.at(500) == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cos.at(999) < 1e-7 < cos.at(900)
    with pytest.raises(ConfigError, match="train.schedule 'step'"):
        LRSchedule(3e-3, 1000, 100, "step")
    with pytest.raises(ConfigError, match="ramp"):
        LRSchedule(3e-3, 1000, 100, ramp="exp")


def test_linear_ramp_reaches_base_then_decays():
    s = LRSchedule(1.0, 100, 4, ramp="linear")
    assert [s.at(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.at(4) == pytest.approx((1 - 4 / 100) ** 0.9)
    assert LRSchedule(1.0, 100, 0, ramp="linear").at(0) == 1.0


def test_apply_sets_each_group_times_its_multiplier():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    train = preset("points", "tiny", 4).train
    opt = make_optimizer([dict(params=[a], lr_mult=10.0), dict(params=[b])], train)
    lr = LRSchedule(0.5, 10).apply(opt, 3)
    assert lr == pytest.approx(0.5 * 0.7 ** 0.9)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(10 * lr), pytest.approx(lr)]


def test_optimizer_factory():
    p = torch.nn.Parameter(torch.zeros(2))
    train = replace(preset("points", "tiny", 4).train, momentum=0.8, weight_decay=1e-3)
    sgd = make_optimizer([dict(params=[p])], train)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["weight_decay"] == 1e-3
    own = make_optimizer([dict(params=[p], weight_decay=0.0)], train)
    assert own.param_groups[0]["weight_decay"] == 0.0          # a group's own value wins
    adam = make_optimizer([dict(params=[p])], replace(train, optimizer="adamw"))
    assert isinstance(adam, torch.optim.AdamW)
    assert isinstance(make_optimizer([dict(params=[p])], replace(train, optimizer="adamw"), "sgd"),
                      torch.optim.SGD)
    with pytest.raises(ConfigError, match="lbfgs"):
        make_optimizer([dict(params=[p])], train, "lbfgs")


def test_scale_crop_pads_small_images_with_void_and_zeros():
    rng = np.random.default_rng(0)
    image = np.full((6, 5, 3), 200, np.uint8)
    label = np.ones((6, 5), np.uint8)
    region = np.full((6, 5), 7, np.int32)
    c = scale_crop(image, label, 16, (1.0, 1.0), rng, region=region)
    assert c.valid == (6, 5)
    assert c.image.shape == (16, 16, 3) and c.label.shape == (16, 16)
    assert (c.image[:6, :5] == 200).all() and (c.image[6:] == 0).all()
    assert (c.label[:6, :5] == 1).all() and (c.label[:, 5:] == VOID).all()
    assert (c.region[:6, :5] == 7).all() and (c.region[6:] == 0).all()
    big = scale_crop(np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40), np.uint8), 16,
                     (0.5, 2.0), np.random.default_rng(1))
    assert big.region is None and big.valid[0] >= 1 and big.valid[1] >= 1


def test_random_flip_mirrors_all_arrays_together():
    a = np.arange(6).reshape(2, 3)
    for seed in range(8):
        x, y = random_flip(np.random.default_rng(seed), a, a * 10)
        assert (y == x * 10).all() and (x == a).all() != (x == a[:, ::-1]).all()


def test_fit_in_canvas_keeps_the_whole_image():
    img = np.full((10, 20, 3), 9, np.uint8)
    out = fit_in_canvas(img, 16, (1.0, 1.0), np.random.default_rng(0), np.array([1, 2, 3]))
    assert out.shape == (16, 16, 3)
    assert ((out == 9).all(axis=2)).sum() == 16 * 8       # longer side = crop, aspect kept
    assert ((out == [1, 2, 3]).all(axis=2)).sum() == 16 * 8


def test_normalize_matches_the_inference_preprocessing_and_zeroes_padding():
    from spml_deploy.engine.preprocess import preprocess

    pp = PreprocessConfig(max_side=0)
    img = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = normalize(img, pp, valid=[(8, 8), (5, 3)])
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    ref, _ = preprocess(img[0], pp)
    np.testing.assert_array_equal(x[0].numpy(), ref)
    assert (x[1, :, 5:] == 0).all() and (x[1, :, :, 3:] == 0).all()
    np.testing.assert_array_equal(x[1, :, :5, :3].numpy(), preprocess(img[1], pp)[0][:, :5, :3])


def test_decoded_cache_keeps_files_within_its_budget(tmp_path):
    calls = []

    def read(path):
        calls.append(path.name)
        return np.zeros(100, np.uint8)

    cache = DecodedCache(budget=250)
    for name in ("a", "b", "c", "a", "b", "c"):
        assert cache.get(tmp_path / name, read).nbytes == 100
    assert calls == ["a", "b", "c", "c"]            # the third file is over budget: read again
    assert cache.used == 200
    unlimited = DecodedCache(None)
    for name in ("a", "b", "c", "a"):
        unlimited.get(tmp_path / name, read)
    assert calls[4:] == ["a", "b", "c"]
