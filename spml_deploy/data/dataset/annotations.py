"""Parsing and validating ``annotations.json``: categories, image entries and annotations
(the rules are listed in :mod:`spml_deploy.data.dataset`)."""
from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from spml_deploy.errors import DatasetError
from spml_deploy.data.dataset.records import Category

_ANN_KEYS = ("bbox", "point", "scribble")


class _Ctx:
    """Where errors point: the annotations file."""

    def __init__(self, ann_path: Path):
        self.path = ann_path

    def fail(self, where: str, message: str, fix: str) -> DatasetError:
        return DatasetError(f"{where}: {message}", path=self.path, fix=fix)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(ann_path: Path) -> dict:
    try:
        text = ann_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 text ({exc})", path=ann_path,
                           fix="save annotations.json as UTF-8") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read: {exc}", path=ann_path,
                           fix="check the file's permissions") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                           path=ann_path, fix="fix the JSON syntax there (a JSON linter helps)"
                           ) from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"top level is a JSON {type(doc).__name__}, expected an object",
                           path=ann_path, fix='use {"categories": [...], "images": [...], '
                                              '"annotations": [...]}')
    return doc


def _parse_categories(doc: dict, ctx: _Ctx) -> tuple[Category, ...]:
    cats = doc.get("categories")
    if not isinstance(cats, list):
        raise ctx.fail("categories", "missing or not a list",
                       'add "categories": [{"id": 0, "name": "background"}, {"id": 1, ...}]')
    seen: dict[int, int] = {}
    names: dict[str, int] = {}
    out = []
    for i, c in enumerate(cats):
        where = f"categories[{i}]"
        if not isinstance(c, dict):
            raise ctx.fail(where, f"is a {type(c).__name__}, expected an object",
                           'write it as {"id": 1, "name": "..."}')
        if not _is_int(c.get("id")):
            raise ctx.fail(where, f"'id' is missing or not an integer ({c.get('id')!r})",
                           "give every category an integer id")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise ctx.fail(where, "'name' is missing or not a non-empty string "
                           f"({c.get('name')!r})", "give every category a name")
        cid, name = c["id"], c["name"]
        if cid in seen:
            raise ctx.fail(where, f"duplicate category id {cid} (also categories[{seen[cid]}])",
                           "give every category a distinct id")
        if name in names:
            raise ctx.fail(where, f"duplicate category name {name!r} (also "
                           f"categories[{names[name]}])", "give every category a distinct name")
        seen[cid], names[name] = i, i
        out.append(Category(cid, name))
    ids = sorted(seen)
    if len(ids) < 2:
        raise ctx.fail("categories", f"{len(ids)} categories; at least background (id 0) and one "
                       "foreground class are needed", "add the classes of your dataset")
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))
        raise ctx.fail("categories", f"ids are {ids}; they must be 0..C-1 without gaps, with "
                       f"0 = background" + (f" (missing {missing})" if missing else ""),
                       "renumber the categories 0..C-1 (and the category_id of annotations)")
    return tuple(sorted(out, key=lambda c: c.id))


