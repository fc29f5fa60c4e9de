"""The dataset contract: loading, summaries and every validation error."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from spml_deploy.data.dataset import KINDS, Dataset, Scribble, load_dataset, load_mask, load_sparse
from spml_deploy.errors import DatasetError
from spml_deploy.data.imageio import write_label_png

W, H = 32, 24
CLASSES = ["background", "cat", "dog"]


def gt_mask(i: int, w: int = W, h: int = H) -> np.ndarray:
    """Ground truth of image i: background, a cat rectangle, a dog rectangle, an ignore strip."""
    m = np.zeros((h, w), np.uint8)
    m[2:10, 3 + i:15 + i] = 1
    m[12:20, 16:28] = 2
    m[h - 1, :] = 255
    return m


def image_from_mask(mask: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    colours = np.array([[30, 30, 30], [200, 60, 40], [40, 180, 90]], np.uint8)
    img = colours[np.where(mask == 255, 0, mask)].astype(np.int16)
    return np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def write_json(root: Path, doc: dict) -> None:
    (root / "annotations.json").write_text(json.dumps(doc, indent=1))


def make_dataset(root: Path, n: int = 4, masks: bool = True, sparse: bool = False,
                 splits: dict[str, list[str]] | None = None) -> dict:
    """Write a small valid dataset (n images of W x H, 3 classes) and return its JSON document.

    Image i has tags [1, 2], a cat box, a dog point, a background point and a background
    scribble; masks/<stem>.png holds the ground truth; splits default to train = all but the
    last image, val = the last.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    doc: dict = {"categories": [{"id": i, "name": n_} for i, n_ in enumerate(CLASSES)],
                 "images": [], "annotations": []}
    stems = []
    for i in range(n):
        stem = f"{i:04d}"
        stems.append(stem)
        mask = gt_mask(i)
        Image.fromarray(image_from_mask(mask, i)).save(root / "images" / f"{stem}.png")
        if masks:
            write_label_png(root / "masks" / f"{stem}.png", mask)
        if sparse:
            sp = np.full_like(mask, 255)
            sp[5, 8] = 1
            sp[15, 20] = 2
            write_label_png(root / "sparse" / f"{stem}.png", sp)
        iid = 10 + i
        doc["images"].append({"id": iid, "file_name": f"{stem}.png", "width": W, "height": H,
                              "tags": [1, 2]})
        doc["annotations"] += [
            {"image_id": iid, "category_id": 1, "bbox": [3 + i, 2, 12, 8]},
            {"image_id": iid, "category_id": 2, "point": [21.5, 15]},
            {"image_id": iid, "category_id": 0, "point": [0, 0]},
            {"image_id": iid, "category_id": 0, "scribble": [[1, 22], [10, 22.5], [30, 21]]},
        ]
    write_json(root, doc)
    if splits is None:
        splits = {"train": stems[:-1], "val": stems[-1:]}
    (root / "splits").mkdir(exist_ok=True)
    for name, items in splits.items():
        (root / "splits" / f"{name}.txt").write_text("\n".join(items) + "\n")
    return doc


@pytest.fixture
def ds_root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    make_dataset(root)
    return root


# --------------------------------------------------------------------------------------------
# valid datasets


def test_loads_valid_dataset(ds_root: Path) -> None:
    ds = load_dataset(ds_root)
    assert isinstance(ds, Dataset)
    assert ds.num_classes == 3 and ds.class_names == CLASSES
    assert [r.stem for r in ds.split("train")] == ["0000", "0001", "0002"]
    assert [r.stem for r in ds.split("val")] == ["0003"]
    assert len(ds.split("all")) == 4
    rec = ds.by_stem("0002")
    assert (rec.id, rec.width, rec.height, rec.tags, rec.tags_source) == (12, W, H, (1, 2), "given")
    assert rec.path == ds_root / "images" / "0002.png"
    assert rec.boxes[0].category == 1 and (rec.boxes[0].x, rec.boxes[0].w) == (5.0, 12.0)
    assert [(p.category, p.x, p.y) for p in rec.points] == [(2, 21.5, 15.0), (0, 0.0, 0.0)]
    assert isinstance(rec.scribbles[0], Scribble)
    assert rec.scribbles[0].points.shape == (3, 2) and rec.scribbles[0].points.dtype == np.float64
    np.testing.assert_array_equal(rec.scribbles[0].points[1], [10, 22.5])
    assert rec.mask_path == ds_root / "masks" / "0002.png" and rec.sparse_path is None
    assert rec.annotation_kinds() == ("tags", "boxes", "points", "scribbles", "masks")
    np.testing.assert_array_equal(load_mask(rec, 3), gt_mask(2))
    assert load_sparse(rec) is None
    assert ds.annotation_kinds() == {"tags": 4, "boxes": 4, "points": 4, "scribbles": 4,
                                     "sparse": 0, "masks": 4}
    assert ds.has_kind("boxes") and not ds.has_kind("sparse")
    with pytest.raises(ValueError, match="kinds"):
        ds.has_kind("polygons")


