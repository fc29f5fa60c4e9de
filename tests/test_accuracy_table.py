"""The weak-vs-full accuracy table (benchmarks/accuracy_table.py): its JSON shape, the ratio to
the same seed's full-mask CE row, resuming, and what it refuses. Scores at this budget mean
nothing; only the arithmetic and the bookkeeping are checked."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accuracy_table.py"
KEYS = {"scenes", "supervision", "method", "readout", "seed", "miou", "ratio_to_full"}


def _load():
    spec = importlib.util.spec_from_file_location("accuracy_table_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load()


def test_ratio_uses_the_same_seed_and_readout_of_the_same_scenes():
    res = [
        {"key": "objects-full-ce", "seed": 0, "miou": {"f1": 40.0, "knn": 50.0, "refine": 20.0}},
        {"key": "objects-full-ce", "seed": 1, "miou": {"f1": 80.0, "knn": 25.0, "refine": 10.0}},
        {"key": "objects-points-spml", "seed": 0,
         "miou": {"f1": 30.0, "knn": 45.0, "refine": 19.0}},
        {"key": "objects-points-spml", "seed": 1, "miou": {"f1": 30.0, "knn": 20.0, "refine": 9.0}},
        {"key": "objects-points-pce", "seed": 1, "miou": {"f1": 12.0, "knn": None, "refine": 7.0}},
        {"key": "parts-full-ce", "seed": 0, "miou": {"f1": 60.0, "knn": 0.0, "refine": 30.0}},
        {"key": "parts-points-spml", "seed": 0, "miou": {"f1": 15.0, "knn": 5.0, "refine": 3.0}},
        {"key": "parts-points-spml", "seed": 1, "miou": {"f1": 15.0, "knn": 5.0, "refine": 3.0}},
    ]
    rows = {(r["scenes"], r["supervision"], r["method"], r["readout"], r["seed"]): r
            for r in bench.table_rows(res)}
    ratio = {k: r["ratio_to_full"] for k, r in rows.items()}
    assert ratio[("objects", "points", "spml", "f1", 0)] == 0.75         # 30 / 40
    assert ratio[("objects", "points", "spml", "f1", 1)] == 0.375        # 30 / 80
    assert ratio[("objects", "points", "spml", "knn", 0)] == 0.9         # 45 / 50
    assert ratio[("objects", "points", "spml", "refine", 1)] == 0.9      # 9 / 10
    assert ratio[("objects", "points", "pce", "f1", 1)] == 0.15          # 12 / 80
    assert ratio[("objects", "full", "ce", "knn", 1)] == 1.0
    assert ratio[("parts", "points", "spml", "f1", 0)] == 0.25           # 15 / 60, parts CE
    assert ratio[("parts", "points", "spml", "knn", 0)] is None          # reference scored 0
    assert ratio[("parts", "points", "spml", "f1", 1)] is None           # no parts CE seed 1
    assert ("objects", "points", "pce", "knn", 1) not in rows            # no memory, no score
    assert all(set(r) == KEYS for r in rows.values())


def test_select_rows():
    assert [r.key for r in bench.select_rows("objects-*-pce")] == ["objects-scribbles-pce",
                                                                  "objects-points-pce"]
    assert len(bench.select_rows(None)) == len(bench.ROWS) == 11
    with pytest.raises(SystemExit, match="'objects-points-ce' matches no row"):
        bench.select_rows("objects-full-ce,objects-points-ce")


def _run(work: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--work", str(work), "--out", str(work / "res"),
           "--classifier-iters", "2", "--cam-iters", "2", "--seeds", "0", "1",
           "--n-train", "4", "--n-val", "2", "--size", "64", "--jobs", "2",
           "--rows", "objects-full-ce,objects-points-spml", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_tiny_table_end_to_end(tmp_path):
    work = tmp_path / "work"
    done = _run(work, "--iters", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((work / "res" / "accuracy_table.json").read_text())["rows"]
    assert all(set(r) == KEYS for r in rows)
    assert sorted((r["method"], r["readout"], r["seed"]) for r in rows) == sorted(
        (m, ro, s) for m in ("ce", "spml") for ro in ("f1", "knn", "refine") for s in (0, 1))
    ce = {(r["seed"], r["readout"]): r["miou"] for r in rows if r["method"] == "ce"}
    for r in rows:
        assert r["scenes"] == "objects" and 0 <= r["miou"] <= 100
        assert r["supervision"] == ("full" if r["method"] == "ce" else "points")
        assert r["ratio_to_full"] == pytest.approx(r["miou"] / ce[(r["seed"], r["readout"])],
                                                   abs=1e-4)
    md = (work / "res" / "accuracy_table.md").read_text()
    assert "| objects | points | SPML | knn |" in md and "0.937" in md and "Command:" in md

    # re-running reuses every run and score
    weights = work / "runs" / "objects-points-spml-s1" / "weights.pt"
    stamp = weights.stat().st_mtime_ns
    again = _run(work, "--iters", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert weights.stat().st_mtime_ns == stamp
    assert json.loads((work / "res" / "accuracy_table.json").read_text())["rows"] == rows
    assert "(earlier)" in (work / "res" / "accuracy_table.md").read_text()

    # another budget in the same work folder is refused, not mixed in
    other = _run(work, "--iters", "3")
    assert other.returncode != 0
    assert "made with other settings (iters 2 -> 3)" in other.stderr
