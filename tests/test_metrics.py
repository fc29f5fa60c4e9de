"""Segmentation scores: hand-computed examples, a slow oracle, folder evaluation and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spml_deploy.errors import DatasetError, SpmlError
from spml_deploy.data.imageio import write_label_png
from spml_deploy.evaluation.metrics import (ConfusionMeter, SegmentationScores, confusion_matrix,
                                 evaluate_folder)
from test_data import CLASSES, gt_mask, make_dataset

# Hand-computed example (3 classes, 255 = ignore):
#   gt   = [[0, 0, 1, 1],      pred = [[0, 1, 1, 1],
#           [2, 2, 255, 1]]            [2, 0, 0, 1]]
# Scored (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,1); the 255 pixel is skipped.
GT = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = np.array([[0, 1, 1, 1], [2, 0, 0, 1]])
CONF = [[1, 1, 0],   # gt 0: one right, one predicted as 1
        [0, 3, 0],   # gt 1: all three right
        [1, 0, 1]]   # gt 2: one right, one predicted as 0
# TP = [1, 3, 1], GT = [2, 3, 2], PRED = [2, 4, 1]
# IoU = [1/(2+2-1), 3/(3+4-3), 1/(2+1-1)] = [1/3, 3/4, 1/2]; mIoU = 19/36
# pixel acc = 5/7; class acc = [1/2, 1, 1/2]; mean class acc = 2/3


def test_hand_computed_example() -> None:
    conf = confusion_matrix(PRED, GT, 3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, CONF)
    s = SegmentationScores.from_confusion(conf, ["a", "b", "c"])
    np.testing.assert_allclose(s.iou, [1 / 3, 3 / 4, 1 / 2])
    assert s.miou == pytest.approx(19 / 36)
    assert s.pixel_acc == pytest.approx(5 / 7)
    np.testing.assert_allclose(s.class_acc, [1 / 2, 1, 1 / 2])
    assert s.mean_acc == pytest.approx(2 / 3)
    assert s.num_pixels == 7
    d = s.to_dict()
    assert d["miou"] == pytest.approx(19 / 36) and d["confusion"] == CONF
    assert d["per_class"][1] == {"id": 1, "name": "b", "iou": 0.75, "acc": 1.0, "gt_pixels": 3,
                                 "pred_pixels": 4, "missed_pixels": 0}
    table = s.format_table()
    assert "mIoU 52.78" in table and "pixel acc 71.43" in table and "mean class acc 66.67" in table
    row_b = next(line for line in table.splitlines() if line.split()[:2] == ["1", "b"])
    assert row_b.split()[2:4] == ["75.00", "100.00"]


def test_absent_class_is_nan_and_excluded_but_false_positive_class_counts() -> None:
    # A 4th class in neither gt nor prediction: nan, left out of the mean (mIoU stays 19/36).
    s = SegmentationScores.from_confusion(confusion_matrix(PRED, GT, 4), list("abcd"))
    assert np.isnan(s.iou[3]) and np.isnan(s.class_acc[3])
    assert s.miou == pytest.approx(19 / 36)
    assert s.to_dict()["per_class"][3]["iou"] is None
    assert "n/a" in s.format_table()
    # Class 3 predicted where gt is 1 (only false positives): IoU_3 = 0 and counts in the mean.
    pred = PRED.copy()
    pred[0, 3] = 3          # gt 1 -> pred 3: TP1 = 2, GT1 = 3, PRED1 = 3 -> IoU1 = 2/4
    s = SegmentationScores.from_confusion(confusion_matrix(pred, GT, 4), list("abcd"))
    np.testing.assert_allclose(s.iou, [1 / 3, 1 / 2, 1 / 2, 0])
    assert s.miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 0) / 4)


def test_missing_images_count_as_wrong() -> None:
    meter = ConfusionMeter(3)
    meter.update(PRED, GT)
    meter.update_missing(np.array([[0, 1], [1, 255]]))   # missed: one 0 pixel, two 1 pixels
    s = meter.scores(["a", "b", "c"], missing=["x"])
    np.testing.assert_array_equal(s.missed, [1, 2, 0])
    # GT = [3, 5, 2], PRED = [2, 4, 1], TP = [1, 3, 1]
    np.testing.assert_allclose(s.iou, [1 / 4, 3 / 6, 1 / 2])
    assert s.miou == pytest.approx(5 / 12)
    assert s.pixel_acc == pytest.approx(5 / 10)
    assert s.num_images == 2 and s.num_pixels == 10
    table = s.format_table()
    assert "1 prediction(s) missing, counted as wrong: x" in table and "none" in table


def test_gt_vs_gt_is_perfect_and_ignore_is_ignored() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (30, 40))
    gt[rng.random(gt.shape) < 0.2] = 255
    s = SegmentationScores.from_confusion(confusion_matrix(gt, gt, 5), list("abcde"))
    assert s.miou == 1.0 and s.pixel_acc == 1.0 and s.mean_acc == 1.0
    # any prediction at ignored pixels, even a non-class, changes nothing
    pred = np.where(gt == 255, 200, gt)
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 5), confusion_matrix(gt, gt, 5))
    assert confusion_matrix(pred, gt, 5).sum() == (gt != 255).sum()


def test_confusion_matches_slow_oracle() -> None:
    rng = np.random.default_rng(1)
    C = 6
    gt = rng.integers(0, C, (3, 17, 23))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, C, gt.shape)
    slow = np.zeros((C, C), np.int64)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if g != 255:
            slow[g, p] += 1
    np.testing.assert_array_equal(confusion_matrix(pred, gt, C), slow)
    meter = ConfusionMeter(C)
    for b in range(3):
        meter.update(pred[b], gt[b])
    np.testing.assert_array_equal(meter.confusion, slow)
    s = meter.scores()
    tp = np.diag(slow)
    slow_iou = [tp[c] / (slow[c].sum() + slow[:, c].sum() - tp[c]) for c in range(C)]
    np.testing.assert_allclose(s.iou, slow_iou)
    assert s.class_names == [str(c) for c in range(C)]


def test_confusion_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match=r"prediction holds values \[3\]"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match=r"ground truth holds values \[4\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 4]), 3)


# --------------------------------------------------------------------------------------------
# evaluate_folder


@pytest.fixture
def ds_root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    make_dataset(root, n=4, splits={"train": ["0000", "0001"], "val": ["0002", "0003"]})
    return root


def _write_gt_predictions(root: Path, out: Path, stems: list[str]) -> None:
    for stem in stems:
        mask = np.array(Image.open(root / "masks" / f"{stem}.png"))
        write_label_png(out / f"{stem}.png", np.where(mask == 255, 0, mask))


def test_evaluate_folder_gt_vs_gt(ds_root: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    _write_gt_predictions(ds_root, pred, ["0002", "0003"])
    s = evaluate_folder(pred, ds_root, split="val")
    assert s.miou == 1.0 and s.pixel_acc == 1.0 and s.num_images == 2
    assert s.class_names == CLASSES and s.split == "val"
    assert s.num_pixels == 2 * (gt_mask(0) != 255).sum()
    assert "mIoU 100.00" in s.format_table()
    with pytest.raises(SpmlError, match="2 of 4 prediction"):
        evaluate_folder(pred, ds_root, split="all")


def test_evaluate_folder_known_errors(ds_root: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    _write_gt_predictions(ds_root, pred, ["0002"])
    # 0002 exactly right; 0003 missing -> counted as wrong with allow_missing
    with pytest.raises(SpmlError, match=r"1 of 2 prediction\(s\) missing, e.g. 0003.png") as info:
        evaluate_folder(pred, ds_root, split="val")
    assert info.value.path == str(pred) and "--allow-missing" in info.value.fix
    s = evaluate_folder(pred, ds_root, split="val", allow_missing=True)
    assert s.missing == ["0003"] and s.pixel_acc == pytest.approx(0.5)
    gt = gt_mask(2)
    counts = np.bincount(gt[gt != 255], minlength=3)
    np.testing.assert_allclose(s.iou, counts / (2 * counts))     # TP_c / (2 TP_c) = 1/2
    assert s.to_dict()["missing_predictions"] == ["0003"]

    write_label_png(pred / "0003.png", np.zeros((24, 31), np.uint8))
    with pytest.raises(SpmlError, match=r"prediction is 31x24 \(width x height\) but the mask of "
                                         r"'0003.png' is 32x24") as info:
        evaluate_folder(pred, ds_root, split="val")
    assert info.value.path == str(pred / "0003.png")

    write_label_png(pred / "0003.png", np.full((24, 32), 3, np.uint8))
    with pytest.raises(SpmlError, match=r"values \[3\] that are not class ids"):
        evaluate_folder(pred, ds_root, split="val")

    with pytest.raises(DatasetError, match="unknown split 'test'; available: all, train, val"):
        evaluate_folder(pred, ds_root, split="test")
    with pytest.raises(SpmlError, match="prediction folder not found"):
        evaluate_folder(tmp_path / "nope", ds_root)

    (ds_root / "masks" / "0003.png").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) of split 'val' have no mask: 0003"):
        evaluate_folder(pred, ds_root, split="val")


def test_evaluate_folder_subfolders_and_all(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "images" / "a" / "x.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "images" / "y.jpg")
    gt = np.zeros((6, 8), np.uint8)
    gt[:, 4:] = 1
    write_label_png(root / "masks" / "x.png", gt)    # y has no mask: skipped by 'all'
    (root / "annotations.json").write_text(json.dumps({
        "categories": [{"id": 0, "name": "bg"}, {"id": 1, "name": "fg"}],
        "images": [{"id": 1, "file_name": "a/x.png"}, {"id": 2, "file_name": "y.jpg"}]}))
    pred = np.zeros((6, 8), np.uint8)
    pred[:, 6:] = 1                                   # fg: TP 12, GT 24, PRED 12 -> IoU 1/2
    write_label_png(tmp_path / "pred" / "a" / "x.png", pred)   # mirrors file_name
    s = evaluate_folder(tmp_path / "pred", root, split="all")
    assert s.num_images == 1
    np.testing.assert_allclose(s.iou, [24 / 36, 12 / 24])       # bg: TP 24, GT 24, PRED 36


# --------------------------------------------------------------------------------------------
# CLI: eval


def test_cli_eval(ds_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from spml_deploy.cli import main

    pred = tmp_path / "pred"
    _write_gt_predictions(ds_root, pred, ["0002", "0003"])
    out_json = tmp_path / "res" / "scores.json"
    main(["eval", str(pred), str(ds_root), "--split", "val", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "mIoU 100.00" in out and "confusion matrix" in out and "background" in out
    data = json.loads(out_json.read_text())
    assert data["miou"] == 1.0 and data["split"] == "val" and len(data["confusion"]) == 3

    (pred / "0003.png").unlink()
    with pytest.raises(SystemExit) as info:
        main(["eval", str(pred), str(ds_root)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {pred}: 1 of 2 prediction(s) missing, e.g. 0003.png")
    assert "Traceback" not in err
    main(["eval", str(pred), str(ds_root), "--allow-missing"])
    assert "1 prediction(s) missing, counted as wrong: 0003" in capsys.readouterr().out