def test_summary_and_format(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=3, sparse=True)
    ds = load_dataset(tmp_path)
    s = ds.summary()
    assert s["images"] == 3 and s["num_classes"] == 3
    assert s["classes"][1] == {"id": 1, "name": "cat"}
    assert s["annotation_kinds"]["points"] == {"images": 3, "annotations": 6}
    assert s["annotation_kinds"]["sparse"]["images"] == 3
    assert s["masks"] == 3 and s["splits"] == {"train": 2, "val": 1}
    json.dumps(s)
    text = ds.format_summary()
    assert "3 images, 3 classes" in text and "0 background, 1 cat, 2 dog" in text
    assert "train 2, val 1" in text
    for kind in KINDS:
        assert kind in text
    assert "(6 points)" in text


def test_tags_derived_from_annotations_or_none(ds_root: Path) -> None:
    doc = json.loads((ds_root / "annotations.json").read_text())
    del doc["images"][0]["tags"]                     # derived: box cat + point dog
    del doc["images"][1]["tags"]                     # derived from background only -> ()
    doc["annotations"] = [a for a in doc["annotations"]
                          if a["image_id"] != 11 or a["category_id"] == 0]
    del doc["images"][2]["tags"]                     # no annotations, no tags -> none
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 12]
    write_json(ds_root, doc)
    ds = load_dataset(ds_root)
    got = [(r.tags, r.tags_source) for r in ds.images]
    assert got == [((1, 2), "derived"), ((), "derived"), ((), "none"), ((1, 2), "given")]
    assert "tags" not in ds.images[2].annotation_kinds()
    assert ds.annotation_kinds()["tags"] == 3


def test_subfolders_optional_sizes_and_exif(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "images" / "a").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # stored 40x20, displayed 20x40
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(root / "images" / "a" / "r.png",
                                                          exif=exif)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "images" / "g.jpg")
    write_label_png(root / "masks" / "a" / "r.png", np.zeros((40, 20), np.uint8))  # mirrored
    write_label_png(root / "masks" / "g.png", np.ones((10, 12), np.uint8))
    doc = {"categories": [{"id": 1, "name": "thing"}, {"id": 0, "name": "bg"}],  # any order
           "images": [{"id": 1, "file_name": "a/r.png"}, {"id": 2, "file_name": "g.jpg"}],
           "annotations": [{"image_id": 1, "category_id": 1, "point": [19, 39]},
                           {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 40]}]}
    write_json(root, doc)
    for check in (True, False):                       # sizes come from the headers either way
        ds = load_dataset(root, check_files=check)
        r = ds.by_stem("r")
        assert (r.width, r.height, r.file_name) == (20, 40, "a/r.png")
        assert r.mask_path == root / "masks" / "a" / "r.png"
        assert ds.class_names == ["bg", "thing"] and ds.splits == {}
    doc["annotations"][0]["point"] = [20, 39]         # x = width is outside (max is width-1)
    write_json(root, doc)
    with pytest.raises(DatasetError,
                       match=r"annotations\[0\].*outside image 'a/r.png' of size 20x40"):
        load_dataset(root)
    with pytest.raises(DatasetError, match="unknown split 'val'; available: all"):
        ds.split("val")


def test_check_files_off_skips_file_reads(ds_root: Path) -> None:
    (ds_root / "images" / "0001.png").unlink()
    (ds_root / "masks" / "0002.png").write_bytes(b"garbage")
    ds = load_dataset(ds_root, check_files=False)
    assert len(ds.images) == 4
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset(ds_root)


