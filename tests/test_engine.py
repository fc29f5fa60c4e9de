"""The one forward stage (spml_deploy.engine.forward) and its users' batching: batched runs of
same-size images equal the images alone, flip passes, reader threads that report bad files, and
the evaluation through the engine against a slow per-image reference."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spml_deploy.config import preset
from spml_deploy.data.dataset import load_dataset, load_mask
from spml_deploy.data.imageio import read_image
from spml_deploy.data.synth import synthesize
from spml_deploy.engine.forward import Engine, read_batches, same_size_runs
from spml_deploy.engine.model import SegmentationModel, build_model
from spml_deploy.engine.preprocess import preprocess, resize_for_network
from spml_deploy.evaluation.metrics import ConfusionMeter
from spml_deploy.evaluation.model_scores import score_model


@pytest.fixture(scope="module")
def model_and_pp():
    torch.manual_seed(0)
    cfg = preset("points", "tiny", num_classes=3)
    net, f0 = build_model(cfg.model)
    return SegmentationModel(net, f0).eval(), replace(cfg.preprocess, max_side=0)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_a_batch_of_same_size_images_equals_each_image_alone(model_and_pp):
    model, pp = model_and_pp
    engine = Engine(model, pp)
    images = _images([(40, 48)] * 3)
    fw = engine.run(images, flip=True)
    for i, im in enumerate(images):
        one = engine.run([im], flip=True)
        for (p, lg), (p1, lg1) in zip(fw.passes, one.passes):
            torch.testing.assert_close(p[i:i + 1], p1, atol=1e-5, rtol=0)
            torch.testing.assert_close(lg[i:i + 1], lg1, atol=1e-4, rtol=0)


def test_flip_pass_is_the_mirror_image_flipped_back(model_and_pp):
    model, pp = model_and_pp
    engine = Engine(model, pp)
    im = _images([(32, 40)])[0]
    fw = engine.run([im], flip=True)
    mirror = engine.run([np.ascontiguousarray(im[:, ::-1])])
    torch.testing.assert_close(fw.passes[1][0], mirror.phi.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(fw.passes[1][1], mirror.logits.flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(fw.phi, F.normalize(fw.passes[0][0] + fw.passes[1][0], dim=1))
    torch.testing.assert_close(fw.logits, (fw.passes[0][1] + fw.passes[1][1]) / 2)
    assert fw.valid.shape == (1, 8, 10) and bool(fw.valid.all())


def test_reader_threads_keep_order_group_sizes_and_report_bad_files(tmp_path, model_and_pp):
    _, pp = model_and_pp
    import cv2

    paths = []
    for i, (h, w) in enumerate([(16, 16), (16, 16), (24, 16), (16, 16)]):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), _images([(h, w)], seed=i)[0])
        paths.append(p)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    items = [paths[0], bad, *paths[1:]]
    with ThreadPoolExecutor(2) as pool:
        reads = [r for group in read_batches(items, 2, pool, pp) for r in group]
    assert [r.item for r in reads] == items
    assert reads[1].image is None and "not an image" in reads[1].error and "fix:" in reads[1].error
    good = [r for r in reads if r.error is None]
    runs = same_size_runs(good)
    assert [[r.item.name for r in run] for run in runs] == [["0.png", "1.png"], ["2.png"], ["3.png"]]
    assert good[2].resized[1].padded_hw == (24, 16)


def test_score_model_equals_a_slow_per_image_reference(tmp_path, model_and_pp):
    model, _ = model_and_pp
    synthesize(tmp_path / "scenes", n_train=0, n_val=5, size=48, seed=3)
    ds = load_dataset(tmp_path / "scenes")
    torch.manual_seed(1)
    cfg = preset("points", "tiny", num_classes=ds.num_classes)
    net, f0 = build_model(cfg.model)
    m = SegmentationModel(net, f0).eval()
    got = score_model(m, cfg.preprocess, ds, "val", batch=2)
    meter = ConfusionMeter(ds.num_classes)
    with torch.no_grad():
        for rec in ds.split("val"):
            image = read_image(rec.path)
            x, prep = preprocess(image, cfg.preprocess)
            _, logits = m(torch.from_numpy(x)[None])
            up = F.interpolate(logits, size=prep.padded_hw, mode="bilinear", align_corners=False)
            up = up[..., : prep.resized_hw[0], : prep.resized_hw[1]]
            up = F.interpolate(up, size=prep.orig_hw, mode="bilinear", align_corners=False)[0]
            meter.update(up.argmax(0).numpy(), load_mask(rec))
    want = meter.scores(ds.class_names).to_dict()
    assert got["miou"] == pytest.approx(want["miou"], abs=1e-9)
    assert resize_for_network(image, cfg.preprocess)[1] == prep
