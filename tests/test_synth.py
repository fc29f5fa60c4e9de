"""Built-in benchmark scenes (spml_deploy.data.synth)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spml_deploy.data import synth
from spml_deploy.errors import ConfigError, SpmlError

N_TRAIN, N_VAL, SIZE = 6, 2, 64


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "scenes"
    synth.synthesize(out, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=3)
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "parts"
    synth.synthesize(out, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=3, parts=True)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.array(im)


def dense_samples(poly) -> np.ndarray:
    """Pixels under a polyline at quarter-pixel steps (slow oracle, as in test_weaken)."""
    poly = np.asarray(poly, float)
    out = []
    for p, q in zip(poly[:-1], poly[1:]):
        n = 4 * int(np.abs(q - p).max()) + 1
        out += [np.rint(p + (q - p) * (i / n)) for i in range(n + 1)]
    return np.array(out).astype(int)


# ---------------------------------------------------------------------------------------------
# the dataset folder


def test_dataset_passes_loader_and_has_every_kind(scenes, parts):
    from spml_deploy.data.dataset import load_dataset

    for root, names in ((scenes, synth.SCENE_CLASSES), (parts, synth.PART_CLASSES)):
        ds = load_dataset(root, check_files=True)
        assert ds.class_names == list(names)
        assert ds.num_classes >= 7                        # >= 6 foreground classes + background
        assert len(ds.split("train")) == N_TRAIN and len(ds.split("val")) == N_VAL
        kinds = ds.annotation_kinds()
        for k in ("tags", "boxes", "points", "scribbles", "masks"):
            assert kinds[k] == N_TRAIN + N_VAL, k


def test_deterministic_bytes_and_order_independent(scenes, tmp_path):
    again = tmp_path / "again"
    synth.synthesize(again, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=3)
    a, b = files(scenes), files(again)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    # an image depends on (seed, split, index) only, not on how many others are made
    fewer = tmp_path / "fewer"
    synth.synthesize(fewer, n_train=2, n_val=1, size=SIZE, seed=3)
    for stem in ("train_00000", "train_00001", "val_00000"):
        for sub in ("images", "masks"):
            assert (fewer / sub / f"{stem}.png").read_bytes() == \
                (scenes / sub / f"{stem}.png").read_bytes()
    other = tmp_path / "other"
    synth.synthesize(other, n_train=1, n_val=0, size=SIZE, seed=4)
    assert (other / "images/train_00000.png").read_bytes() != \
        (scenes / "images/train_00000.png").read_bytes()


@pytest.mark.parametrize("which", ["scenes", "parts"])
def test_annotations_consistent_with_masks(which, request):
    root = request.getfixturevalue(which)
    doc = json.loads((root / "annotations.json").read_text())
    n_inst = []
    for im in doc["images"]:
        mask = read_mask(root / "masks" / (Path(im["file_name"]).stem + ".png"))
        assert mask.shape == (im["height"], im["width"])
        assert 255 not in mask                            # no ignore pixels in synthetic GT
        present = sorted(set(np.unique(mask).tolist()) - {0})
        assert im["tags"] == present
        anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        boxes = [a for a in anns if "bbox" in a]
        n_inst.append(len(boxes))
        for a in boxes:
            x, y, w, h = a["bbox"]
            c = a["category_id"]
            assert c != 0 and w > 0 and h > 0 and x + w <= im["width"] and y + h <= im["height"]
            inside = mask[y:y + h, x:x + w] == c
            # tight: the class touches all four sides of its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() \
                and inside[:, -1].any()
        for a in anns:
            if "point" in a:
                x, y = a["point"]
                assert mask[y, x] == a["category_id"]
            if "scribble" in a:
                assert len(a["scribble"]) >= 2
                smp = dense_samples(a["scribble"])
                assert (mask[smp[:, 1], smp[:, 0]] == a["category_id"]).all()
        # background gets points and strokes too
        assert sum(1 for a in anns if "point" in a and a["category_id"] == 0) >= 1
        assert sum(1 for a in anns if "scribble" in a and a["category_id"] == 0) >= 1
    assert np.mean(n_inst) >= (3 if which == "scenes" else 8)   # several instances per image


def test_parts_mode_has_its_part_classes(parts):
    seen = set()
    for p in (parts / "masks").iterdir():
        seen |= set(np.unique(read_mask(p)).tolist())
    assert seen == set(range(len(synth.PART_CLASSES)))


def test_refuses_non_empty_out(tmp_path, scenes):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SpmlError, match="not empty") as exc:
        synth.synthesize(out, n_train=1, n_val=0, size=SIZE)
    assert "--overwrite" in str(exc.value)
    # --overwrite does not delete a folder that does not hold a dataset
    with pytest.raises(SpmlError, match="does not hold a dataset"):
        synth.synthesize(out, n_train=1, n_val=0, size=SIZE, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    # ... but replaces a dataset
    ds = tmp_path / "ds"
    synth.synthesize(ds, n_train=2, n_val=0, size=SIZE)
    (ds / "stale.txt").write_text("old")
    synth.synthesize(ds, n_train=1, n_val=1, size=SIZE, overwrite=True)
    assert not (ds / "stale.txt").exists()
    assert sorted(p.name for p in (ds / "images").iterdir()) == ["train_00000.png",
                                                                 "val_00000.png"]
    assert sorted(os.listdir(tmp_path)) == ["busy", "ds"]      # no temporary folders left
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    synth.synthesize(tmp_path / "empty", n_train=1, n_val=0, size=SIZE)
    assert (tmp_path / "empty" / "annotations.json").is_file()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synth.render_scene

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize(tmp_path / "out", n_train=5, n_val=0, size=SIZE)
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="--size"):
        synth.synthesize(tmp_path / "a", n_train=1, size=16)
    with pytest.raises(ConfigError, match="at least one image"):
        synth.synthesize(tmp_path / "a", n_train=0, n_val=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpmlError, match="not a folder"):
        synth.synthesize(tmp_path / "file", n_train=1, size=SIZE)


def test_cli_synth(tmp_path, capsys):
    from spml_deploy.cli import main

    main(["data", "synth", str(tmp_path / "d"), "--n-train", "2", "--n-val", "1", "--size",
          "48", "--parts"])
    out = capsys.readouterr().out
    assert "3 figure scenes" in out and "images/s" in out
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", str(tmp_path / "d"), "--n-train", "1"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# the scenes themselves (in memory: true instance maps and context are available)


def render(n: int, parts: bool = False, size: int = SIZE, seed: int = 11):
    out = []
    for i in range(n):
        r, a = synth.image_rng(seed, 0, i, parts)
        out.append((synth.render_scene(size, r, parts=parts), a))
    return out


def test_boxes_points_scribbles_match_true_instances():
    for scene, arng in render(6) + render(4, parts=True):
        tags, anns = synth.scene_annotations(scene, arng)
        boxes = [a for a in anns if "bbox" in a]
        visible = [k for k in range(1, len(scene.classes) + 1) if (scene.instances == k).any()]
        assert len(boxes) == len(visible)
        for k, b in zip(visible, boxes):                 # each box encloses its instance, tightly
            ys, xs = np.nonzero(scene.instances == k)
            assert b["category_id"] == scene.classes[k - 1]
            assert b["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                 ys.max() - ys.min() + 1]
        big = [k for k in visible if (scene.instances == k).sum() >= scene.min_area]
        pts = [a for a in anns if "point" in a and a["category_id"] != 0]
        scr = [a for a in anns if "scribble" in a and a["category_id"] != 0]
        assert len(pts) == len(scr) == len(big)
        for k, p, s in zip(big, pts, scr):               # on their own instance, not just class
            x, y = p["point"]
            assert scene.instances[y, x] == k
            smp = dense_samples(s["scribble"])
            assert (scene.instances[smp[:, 1], smp[:, 0]] == k).all()


def test_scene_annotations_equal_the_weaken_functions():
    """The synthetic scenes use the same derivation as `spml-deploy data weaken`."""
    from spml_deploy.data import weaken as W

    for scene, _ in render(4) + render(3, parts=True):
        k_all = [k for k in range(1, len(scene.classes) + 1) if (scene.instances == k).any()]
        inst = [(scene.classes[k - 1], scene.instances == k) for k in k_all]
        big = [(c, m) for c, m in inst if m.sum() >= scene.min_area]
        rng = np.random.default_rng(1)
        want = (W.derive_boxes(inst) + W.derive_points(big, scene.mask, rng)
                + W.derive_scribbles(big, scene.mask, rng))
        assert synth.scene_annotations(scene, np.random.default_rng(1))[1] == want


def test_occlusion_scale_and_context():
    data = render(40)
    visible, drawn = [], []
    for scene, _ in data:
        area = np.bincount(scene.instances.ravel(), minlength=len(scene.classes) + 1)[1:]
        visible += area.tolist()
        drawn += scene.drawn_area
        for k, c in enumerate(scene.classes, 1):
            m = scene.instances == k
            sky = scene.sky[m].mean()
            if c == synth.SCENE_CLASSES.index("balloon"):
                assert sky > 0.6                          # balloons live in the sky
            if c == synth.SCENE_CLASSES.index("boulder"):
                assert sky < 0.5                          # boulders on the ground
        assert not scene.sky.all() and scene.sky.any()
    visible, drawn = np.array(visible), np.array(drawn)
    assert (visible <= drawn).all()
    assert (visible < 0.9 * drawn).mean() > 0.1           # many instances partly occluded
    assert np.percentile(drawn, 90) > 4 * np.percentile(drawn, 10)   # scale changes
    assert np.mean([len(s.classes) for s, _ in data]) >= 3


def test_backgrounds_are_textured():
    for scene, _ in render(5):
        bg = scene.image[scene.mask == 0].astype(float)
        assert bg.std(axis=0).mean() > 8                 # not a flat colour


def colour_bayes_accuracy(pairs, n_classes: int, bins: int = 4):
    """Accuracy of the best classifier using only a pixel's colour (quantised to bins^3),
    over foreground pixels, and the normalised colour histograms per class."""
    hist = np.zeros((n_classes, bins ** 3))
    for image, mask in pairs:
        q = image.astype(int) * bins // 256
        idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
        np.add.at(hist, (mask.ravel(), idx.ravel()), 1)
    fg = hist[1:]
    return fg.max(0).sum() / fg.sum(), fg / np.maximum(fg.sum(1, keepdims=True), 1)


def test_colour_alone_does_not_separate_classes():
    data = render(80, seed=5)
    acc, hist = colour_bayes_accuracy([(s.image, s.mask) for s, _ in data], 9)
    assert acc < 0.45                                    # 8 classes: chance is about 0.15
    names = synth.SCENE_CLASSES
    for a, b in (("disc", "square"), ("triangle", "star"), ("pebble", "ring"),
                 ("balloon", "boulder")):                # designed look-alike pairs
        inter = np.minimum(hist[names.index(a) - 1], hist[names.index(b) - 1]).sum()
        assert inter > 0.5, (a, b, inter)
    # control: the same check flags a colour-coded variant of the same scenes
    palette = np.random.default_rng(0).integers(0, 256, (9, 3))
    coded = [(np.where(s.mask[..., None] > 0, palette[s.mask], s.image), s.mask)
             for s, _ in data]
    assert colour_bayes_accuracy(coded, 9)[0] > 0.9


def test_parts_share_appearance_within_a_figure():
    data = render(40, parts=True, seed=5)
    acc, _ = colour_bayes_accuracy([(s.image, s.mask) for s, _ in data], 9)
    assert acc < 0.4                                     # parts differ by layout, not colour
    for scene, _ in data[:5]:
        assert len(set(scene.groups)) >= 1
        for g in set(scene.groups):                      # every figure has several parts
            assert sum(1 for x in scene.groups if x == g) == 14