def test_decode_images_catches_truncation(ds_root: Path) -> None:
    p = ds_root / "images" / "0001.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:-200])
    load_dataset(ds_root)                              # the header is intact
    with pytest.raises(DatasetError,
                       match=r"images\[1\] \(id 11, file_name '0001.png'\).*truncated"):
        load_dataset(ds_root, decode_images=True)


def test_split_entries_may_use_file_names_and_comments(ds_root: Path) -> None:
    (ds_root / "splits" / "val.txt").write_text("# held out\n\n0003.png\n  0002  \n")
    assert [r.stem for r in load_dataset(ds_root).split("val")] == ["0003", "0002"]


# --------------------------------------------------------------------------------------------
# every validation error

Mutation = Callable[[dict, Path], None]


def _set(path: str, value) -> Mutation:
    """Mutation setting doc[a][i][b] = value for path 'a.i.b'."""
    def mutate(doc: dict, root: Path) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        obj = doc
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return mutate


def _append_ann(ann: dict) -> Mutation:
    return lambda doc, root: doc["annotations"].append(ann)


def _write_mask(stem: str, arr: np.ndarray, folder: str = "masks") -> Mutation:
    return lambda doc, root: write_label_png(root / folder / f"{stem}.png", arr)


def _dup_image(doc: dict, root: Path) -> None:
    doc["images"].append(dict(doc["images"][0], file_name="other.png"))


def _dup_stem(doc: dict, root: Path) -> None:
    (root / "images" / "sub").mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "images" / "sub" / "0001.jpg")
    doc["images"].append({"id": 99, "file_name": "sub/0001.jpg", "width": W, "height": H})


def _text_image(doc: dict, root: Path) -> None:
    (root / "images" / "0002.png").write_text("this is not a png")


