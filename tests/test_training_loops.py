"""The three training loops (embedding, classifier on frozen embeddings, CAM classifier) against
values recorded from the loops before they shared their schedule, optimizer, augmentation,
normalisation and image cache: same learning rate for every group at every step, same batches."""
from __future__ import annotations

import numpy as np
import pytest

from loop_capture import REFERENCE, capture, small_config


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return capture(tmp_path_factory.mktemp("loops"), mp)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("key", ["train_lr_poly", "train_lr_cosine", "classifier_lr", "cam_lr"])
def test_learning_rates_per_group_and_step_are_unchanged(captured, reference, key):
    assert captured[key].shape == reference[key].shape
    np.testing.assert_array_equal(captured[key], reference[key])


@pytest.mark.parametrize("key", ["train_label", "train_region", "train_tags", "cam_x"])
def test_batches_are_unchanged(captured, reference, key):
    assert captured[key].dtype == reference[key].dtype
    np.testing.assert_array_equal(captured[key], reference[key])


@pytest.mark.parametrize("key", ["train_image", "classifier_x"])
def test_crops_differ_only_by_the_shared_normalisation(captured, reference, key):
    """The embedding and classifier loops normalised as ``(x / 255 - mean) / std``; they now use
    the CAM loop's and the inference's ``(x * scale - mean) / std``: the same crops (recovered
    as whole grey levels from the recorded values), a float32 rounding apart."""
    ref, got = reference[key], captured[key]
    cfg = small_config()
    mean = np.asarray(cfg.preprocess.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(cfg.preprocess.std, np.float32).reshape(1, 3, 1, 1)
    pad = np.broadcast_to((ref == 0).all(axis=1, keepdims=True), ref.shape)
    grey = (ref.astype(np.float64) * std + mean) * 255
    assert np.abs(grey - np.round(grey))[~pad].max() < 1e-3
    u8 = np.round(grey).clip(0, 255).astype(np.float32)
    expected = np.where(pad, np.float32(0), (u8 * np.float32(cfg.preprocess.scale) - mean) / std)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got - ref).max() < 1e-6
