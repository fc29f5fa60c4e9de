"""The table of supervision kinds and the places that read it."""
from __future__ import annotations

from pathlib import Path

import pytest

from spml_deploy import config
from spml_deploy.data import weaken
from spml_deploy.data.dataset import KINDS as SOURCES, ImageRecord, Point
from spml_deploy.data.kinds import (SUPERVISION_KINDS, SUPERVISIONS, WEAK_KINDS, kind, kinds_of,
                                    needs_cams, preferred)
from spml_deploy.training.weak_labels import record_kinds


def test_table_columns():
    assert SUPERVISIONS == ("full", "scribbles", "points", "boxes", "tags")
    assert WEAK_KINDS == ("scribbles", "points", "boxes", "tags")
    assert [k.name for k in SUPERVISION_KINDS if needs_cams(k.name)] == ["boxes", "tags"]
    assert kind("full").phrase == "full masks" and kind("full").field == "mask_path"
    for k in SUPERVISION_KINDS:
        assert set(k.sources) <= set(SOURCES)
        assert hasattr(ImageRecord, k.field) or k.field in ImageRecord.__dataclass_fields__
    with pytest.raises(KeyError, match="scribbles"):
        kind("polygons")


def test_every_kind_has_presets_and_weaken_keys():
    for name in SUPERVISIONS:
        assert name in config.LOSS_PRESETS and name in config.OFFICIAL_LOSS
        assert name in config.BATCH_PRESETS
        assert config.preset(name).train.supervision == name
    assert set(config.LOSS_PRESETS) == set(SUPERVISIONS)
    assert weaken.KINDS == WEAK_KINDS
    assert weaken.KIND_KEY == {"boxes": "bbox", "points": "point", "scribbles": "scribble"}


def test_sources_to_kinds_and_suggestion_order():
    assert kinds_of(["sparse"]) == ("scribbles", "points")
    assert kinds_of(["masks", "tags"]) == ("full", "tags")
    assert kinds_of([]) == ()
    assert preferred(["full", "tags", "points"]) == ["points", "tags", "full"]


def test_record_kinds_reads_the_record_fields():
    base = dict(id=1, file_name="a.png", path=Path("a.png"), stem="a", width=4, height=3)
    assert record_kinds(ImageRecord(tags=(), **base)) == ()
    assert record_kinds(ImageRecord(tags=(), tags_source="given", **base)) == ("tags",)
    assert record_kinds(ImageRecord(tags=(2,), **base)) == ("tags",)
    assert record_kinds(ImageRecord(tags=(), sparse_path=Path("s.png"), mask_path=Path("m.png"),
                                    **base)) == ("full", "scribbles", "points")
    assert record_kinds(ImageRecord(tags=(1,), tags_source="derived",
                                    points=(Point(1, 1.0, 1.0),), **base)) == ("points", "tags")


def test_cli_choices_come_from_the_table():
    from spml_deploy.cli import cli

    params = {p.name: p for p in cli.commands["train"].params}
    assert tuple(params["supervision"].type.choices) == SUPERVISIONS
    weaken_cmd = cli.commands["data"].commands["weaken"]
    assert tuple({p.name: p for p in weaken_cmd.params}["kinds"].type.choices) == WEAK_KINDS