CASES: list[tuple[str, Mutation, str, str]] = [
    # (name, mutation, regex the message must match, file the error must name)
    ("missing images key", lambda d, r: d.pop("images"), r"images: missing or not a list",
     "annotations.json"),
    ("categories not list", _set("categories", {"0": "bg"}), r"categories: missing or not a list",
     "annotations.json"),
    ("image entry not object", _set("images.1", 5), r"images\[1\]: is a int", "annotations.json"),
    ("image id wrong type", _set("images.1.id", "11"), r"images\[1\]: 'id' is missing or not an "
     r"integer \('11'\)", "annotations.json"),
    ("file_name missing", _set("images.2.file_name", None),
     r"images\[2\] \(id 12\): 'file_name' is missing", "annotations.json"),
    ("width wrong type", _set("images.0.width", 32.5), r"images\[0\] \(id 10, file_name "
     r"'0000.png'\): 'width' must be a positive integer", "annotations.json"),
    ("only width", lambda d, r: d["images"][0].pop("height"), r"both 'width' and 'height'",
     "annotations.json"),
    ("escaping path", _set("images.0.file_name", "../x.png"), r"relative path inside images/",
     "annotations.json"),
    ("duplicate image id", _dup_image, r"images\[4\]: duplicate image id 10 \(also images\[0\]\)",
     "annotations.json"),
    ("duplicate stem", _dup_stem, r"images\[4\] .*duplicate stem '0001' \(also images\[1\]\)",
     "annotations.json"),
    ("duplicate category id", _set("categories.2.id", 1),
     r"categories\[2\]: duplicate category id 1 \(also categories\[1\]\)", "annotations.json"),
    ("duplicate category name", _set("categories.2.name", "cat"), r"duplicate category name 'cat'",
     "annotations.json"),
    ("non contiguous categories", _set("categories.2.id", 3),
     r"ids are \[0, 1, 3\]; they must be 0..C-1 .*0 = background \(missing \[2\]\)",
     "annotations.json"),
    ("no background", lambda d, r: d["categories"].pop(0), r"ids are \[1, 2\].*missing \[0\]",
     "annotations.json"),
    ("single category", lambda d, r: d.update(categories=[{"id": 0, "name": "bg"}]),
     r"1 categories; at least background", "annotations.json"),
    ("unknown image_id", _append_ann({"image_id": 77, "category_id": 1, "point": [1, 1]}),
     r"annotations\[16\] \(image_id 77\): unknown image_id 77", "annotations.json"),
    ("image_id wrong type", _set("annotations.3.image_id", [10]),
     r"annotations\[3\]: 'image_id' is missing or not an integer", "annotations.json"),
    ("category not in categories", _set("annotations.5.category_id", 5),
     r"annotations\[5\] \(image_id 11\): category_id 5 is not in categories \(ids 0..2\)",
     "annotations.json"),
    ("background box", _set("annotations.0.category_id", 0),
     r"annotations\[0\] \(image_id 10\): a bbox uses category 0 \(background\)",
     "annotations.json"),
    ("background tag", _set("images.1.tags", [0, 1]),
     r"images\[1\] .*tags contain 0 \(background\)", "annotations.json"),
    ("unknown tag", _set("images.1.tags", [1, 4]), r"tag 4 is not in categories",
     "annotations.json"),
    ("tags miss an annotated class", _set("images.1.tags", [1]),
     r"images\[1\] .*tags \[1\] miss categories \[2\]", "annotations.json"),
    ("box too wide", _set("annotations.4.bbox", [25, 2, 8, 8]),
     r"annotations\[4\] \(image_id 11\): bbox \[25.0, 2.0, 8.0, 8.0\] is outside image '0001.png' "
     r"of size 32x24.*x \+ w <= 32", "annotations.json"),
    ("box negative", _set("annotations.4.bbox", [-2, 2, 8, 8]), r"annotations\[4\].*outside",
     "annotations.json"),
    ("box empty", _set("annotations.4.bbox", [2, 2, 0, 8]), r"annotations\[4\].*w > 0",
     "annotations.json"),
    ("box wrong arity", _set("annotations.4.bbox", [2, 2, 8]), r"'bbox' must be \[x, y, w, h\]",
     "annotations.json"),
    ("point outside", _set("annotations.1.point", [31.5, 3]),
     r"annotations\[1\] \(image_id 10\): point \[31.5, 3.0\] is outside image '0000.png' of size "
     r"32x24; need 0 <= x <= 31", "annotations.json"),
    ("point below", _set("annotations.1.point", [3, 24]), r"annotations\[1\].*outside",
     "annotations.json"),
    ("point nan", _set("annotations.1.point", [float("nan"), 3]), r"2 finite numbers",
     "annotations.json"),
    ("point string", _set("annotations.1.point", ["3", 3]), r"'point' must be \[x, y\]",
     "annotations.json"),
    ("scribble one point", _set("annotations.3.scribble", [[1, 1]]),
     r"annotations\[3\] \(image_id 10\): scribble has 1 point\(s\); at least 2",
     "annotations.json"),
    ("scribble vertex outside", _set("annotations.7.scribble", [[1, 1], [2, 2], [40, 2]]),
     r"annotations\[7\].*scribble vertex 2 \[40.0, 2.0\] is outside", "annotations.json"),
    ("scribble malformed", _set("annotations.7.scribble", [[1, 1, 1], [2, 2]]),
     r"list of \[x, y\] pairs", "annotations.json"),
    ("two shapes", _set("annotations.1.bbox", [1, 1, 2, 2]),
     r"annotations\[1\].*has \['bbox', 'point'\].*exactly one", "annotations.json"),
    ("no shape", lambda d, r: d["annotations"][1].pop("point"), r"has none of", "annotations.json"),
    ("image file missing", lambda d, r: (r / "images" / "0002.png").unlink(),
     r"images\[2\] \(id 12, file_name '0002.png'\): file not found", "images/0002.png"),
    ("image unreadable", _text_image, r"images\[2\] .*not an image", "images/0002.png"),
    ("declared size differs", _set("images.3.height", 30),
     r"images\[3\] .*declares 32x30 \(width x height\) but the image file is 32x24",
     "annotations.json"),
    ("mask size differs", _write_mask("0001", np.zeros((H, W + 1), np.uint8)),
     r"mask of image id 11 \('0001.png'\) is 33x24 \(width x height\) but its image is 32x24",
     "masks/0001.png"),
    ("mask class ids", _write_mask("0002", np.array([[0, 7], [9, 255]], np.uint8).repeat(12, 0)
                                   .repeat(16, 1)),
     r"mask of image id 12 .*class ids \[7, 9\] that do not exist: the dataset has 3 categories",
     "masks/0002.png"),
    ("mask rgb", lambda d, r: Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
        r / "masks" / "0000.png"), r"mask of image id 10 .*mode 'RGB'", "masks/0000.png"),
    ("sparse class ids", _write_mask("0000", np.full((H, W), 3, np.uint8), "sparse"),
     r"sparse label map of image id 10 .*class ids \[3\]", "sparse/0000.png"),
    ("split unknown stem", lambda d, r: (r / "splits" / "val.txt").write_text("0003\nnope\n"),
     r"line 2: 'nope' is not an image of the dataset", "splits/val.txt"),
    ("split duplicate", lambda d, r: (r / "splits" / "val.txt").write_text("0003\n0003.png\n"),
     r"line 2: '0003.png' is listed twice \(also line 1\)", "splits/val.txt"),
    ("split named all", lambda d, r: (r / "splits" / "all.txt").write_text("0003\n"),
     r"'all' is reserved", "splits/all.txt"),
]