def _safe_rel(file_name: str) -> PurePosixPath | None:
    rel = PurePosixPath(file_name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.name or file_name.startswith("/"):
        return None
    return rel


def _parse_images(raw: list, C: int, ctx: _Ctx, root: Path) -> list[dict]:
    entries: list[dict] = []
    ids: dict[int, int] = {}
    files: dict[str, int] = {}
    stems: dict[str, int] = {}
    for i, e in enumerate(raw):
        where = f"images[{i}]"
        if not isinstance(e, dict):
            raise ctx.fail(where, f"is a {type(e).__name__}, expected an object",
                           'write it as {"id": 1, "file_name": "0001.png"}')
        if not _is_int(e.get("id")):
            raise ctx.fail(where, f"'id' is missing or not an integer ({e.get('id')!r})",
                           "give every image a distinct integer id")
        iid = e["id"]
        if iid in ids:
            raise ctx.fail(where, f"duplicate image id {iid} (also images[{ids[iid]}])",
                           "give every image a distinct id")
        fn = e.get("file_name")
        if not isinstance(fn, str) or not fn:
            raise ctx.fail(f"{where} (id {iid})",
                           f"'file_name' is missing or not a string ({fn!r})",
                           "set file_name to the image's path relative to images/")
        where = f"images[{i}] (id {iid}, file_name {fn!r})"
        rel = _safe_rel(fn)
        if rel is None:
            raise ctx.fail(where, "file_name must be a relative path inside images/ (no leading "
                           "'/', no '..')", "write the path relative to DATASET/images/")
        if str(rel) in files:
            raise ctx.fail(where, f"same file as images[{files[str(rel)]}]",
                           "list every image file once")
        stem = rel.stem
        if stem in stems:
            raise ctx.fail(where, f"duplicate stem {stem!r} (also images[{stems[stem]}]); stems "
                           "name masks/<stem>.png, split entries and predictions, so they must "
                           "be unique", "rename one of the files")
        size = []
        for key in ("width", "height"):
            v = e.get(key)
            if v is not None and (not _is_int(v) or v < 1):
                raise ctx.fail(where, f"'{key}' must be a positive integer, got {v!r}",
                               f"set {key} to the image's size in pixels (or leave it out)")
            size.append(v)
        if (size[0] is None) != (size[1] is None):
            raise ctx.fail(where, "give both 'width' and 'height' or neither",
                           "add the missing one (or drop both to read them from the file)")
        tags = e.get("tags")
        if tags is not None:
            if not isinstance(tags, list) or not all(_is_int(t) for t in tags):
                raise ctx.fail(where, f"'tags' must be a list of category ids, got {tags!r}",
                               "list the foreground category ids present in the image")
            for t in tags:
                if t == 0:
                    raise ctx.fail(where, "tags contain 0 (background); tags list foreground "
                                   "classes only", "remove 0 from tags")
                if not 0 < t < C:
                    raise ctx.fail(where, f"tag {t} is not in categories (ids 0..{C - 1})",
                                   "use ids from categories or add the category")
            tags = tuple(sorted(set(tags)))
        ids[iid], files[str(rel)], stems[stem] = i, i, i
        entries.append(dict(index=i, where=where, id=iid, file_name=fn, rel=rel, stem=stem,
                            path=root / "images" / Path(*rel.parts), width=size[0],
                            height=size[1], tags=tags))
    return entries


def _parse_annotations(raw: list, entries: list[dict], C: int, ctx: _Ctx) -> dict[int, list]:
    by_id = {e["id"]: e for e in entries}
    per_image: dict[int, list] = {e["id"]: [] for e in entries}
    for j, a in enumerate(raw):
        where = f"annotations[{j}]"
        if not isinstance(a, dict):
            raise ctx.fail(where, f"is a {type(a).__name__}, expected an object",
                           'write it as {"image_id": 1, "category_id": 1, "point": [x, y]}')
        iid, cid = a.get("image_id"), a.get("category_id")
        if not _is_int(iid):
            raise ctx.fail(where, f"'image_id' is missing or not an integer ({iid!r})",
                           "set image_id to the id of an entry in images")
        where = f"annotations[{j}] (image_id {iid})"
        if iid not in by_id:
            raise ctx.fail(where, f"unknown image_id {iid}: no entry in images has this id",
                           "fix image_id or add the image to images")
        if not _is_int(cid):
            raise ctx.fail(where, f"'category_id' is missing or not an integer ({cid!r})",
                           "set category_id to an id from categories")
        if not 0 <= cid < C:
            raise ctx.fail(where, f"category_id {cid} is not in categories (ids 0..{C - 1})",
                           "use an id from categories or add the category")
        kinds = [k for k in _ANN_KEYS if k in a]
        if len(kinds) != 1:
            raise ctx.fail(where, f"has {kinds or 'none'} of 'bbox', 'point', 'scribble'; "
                           "exactly one is needed", "split it into one annotation per shape")
        kind = kinds[0]
        v = a[kind]
        if kind == "bbox":
            if not (isinstance(v, list) and len(v) == 4 and all(_is_num(t) for t in v)):
                raise ctx.fail(where, f"'bbox' must be [x, y, w, h] (4 finite numbers), got {v!r}",
                               "write the box as [x, y, width, height] in pixels")
            if cid == 0:
                raise ctx.fail(where, "a bbox uses category 0 (background); boxes mark "
                               "foreground objects only", "use a foreground category_id")
            shape = [float(t) for t in v]
        elif kind == "point":
            if not (isinstance(v, list) and len(v) == 2 and all(_is_num(t) for t in v)):
                raise ctx.fail(where, f"'point' must be [x, y] (2 finite numbers), got {v!r}",
                               "write the point as [column, row] in pixels")
            shape = [float(t) for t in v]
        else:
            if not (isinstance(v, list) and all(isinstance(p, list) and len(p) == 2
                                                and all(_is_num(t) for t in p) for p in v)):
                raise ctx.fail(where, "'scribble' must be a list of [x, y] pairs of finite numbers",
                               "write the scribble as [[x, y], [x, y], ...]")
            if len(v) < 2:
                raise ctx.fail(where, f"scribble has {len(v)} point(s); at least 2 are needed",
                               "add vertices, or use a 'point' annotation for a single pixel")
            shape = np.asarray(v, dtype=np.float64).reshape(-1, 2)
        per_image[iid].append((j, where, kind, cid, shape))
    return per_image
