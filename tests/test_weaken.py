"""Weak annotations derived from full masks (spml_deploy.data.weaken)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from spml_deploy.data import strokes as S
from spml_deploy.data import weaken as W
from spml_deploy.errors import ConfigError, DatasetError

# ---------------------------------------------------------------------------------------------
# a hand-made label map (96 x 128):
#   class 1: two discs (two instances) and a 2-pixel speck (dropped as an instance, kept as a tag)
#   class 2: a ring;  class 3: an 11 x 15 rectangle;  255: a strip;  0 elsewhere


def hand_mask() -> np.ndarray:
    m = np.zeros((96, 128), np.uint8)
    cv2.circle(m, (20, 20), 12, 1, -1)
    cv2.circle(m, (100, 75), 9, 1, -1)
    cv2.circle(m, (65, 45), 18, 2, -1)
    cv2.circle(m, (65, 45), 10, 0, -1)
    m[11:22, 30:45] = 3
    m[90:92, 5:6] = 1          # speck, area 2
    m[0:4, 110:128] = 255
    return m


def dense_samples(poly: np.ndarray) -> np.ndarray:
    """Pixels under a polyline (N x 2 x/y), slow oracle of the library's definition: segment
    p -> q sampled at rint(p + (q - p) * i / n), i = 0..n, n = 4 * max|q - p| + 1."""
    out = []
    for p, q in zip(np.asarray(poly, float)[:-1], np.asarray(poly, float)[1:]):
        n = 4 * int(np.abs(q - p).max()) + 1
        out += [np.rint(p + (q - p) * (i / n)) for i in range(n + 1)]
    return np.array(out).astype(int)


def polyline_length(poly: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(poly, axis=0), axis=1).sum())


def test_instances_match_scipy_label():
    m = hand_mask()
    inst = W.instances_from_semantic(m, min_area=16)
    assert [c for c, _ in inst] == [1, 1, 2, 3]
    for c in (1, 2, 3):     # oracle: scipy connected components, 8-connectivity
        lab, n = ndimage.label(m == c, structure=np.ones((3, 3)))
        comps = [lab == j for j in range(1, n + 1) if (lab == j).sum() >= 16]
        ours = [k for cc, k in inst if cc == c]
        assert len(ours) == len(comps)
        for k in ours:
            assert any(np.array_equal(k, o) for o in comps)
    # the speck is an instance once min_area allows it; background only when asked
    assert len(W.instances_from_semantic(m, min_area=1)) == 5
    with_bg = W.instances_from_semantic(m, min_area=16, include_background=True)
    assert sum(c == 0 for c, _ in with_bg) == 2          # outside and inside the ring
    assert all(c != 255 for c, _ in with_bg)


def test_tags_boxes_hand_computed():
    m = hand_mask()
    assert W.derive_tags(m) == [1, 2, 3]
    assert W.derive_tags(np.full((4, 4), 255, np.uint8)) == []
    inst = W.instances_from_semantic(m)
    boxes = W.derive_boxes(inst + [(0, m == 0)])          # background never gets a box
    assert [b["category_id"] for b in boxes] == [1, 1, 2, 3]
    assert boxes[3]["bbox"] == [30, 11, 15, 11]
    for (c, k), b in zip(inst, boxes):                   # tight: numpy oracle
        ys, xs = np.nonzero(k)
        assert b["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_bbox_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = rng.random((rng.integers(1, 40), rng.integers(1, 40))) < rng.uniform(0, 0.05)
        ys, xs = np.nonzero(m)
        want = None if len(ys) == 0 else (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
        assert S._bbox(m) == want
        assert S._bbox(m.astype(np.uint8) * 7) == want


def test_points_central_and_inside():
    m = hand_mask()
    inst = W.instances_from_semantic(m)
    pts = W.derive_points(inst, m, np.random.default_rng(0), n_background=3)
    fg, bg = pts[:4], pts[4:]
    assert [p["category_id"] for p in fg] == [1, 1, 2, 3]
    assert fg[3]["point"] == [37, 16]                     # centre of the 11 x 15 rectangle
    assert abs(fg[0]["point"][0] - 20) <= 1 and abs(fg[0]["point"][1] - 20) <= 1
    for (c, k), p in zip(inst, fg):
        x, y = p["point"]
        assert k[y, x] and m[y, x] == c
        # oracle: exact Euclidean depth (image border counts as border); ours is within 1 px
        edt = ndimage.distance_transform_edt(np.pad(k, 1))[1:-1, 1:-1]
        assert edt[y, x] >= edt.max() - 1.0
    assert len(bg) == 3 and all(p["category_id"] == 0 for p in bg)
    xy = np.array([p["point"] for p in bg])
    assert all(m[y, x] == 0 for x, y in xy)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    assert d[np.triu_indices(3, 1)].min() > 20          # spread over the background


def test_scribbles_inside_and_long():
    m = hand_mask()
    inst = W.instances_from_semantic(m)
    for seed in range(5):
        sc = W.derive_scribbles(inst, m, np.random.default_rng(seed), n_background=2)
        assert [s["category_id"] for s in sc] == [1, 1, 2, 3, 0, 0]
        for s, region in zip(sc, [k for _, k in inst] + [m == 0, m == 0]):
            poly = np.array(s["scribble"])
            assert len(poly) >= 2 and len(np.unique(poly, axis=0)) >= 2
            smp = dense_samples(poly)
            assert region[smp[:, 1], smp[:, 0]].all(), s      # vertices and segments inside
        # strokes run through the instance, not a dab: at least half the extent
        lengths = [polyline_length(np.array(s["scribble"])) for s in sc]
        assert lengths[0] >= 12 and lengths[3] >= 7       # disc r=12, rectangle 15 wide
        assert lengths[2] >= 0.5 * math.pi * 14           # the ring is followed, not crossed
        # the two background strokes are apart
        a, b = (np.array(s["scribble"], float) for s in sc[4:])
        assert np.linalg.norm(dense_samples(a)[:, None] - b[None], axis=-1).min() > 3


def test_scribble_deterministic_per_rng_and_degenerate_regions():
    m = hand_mask()
    inst = W.instances_from_semantic(m)
    a = W.derive_scribbles(inst, m, np.random.default_rng(7))
    b = W.derive_scribbles(inst, m, np.random.default_rng(7))
    assert a == b
    rng = np.random.default_rng(0)
    one = np.zeros((10, 10), bool)
    one[4, 4] = True
    assert S.stroke(one, rng) is None                     # a single pixel holds no stroke
    line = np.zeros((20, 30), bool)
    line[7, 3:27] = True                                  # one pixel thin
    s = np.array(S.stroke(line, rng))
    assert line[dense_samples(s)[:, 1], dense_samples(s)[:, 0]].all()
    assert polyline_length(s) >= 12


def test_stroke_inside_random_regions():
    """Property check on random unions of discs, boxes and thin lines, at several sizes."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        size = int(rng.choice([24, 64, 160]))
        m = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            x, y = (int(v) for v in rng.integers(0, size, 2))
            kind = rng.integers(3)
            if kind == 0:
                cv2.circle(m, (x, y), int(rng.integers(1, size // 3)), 1, -1)
            elif kind == 1:
                cv2.rectangle(m, (x, y), (x + int(rng.integers(1, size // 2)),
                                          y + int(rng.integers(1, size // 2))), 1, -1)
            else:
                cv2.line(m, (x, y), tuple(int(v) for v in rng.integers(0, size, 2)), 1,
                         int(rng.integers(1, 4)))
        region = m > 0
        s = S.stroke(region, rng)
        if s is None:
            assert region.sum() < 2 or not W.instances_from_semantic(m, min_area=2)
            continue
        s = np.array(s)
        assert len(s) >= 2 and len(np.unique(s, axis=0)) >= 2
        smp = dense_samples(s)
        assert region[smp[:, 1], smp[:, 0]].all(), trial


def test_densify_is_8_connected():
    path = np.array([[0, 0], [5, 2], [5, 9], [1, 1]])
    d = S._densify(path)
    assert (d[0] == path[0]).all() and (d[-1] == path[-1]).all()
    assert (np.abs(np.diff(d, axis=0)).max(axis=1) == 1).all()


def test_segments_ok_matches_slow_oracle():
    rng = np.random.default_rng(3)
    region = np.zeros((40, 40), bool)
    cv2.circle(region.view(np.uint8), (20, 20), 15, 1, -1)
    cv2.circle(region.view(np.uint8), (20, 20), 6, 0, -1)
    for _ in range(200):
        xy = rng.integers(0, 40, (4, 2))
        fast = S._segments_ok(xy, region)
        slow = []
        for p, q in zip(xy[:-1], xy[1:]):
            smp = dense_samples(np.stack([p, q]))
            slow.append(all(region[y, x] for x, y in smp))
        assert fast.tolist() == slow
    assert sum(S._segments_ok(rng.integers(0, 40, (200, 2)), region)) > 0   # both outcomes


# ---------------------------------------------------------------------------------------------
# dataset folders


def make_dataset(root: Path, with_tags: bool = False) -> Path:
    from spml_deploy.data.imageio import write_label_png

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(
            root / "images" / f"{stem}.png")
    write_label_png(root / "masks" / "a.png", hand_mask())
    images = [{"id": 1, "file_name": "a.png", "width": 128, "height": 96},
              {"id": 2, "file_name": "b.png", "width": 128, "height": 96}]
    if with_tags:
        images[0]["tags"] = [1, 2, 3]
    doc = {"categories": [{"id": i, "name": n} for i, n in
                          enumerate(["background", "disc", "ring", "bar"])],
           "images": images,
           "annotations": [{"image_id": 2, "category_id": 1, "point": [3, 4]}]}
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def test_weaken_dataset_round_trip(tmp_path):
    from spml_deploy.data.dataset import load_dataset

    root = make_dataset(tmp_path / "ds")
    original = (root / "annotations.json").read_bytes()
    report = W.weaken_dataset(root, ["tags", "boxes", "points", "scribbles"], seed=1)
    assert "1 image(s) without a mask left unchanged" in report
    assert (root / "annotations.json.bak").read_bytes() == original
    doc = json.loads((root / "annotations.json").read_text())
    anns = [a for a in doc["annotations"] if a["image_id"] == 1]
    # exactly what the pure functions give for this mask and seed
    m = hand_mask()
    tags, want = W.derive_annotations(
        m, ["tags", "boxes", "points", "scribbles"],
        np.random.default_rng(np.random.SeedSequence([1, 1])))
    assert doc["images"][0]["tags"] == tags == [1, 2, 3]
    assert anns == [{"image_id": 1, **a} for a in want]
    # image 2 (no mask) untouched
    assert [a for a in doc["annotations"] if a["image_id"] == 2] == \
        [{"image_id": 2, "category_id": 1, "point": [3, 4]}]
    assert "tags" not in doc["images"][1]
    ds = load_dataset(root, check_files=True)
    rec = ds.by_stem("a")
    assert len(rec.boxes) == 4 and len(rec.points) == 4 + 2 and len(rec.scribbles) == 4 + 2
    for p in rec.points:
        assert m[int(p.y), int(p.x)] == p.category

    # a second run refuses without --replace, naming the kind and the flag
    with pytest.raises(DatasetError, match="--replace") as exc:
        W.weaken_dataset(root, ["points"], seed=1)
    assert "points" in str(exc.value)
    # with replace: the same annotations again, no duplicates
    W.weaken_dataset(root, ["points", "boxes", "scribbles", "tags"], seed=1, replace=True)
    doc2 = json.loads((root / "annotations.json").read_text())
    assert sorted(map(json.dumps, doc2["annotations"])) == sorted(map(json.dumps,
                                                                      doc["annotations"]))


def test_weaken_refuses_existing_tags_and_bad_input(tmp_path):
    root = make_dataset(tmp_path / "ds", with_tags=True)
    with pytest.raises(DatasetError, match="tags"):
        W.weaken_dataset(root, ["tags"])
    W.weaken_dataset(root, ["points"])                   # other kinds are fine
    # tags that miss a class the mask holds: refused before anything is written
    doc = json.loads((root / "annotations.json").read_text())
    doc["images"][0]["tags"] = [1, 2]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 1]
    (root / "annotations.json").write_text(json.dumps(doc))
    before = (root / "annotations.json").read_bytes()
    with pytest.raises(DatasetError, match=r"classes \[3\] too"):
        W.weaken_dataset(root, ["boxes"])
    assert (root / "annotations.json").read_bytes() == before
    doc["images"][0]["tags"] = [1, 2, 3]
    with pytest.raises(ConfigError, match="unknown annotation kind"):
        W.weaken_dataset(root, ["polygons"])
    # an existing annotation whose class the mask lacks contradicts mask-derived tags
    doc["annotations"].append({"image_id": 1, "category_id": 1, "bbox": [0, 90, 2, 2]})
    doc["annotations"].append({"image_id": 1, "category_id": 3, "point": [0, 0]})
    (root / "annotations.json").write_text(json.dumps(doc))
    m = hand_mask()
    m[m == 3] = 0
    from spml_deploy.data.imageio import write_label_png
    write_label_png(root / "masks" / "a.png", m)
    with pytest.raises(DatasetError, match=r"classes \[3\]"):
        W.weaken_dataset(root, ["tags"], replace=True)


def test_weaken_without_masks_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "masks" / "a.png").unlink()
    with pytest.raises(DatasetError, match="no image has a full mask"):
        W.weaken_dataset(root, ["points"])


def test_weaken_cli(tmp_path, capsys):
    from spml_deploy.cli import main

    root = make_dataset(tmp_path / "ds")
    main(["data", "weaken", str(root), "--kind", "points", "--kind", "boxes"])
    assert "points: 6 points added" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["data", "weaken", str(root), "--kind", "points"])
    assert exc.value.code == 2
    assert "--replace" in capsys.readouterr().err
