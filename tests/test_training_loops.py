"""The three training loops (embedding, classifier on frozen embeddings, CAM classifier) against
values recorded from the loops before they shared their schedule, optimizer, augmentation,
normalisation and image cache: same learning rate for every group at every step, same batches."""
from __future__ import annotations

import numpy as np
import pytest

from loop_capture import REFERENCE, capture


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


@pytest.mark.parametrize("key", ["train_label", "train_region", "train_tags", "cam_x",
                                 "train_image", "classifier_x"])
def test_batches_are_unchanged(captured, reference, key):
    assert captured[key].dtype == reference[key].dtype
    np.testing.assert_array_equal(captured[key], reference[key])