@pytest.mark.parametrize("name,mutate,match,where", CASES, ids=[c[0] for c in CASES])
def test_validation_errors(ds_root: Path, name: str, mutate: Mutation, match: str,
                           where: str) -> None:
    doc = json.loads((ds_root / "annotations.json").read_text())
    mutate(doc, ds_root)
    write_json(ds_root, doc)
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(ds_root)
    err = info.value
    assert err.path is not None and Path(err.path) == ds_root / where
    assert err.fix, "every error says how to fix it"
    assert err.exit_code == 2
    assert str(err).startswith(str(ds_root / where))


def test_malformed_json_names_line_and_column(ds_root: Path) -> None:
    (ds_root / "annotations.json").write_text('{\n  "categories": [],\n  "images": [1,, 2]\n}\n')
    # the second comma of "[1,, 2]" is column 16 of line 3
    with pytest.raises(DatasetError, match=r"malformed JSON at line 3, column 16") as info:
        load_dataset(ds_root)
    assert info.value.path == str(ds_root / "annotations.json")
    (ds_root / "annotations.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="top level is a JSON list"):
        load_dataset(ds_root)
    (ds_root / "annotations.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(ds_root)


def test_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="annotations.json not found") as info:
        load_dataset(tmp_path)
    assert info.value.path == str(tmp_path / "annotations.json")
    (tmp_path / "images").rmdir()
    write_json(tmp_path, {"categories": [], "images": []})
    with pytest.raises(DatasetError, match="images/ folder not found"):
        load_dataset(tmp_path)


def test_annotations_key_optional_and_empty_dataset_ok(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "images" / "x.bmp")
    write_json(tmp_path, {"categories": [{"id": 0, "name": "bg"}, {"id": 1, "name": "fg"}],
                          "images": [{"id": 3, "file_name": "x.bmp"}]})
    ds = load_dataset(tmp_path)
    assert ds.images[0].annotation_kinds() == ()
    assert ds.annotation_kinds() == dict.fromkeys(KINDS, 0)
    assert (ds.images[0].width, ds.images[0].height) == (5, 4)


# --------------------------------------------------------------------------------------------
# CLI: data check


def test_cli_data_check(ds_root: Path, capsys: pytest.CaptureFixture) -> None:
    from spml_deploy.cli import main

    main(["data", "check", str(ds_root)])
    out = capsys.readouterr().out
    assert "4 images, 3 classes" in out and "0 background, 1 cat, 2 dog" in out
    main(["data", "check", str(ds_root), "--json"])
    assert json.loads(capsys.readouterr().out)["annotation_kinds"]["boxes"]["annotations"] == 4

    doc = json.loads((ds_root / "annotations.json").read_text())
    doc["annotations"][0]["bbox"] = [0, 0, 99, 5]
    write_json(ds_root, doc)
    with pytest.raises(SystemExit) as info:
        main(["data", "check", str(ds_root)])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {ds_root / 'annotations.json'}: annotations[0]")
    assert "outside image '0000.png'" in captured.err and "fix:" in captured.err
    assert "Traceback" not in captured.err
