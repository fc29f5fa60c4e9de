"""Weak annotations -> pixel label maps (spec 1.1): hand-checked cases and slow per-pixel oracles."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spml_deploy.config import TrainConfig
from spml_deploy.data.dataset import Box, ImageRecord, Point, Scribble
from spml_deploy.errors import DatasetError, TrainingError
from spml_deploy.data.imageio import write_label_png
from spml_deploy.training import label_rules as rules
from spml_deploy.training import weak_labels as wl

C = 4          # classes 0..3
UNL = C        # default unlabelled code


def _scr(cat: int, pts) -> Scribble:
    return Scribble(cat, np.asarray(pts, dtype=np.float64))


def _record(tmp_path: Path | None = None, **kw) -> ImageRecord:
    base = dict(id=1, file_name="a.png", path=Path("a.png"), stem="a", width=40, height=30,
                tags=(), tags_source="none")
    base.update(kw)
    return ImageRecord(**base)


# ---------------------------------------------------------------------------------------------
# scribbles


def test_horizontal_scribble_width3_covers_exactly_three_rows():
    y = rules.rasterize_scribbles([_scr(2, [[10, 20], [50, 20]])], 40, 60, C, width_px=3)
    assert y.dtype == np.uint8 and y.shape == (40, 60)
    rows, cols = np.nonzero(y == 2)
    assert sorted(set(rows.tolist())) == [19, 20, 21]
    assert cols.min() == 9 and cols.max() == 51          # 1 px past each end point
    assert (y == 2).sum() == 3 * 43
    assert set(np.unique(y).tolist()) == {2, UNL}        # UNL elsewhere, never 255


def test_vertical_and_diagonal_scribbles_match_hand_footprints():
    y = rules.rasterize_scribbles([_scr(1, [[7, 3], [7, 12]])], 20, 20, C)
    rows, cols = np.nonzero(y == 1)
    assert sorted(set(cols.tolist())) == [6, 7, 8] and rows.min() == 2 and rows.max() == 13
    # 45 degree stroke: line pixels (10+k, 10+k), k = 0..10, each grown by a 3x3 square
    y = rules.rasterize_scribbles([_scr(3, [[10, 10], [20, 20]])], 32, 32, C)
    ref = np.zeros((32, 32), bool)
    for k in range(11):
        ref[9 + k:12 + k, 9 + k:12 + k] = True
    np.testing.assert_array_equal(y == 3, ref)


def test_scribble_widths_1_and_2_and_rounding():
    y1 = rules.rasterize_scribbles([_scr(1, [[2.4, 5.5], [8.6, 5.5]])], 12, 12, C, width_px=1)
    # x 2.4 -> 2, 8.6 -> 9, y 5.5 -> 6 (halves round up)
    assert np.array_equal(np.argwhere(y1 == 1), np.array([[6, x] for x in range(2, 10)]))
    y2 = rules.rasterize_scribbles([_scr(1, [[2, 5], [8, 5]])], 12, 12, C, width_px=2)
    assert sorted(set(np.nonzero(y2 == 1)[0].tolist())) == [4, 5]   # extra row on top
    assert np.nonzero(y2 == 1)[1].min() == 1 and np.nonzero(y2 == 1)[1].max() == 8


def test_scribble_overlaps_foreground_over_background_then_later_wins():
    fg = _scr(1, [[5, 10], [25, 10]])
    bg = _scr(0, [[15, 0], [15, 19]])
    fg2 = _scr(2, [[15, 5], [15, 15]])
    y = rules.rasterize_scribbles([fg, bg], 20, 30, C)
    assert y[10, 15] == 1                     # background listed later, still below foreground
    assert y[2, 15] == 0 and y[10, 5] == 1
    y = rules.rasterize_scribbles([fg, bg, fg2], 20, 30, C)
    assert y[10, 15] == 2                     # among foreground strokes the later one wins


def test_scribble_at_border_is_clipped():
    y = rules.rasterize_scribbles([_scr(1, [[0, 0], [9, 0]])], 5, 10, C)
    assert sorted(set(np.nonzero(y == 1)[0].tolist())) == [0, 1]
    y = rules.rasterize_scribbles([_scr(2, [[8, 4], [12, 4]])], 5, 10, C)   # runs off the right edge
    assert np.array_equal(np.unique(np.nonzero(y == 2)[1]), np.array([7, 8, 9]))


def test_custom_unl_code_and_bad_category():
    y = rules.rasterize_scribbles([_scr(1, [[1, 1], [3, 1]])], 4, 5, C, unl=200)
    assert set(np.unique(y).tolist()) == {1, 200}
    with pytest.raises(TrainingError, match="unlabelled code 255"):
        rules.rasterize_scribbles([], 4, 5, C, unl=255)
    with pytest.raises(TrainingError, match="category 7"):
        rules.rasterize_scribbles([_scr(7, [[1, 1], [3, 1]])], 4, 5, C)


# ---------------------------------------------------------------------------------------------
# points


def test_point_footprint_is_the_documented_disk():
    fp = rules.point_footprint(6)
    assert fp.shape == (7, 7) and fp.sum() == 29
    assert fp.sum(axis=1).tolist() == [1, 5, 5, 7, 5, 5, 1]
    assert rules.point_footprint(0).tolist() == [[True]]


def test_points_hand_checked_and_clipped():
    y = rules.rasterize_points([Point(2, 10.4, 5.6)], 20, 20, C, dilation=6)
    ys, xs = np.nonzero(y == 2)
    assert (y == 2).sum() == 29
    assert ys.min() == 3 and ys.max() == 9 and xs.min() == 7 and xs.max() == 13   # centre (6, 10)
    y = rules.rasterize_points([Point(1, 0, 0)], 20, 20, C)
    assert (y == 1).sum() == 4 + 3 + 3 + 1            # quarter disk: rows of 4, 3, 3, 1 pixels
    assert (y == 1).sum() == rules.point_footprint(6)[3:, 3:].sum()


def _points_oracle(points, h, w, dilation, unl):
    """Per-pixel: the last point (background first, then foreground) whose disk holds the pixel."""
    order = [p for p in points if p.category == 0] + [p for p in points if p.category != 0]
    out = np.full((h, w), unl, np.uint8)
    for r in range(h):
        for c in range(w):
            for p in order:
                cx, cy = np.floor(p.x + 0.5), np.floor(p.y + 0.5)
                if 4 * ((r - cy) ** 2 + (c - cx) ** 2) <= dilation ** 2:
                    out[r, c] = p.category
    return out


@pytest.mark.parametrize("dilation", [6, 5, 2])
def test_points_match_per_pixel_oracle(dilation):
    rng = np.random.default_rng(dilation)
    pts = [Point(int(rng.integers(0, C)), float(rng.uniform(0, 23)), float(rng.uniform(0, 17)))
           for _ in range(12)]
    got = rules.rasterize_points(pts, 18, 24, C, dilation=dilation)
    np.testing.assert_array_equal(got, _points_oracle(pts, 18, 24, dilation, UNL))


# ---------------------------------------------------------------------------------------------
# boxes


def test_box_rule_hand_checked():
    h, w = 20, 20
    cam = np.zeros((C - 1, h, w), np.float32)
    cam[1, :, :] = np.arange(w, dtype=np.float32)[None, :] - 5.0       # class 2: -5 .. 14
    y = rules.labels_from_boxes([Box(2, 5, 4, 10, 8)], cam, h, w, C, threshold=0.5)
    # box columns 5..14: CAM 0..9, /9 -> >= 0.5 for CAM >= 4.5 -> columns 10..14
    assert (y[:4] == 0).all() and (y[12:] == 0).all() and (y[:, :5] == 0).all() and (y[:, 15:] == 0).all()
    assert (y[4:12, 10:15] == 2).all() and (y[4:12, 5:10] == UNL).all()
    # raw or scaled CAMs give the same map (max normalisation within the box)
    np.testing.assert_array_equal(y, rules.labels_from_boxes([Box(2, 5, 4, 10, 8)], 7 * cam, h, w, C))
    # mapping and callable sources are equivalent
    np.testing.assert_array_equal(y, rules.labels_from_boxes([Box(2, 5, 4, 10, 8)], {2: cam[1]}, h, w, C))
    np.testing.assert_array_equal(y, rules.labels_from_boxes([Box(2, 5, 4, 10, 8)],
                                                          lambda c: cam[c - 1], h, w, C))


def test_box_without_cam_evidence_is_unlabelled_and_fractional_extent():
    h, w = 10, 12
    cam = np.full((C - 1, h, w), -1.0, np.float32)
    y = rules.labels_from_boxes([Box(1, 2.5, 1.2, 3.0, 2.0)], cam, h, w, C)
    assert rules.box_extent(Box(1, 2.5, 1.2, 3.0, 2.0), h, w) == (1, 4, 2, 6)
    assert (y[1:4, 2:6] == UNL).all() and (y == UNL).sum() == 12


def _boxes_oracle(boxes, cams, h, w, thr, unl):
    """Per pixel: the smallest containing box (ties: later annotation) decides."""
    out = np.zeros((h, w), np.uint8)
    exts = [rules.box_extent(b, h, w) for b in boxes]
    for r in range(h):
        for c in range(w):
            best = None
            for i, (b, (y0, y1, x0, x1)) in enumerate(zip(boxes, exts)):
                if y0 <= r < y1 and x0 <= c < x1:
                    area = (y1 - y0) * (x1 - x0)
                    if best is None or area <= best[0]:
                        best = (area, i)
            if best is None:
                continue
            b = boxes[best[1]]
            y0, y1, x0, x1 = exts[best[1]]
            m = np.maximum(cams[b.category - 1][y0:y1, x0:x1], 0).max()
            s = max(cams[b.category - 1][r, c], 0) / m if m > 0 else 0.0
            out[r, c] = b.category if s >= thr else unl
    return out


def test_boxes_match_per_pixel_oracle_with_overlaps():
    rng = np.random.default_rng(3)
    h, w = 22, 26
    cams = rng.normal(size=(C - 1, h, w)).astype(np.float32)
    boxes = [Box(int(rng.integers(1, C)), float(rng.uniform(0, 15)), float(rng.uniform(0, 12)),
                 float(rng.uniform(2, 10)), float(rng.uniform(2, 9))) for _ in range(7)]
    boxes.append(Box(1, 3, 3, 4, 4))
    boxes.append(Box(2, 3, 3, 4, 4))   # equal area: the later one wins
    got = rules.labels_from_boxes(boxes, cams, h, w, C, threshold=0.5)
    np.testing.assert_array_equal(got, _boxes_oracle(boxes, cams, h, w, 0.5, UNL))


def test_smaller_box_wins_in_overlap():
    h, w = 20, 20
    cams = np.ones((C - 1, h, w), np.float32)
    big, small = Box(1, 0, 0, 20, 20), Box(3, 5, 5, 4, 4)
    for order in ([big, small], [small, big]):
        y = rules.labels_from_boxes(order, cams, h, w, C)
        assert (y[5:9, 5:9] == 3).all() and (y == 3).sum() == 16 and (y == 1).sum() == 400 - 16


def test_boxes_nocam_fallback():
    y = rules.labels_from_boxes_nocam([Box(2, 10, 10, 20, 10)], 30, 40, C)
    assert y[15, 20] == 2 and y[10, 10] == UNL and y[19, 29] == UNL
    assert y[5, 5] == 0 and (y[10:20, 10:30] != 0).all()


# ---------------------------------------------------------------------------------------------
# tags


def test_tag_rule_hand_checked():
    # pixels:        0     1     2     3     4
    c1 = np.array([1.0, 0.3, 0.0, 0.22, 0.23])
    c2 = np.array([0.1, 0.5, 0.0, 0.0, 0.0])
    c3 = np.array([9.0, 9.0, 9.0, 9.0, 9.0])       # absent class: ignored
    cams = np.stack([c1, c2, c3])[:, None, :]       # [C-1, 1, 5]
    y = rules.labels_from_tags(cams, [1, 2], C)
    # c2 / 0.5 = [0.2, 1, 0, 0, 0]; bg = (1 - max)^6: pixel 3: 0.78^6 = 0.2252 > 0.22 -> bg,
    # pixel 4: 0.77^6 = 0.2084 < 0.23 -> class 1
    assert y[0].tolist() == [1, 2, 0, 0, 1]
    # the [C, H, W] layout (channel 0 ignored) is equivalent
    full = np.concatenate([np.full((1, 1, 5), 5.0), cams])
    np.testing.assert_array_equal(rules.labels_from_tags(full, [1, 2], C), y)
    # no tags: all background
    assert (rules.labels_from_tags(cams, [], C) == 0).all()


def test_tag_threshold_and_alpha():
    m = np.array([1.0, 0.45, 0.7, 0.0])[None, None, :]
    cams = np.concatenate([m, np.zeros((C - 2, 1, 4))])
    # alpha 1: bg = 1 - m. pixel 1: max(0.55, 0.45) = 0.55 < 0.6 -> UNL; pixel 2: 0.7 -> class 1
    y = rules.labels_from_tags(cams, [1], C, alpha=1.0, threshold=0.6)
    assert y[0].tolist() == [1, UNL, 1, 0]
    # with the spec's alpha 6 / threshold 0.2 the winning score never drops below 0.2219
    grid = np.linspace(0, 1, 20001)[None, None, :]
    y = rules.labels_from_tags(np.concatenate([grid, np.zeros((C - 2, 1, grid.shape[-1]))]), [1], C)
    assert not (y == UNL).any()
    win = np.maximum((1 - grid) ** 6, grid).min()
    assert 0.2218 < win < 0.2220


def test_tags_match_per_pixel_oracle():
    rng = np.random.default_rng(5)
    cams = rng.uniform(-0.2, 1.0, size=(C - 1, 9, 11))
    tags = [1, 3]
    alpha, thr = 2.0, 0.45
    got = rules.labels_from_tags(cams, tags, C, alpha=alpha, threshold=thr, unl=250)
    peak = {c: max(np.maximum(cams[c - 1], 0).max(), 1e-30) for c in tags}
    for r in range(9):
        for c in range(11):
            fg = {k: max(cams[k - 1][r, c], 0) / peak[k] for k in tags}
            bg = (1 - max(fg.values())) ** alpha
            cand = [(bg, 0)] + [(fg[k], k) for k in tags]
            best = max(cand, key=lambda t: (t[0], -t[1]))
            assert got[r, c] == (best[1] if best[0] >= thr else 250)


# ---------------------------------------------------------------------------------------------
# sparse, dispatch, tags vector


def test_sparse_png_255_becomes_unlabelled_not_void():
    sparse = np.array([[0, 1, 255], [3, 255, 2]], np.uint8)
    y = rules.labels_from_sparse(sparse, C)
    assert y.tolist() == [[0, 1, UNL], [3, UNL, 2]]
    with pytest.raises(DatasetError, match=r"class ids \[7\]"):
        rules.labels_from_sparse(np.array([[7, 255]], np.uint8), C, path="sparse/x.png")


def test_missing_kind_names_the_kinds_the_dataset_has():
    recs = [_record(points=(Point(1, 3, 3),), tags=(1,), tags_source="derived"),
            _record(id=2, boxes=(Box(2, 1, 1, 5, 5),), tags=(2,), tags_source="given")]
    with pytest.raises(TrainingError) as exc:
        wl.check_supervision(recs, "scribbles")
    assert "dataset has no scribbles; it has: points, boxes, tags (use --supervision points)" in str(exc.value)
    wl.check_supervision(recs, "boxes")      # present: no error
    with pytest.raises(TrainingError, match="has no full masks"):
        wl.check_supervision(recs, "full")
    with pytest.raises(TrainingError, match=r"image 'a.png' has no scribbles; it has: points, tags"):
        wl.weak_label_map(recs[0], "scribbles", C)
    # non-strict: an image without strokes is all unlabelled, one without boxes all background
    assert (wl.weak_label_map(recs[0], "scribbles", C, strict=False) == UNL).all()
    assert (wl.weak_label_map(recs[0], "boxes", C, strict=False) == 0).all()
    # an image explicitly tagged background-only has (zero) boxes even when strict
    bg_only = _record(id=3, tags=(), tags_source="given")
    assert (wl.weak_label_map(bg_only, "boxes", C) == 0).all()
    with pytest.raises(TrainingError, match="has no points; it has: tags"):
        wl.weak_label_map(bg_only, "points", C)


def test_dispatch_full_sparse_points_boxes_tags(tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:10] = 2
    mask[0, :] = 255
    write_label_png(tmp_path / "m.png", mask)
    sparse = np.full((30, 40), 255, np.uint8)
    sparse[3, 4] = 1
    write_label_png(tmp_path / "s.png", sparse)
    rec = _record(mask_path=tmp_path / "m.png", sparse_path=tmp_path / "s.png",
                  points=(Point(3, 20, 20),), boxes=(Box(1, 2, 2, 10, 10),),
                  tags=(1, 3), tags_source="derived")
    full = wl.weak_label_map(rec, "full", C)
    np.testing.assert_array_equal(full, mask)                  # 255 stays VOID
    sc = wl.weak_label_map(rec, "scribbles", C)                 # no strokes -> the sparse PNG
    assert sc[3, 4] == 1 and (sc == UNL).sum() == 30 * 40 - 1
    pt = wl.weak_label_map(rec, "points", C, TrainConfig(point_dilation=0))
    assert pt[20, 20] == 3 and (pt == 3).sum() == 1
    with pytest.raises(TrainingError, match="needs CAMs"):
        wl.weak_label_map(rec, "boxes", C)
    nocam = wl.weak_label_map(rec, "boxes", C, allow_nocam=True)
    np.testing.assert_array_equal(nocam, rules.labels_from_boxes_nocam(rec.boxes, 30, 40, C))
    cams = np.zeros((C - 1, 30, 40), np.float32)
    cams[0, 5, 5] = 1.0
    bx = wl.weak_label_map(rec, "boxes", C, cams=cams)
    assert bx[5, 5] == 1 and (bx == 1).sum() == 1 and (bx == UNL).sum() == 99
    tg = wl.weak_label_map(rec, "tags", C, cams=cams)
    np.testing.assert_array_equal(tg, rules.labels_from_tags(cams, (1, 3), C))
    with pytest.raises(TrainingError, match="needs CAMs"):
        wl.weak_label_map(rec, "tags", C)
    with pytest.raises(TrainingError, match="shape"):
        wl.weak_label_map(rec, "tags", C, cams=cams[:, :10])


def test_tags_vector_and_weak_tags():
    lab = np.array([[0, 2, UNL], [255, 2, 0]], np.uint8)
    assert wl.tags_vector(lab, C).tolist() == [0, 0, 1, 0]
    rec = _record(tags=(1, 3), boxes=(Box(2, 1, 1, 3, 3),), tags_source="given")
    assert wl.tags_vector(rec, C).tolist() == [0, 1, 0, 1]
    assert wl.tags_vector([3], C).tolist() == [0, 0, 0, 1]
    assert wl.weak_tags(rec, "boxes", lab, C).tolist() == [0, 0, 1, 0]
    assert wl.weak_tags(rec, "tags", lab, C).tolist() == [0, 1, 0, 1]
    assert wl.weak_tags(rec, "points", lab, C).tolist() == [0, 0, 1, 0]
    with pytest.raises(TrainingError):
        wl.tags_vector([0], C)     # background is never a tag
