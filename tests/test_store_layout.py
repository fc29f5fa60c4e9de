"""The index folder's layout: SQLite keeps metadata only, the vectors live in the prototype index
file (label = the segment's class) and in pending batch files until merged; schema-1 folders
(vectors in SQLite) still answer queries and are migrated by ``index add``; killed builds
resume; ids with no vector anywhere are named, and repaired by ``index add``."""
from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from test_retrieval import index_vectors, small_run

from spml_deploy.data.synth import synthesize
from spml_deploy.serving import retrieval as R
from spml_deploy.serving import ingest as IN
from spml_deploy.serving import vectors as V
from spml_deploy.serving.store import STORE_SCHEMA_VERSION, SegmentStore, StoreError

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    synthesize(root / "data", n_train=9, n_val=0, size=64, seed=4)
    imgs = sorted((root / "data" / "images").glob("train_*.png"))
    src, more = root / "src", root / "more"
    src.mkdir()
    more.mkdir()
    for p in imgs[:6]:
        shutil.copy(p, src / p.name)
    for p in imgs[6:]:
        shutil.copy(p, more / p.name)
    run = small_run(root / "run")
    clean = root / "clean"
    IN.build_index(run, src, clean, batch=2, progress=False)
    return root, run, src, more, clean


def _columns(folder: Path, table: str) -> list[str]:
    with sqlite3.connect(folder / "segments.sqlite") as db:
        return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]


def _rows(folder: Path) -> list[tuple]:
    with sqlite3.connect(folder / "segments.sqlite") as db:
        return db.execute("SELECT s.id, i.path, s.segment_index, s.x, s.y, s.w, s.h, s.area, "
                          "s.class_id, s.mask_rle FROM segments s JOIN images i "
                          "ON i.id = s.image_id ORDER BY s.id").fetchall()


def _hits(folder: Path, image: Path) -> list[tuple]:
    with R.Retriever(folder) as r:
        hits, _ = r.query(image, point=(20, 30), k=8, exclude_self=False)
    return [(h.segment_id, round(h.score, 5), h.class_id) for h in hits]


def test_store_has_no_vector_column(setup):
    _, _, _, _, clean = setup
    assert "vector" not in _columns(clean, "segments")
    with SegmentStore(clean / "segments.sqlite") as st:
        assert st.meta()["schema_version"] == STORE_SCHEMA_VERSION == 2
        assert not st.has_vector_column
        n, labels = st.count(), st.class_ids(0, st.count())
    index = V.load_index_file(clean / V.INDEX_FILE)
    assert index.ntotal == n and np.array_equal(index.ids, np.arange(n))
    assert np.array_equal(index.labels, labels)              # the index label is the class
    assert np.allclose(np.linalg.norm(index.vectors(), axis=1), 1.0, atol=1e-4)
    assert V.pending_batches(clean) == []                    # merged, then deleted


def _make_schema1(clean: Path, old: Path, lag: int) -> None:
    """``clean`` written the way schema 1 did: every vector also in ``segments.vector``, index
    file without labels and (``lag``) missing the last segments (an interrupted add)."""
    shutil.copytree(clean, old)
    ids, vecs = index_vectors(V.load_index_file(clean / V.INDEX_FILE))
    with sqlite3.connect(old / "segments.sqlite") as db:
        db.execute("ALTER TABLE segments ADD COLUMN vector BLOB")
        db.executemany("UPDATE segments SET vector = ? WHERE id = ?",
                       [(v.astype("<f4").tobytes(), int(i)) for i, v in zip(ids, vecs)])
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(1),))
    keep = len(ids) - lag
    partial = V.new_index(vecs.shape[1], "flat")
    partial.add(vecs[:keep], ids[:keep])                     # labels -1, as schema 1 wrote
    partial.save(old / V.INDEX_FILE)


def test_schema1_folder_answers_the_same_and_is_migrated_by_add(setup, tmp_path, caplog):
    _, _, src, _, clean = setup
    old = tmp_path / "old"
    _make_schema1(clean, old, lag=5)
    query_image = sorted(src.glob("*.png"))[2]
    expected = _hits(clean, query_image)
    with caplog.at_level(logging.WARNING, logger="spml_deploy.serving.vectors"):
        assert _hits(old, query_image) == expected           # lag read from the column
    assert sum("old layout" in r.getMessage() for r in caplog.records) == 1
    assert "vector" in _columns(old, "segments")             # a reader does not migrate
    rep = IN.add_to_index(old, src, progress=False)           # nothing new: only the migration
    assert (rep.added_images, rep.skipped_images) == (0, 6)
    assert "vector" not in _columns(old, "segments")
    with SegmentStore(old / "segments.sqlite") as st:
        assert st.meta()["schema_version"] == 2 and not st.has_vector_column
        labels = st.class_ids(0, st.count())
    migrated = V.load_index_file(old / V.INDEX_FILE)
    assert np.array_equal(migrated.labels, labels)
    assert _hits(old, query_image) == expected
    assert _rows(old) == _rows(clean)


def test_killed_build_resumes_complete(setup, tmp_path, monkeypatch):
    """Killed after a batch's pending file was written but before its commit, and before the
    final index write: nothing committed is lost, the orphan batch is dropped, and 'index add'
    finishes the same index as an uninterrupted build."""
    _, run, src, _, clean = setup
    d = tmp_path / "killed"
    original = V.write_pending
    calls = []

    def write_then_die(*a, **k):
        path = original(*a, **k)
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed before the commit")
        return path

    def killed(*a, **k):
        raise KeyboardInterrupt("killed before the index write")

    monkeypatch.setattr(V, "write_pending", write_then_die)
    monkeypatch.setattr(IN, "sync_index", killed)
    with pytest.raises(KeyboardInterrupt):
        IN.build_index(run, src, d, batch=2, progress=False)
    monkeypatch.undo()
    assert not (d / V.INDEX_FILE).exists() and len(V.pending_batches(d)) == 3
    with SegmentStore(d / "segments.sqlite") as st:
        committed = st.count()
        assert st.num_images() == 4
    assert V.pending_batches(d)[-1][0] == committed          # the orphan: never committed
    rep = IN.add_to_index(d, src, progress=False)
    assert (rep.added_images, rep.skipped_images) == (2, 4)
    assert V.pending_batches(d) == []
    assert _rows(d) == _rows(clean)
    got, want = V.load_index_file(d / V.INDEX_FILE), V.load_index_file(clean / V.INDEX_FILE)
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.labels, want.labels)
    np.testing.assert_allclose(index_vectors(got)[1], index_vectors(want)[1], atol=1e-6)


def test_reader_completes_from_pending_without_writing_while_an_add_runs(setup, tmp_path,
                                                                         monkeypatch):
    _, _, _, more, clean = setup
    d = tmp_path / "idx"
    shutil.copytree(clean, d)
    n0 = V.load_index_file(d / V.INDEX_FILE).ntotal
    monkeypatch.setattr(IN, "sync_index", lambda *a, **k: None)     # the add stops before merging
    IN.add_to_index(d, more, progress=False)
    monkeypatch.undo()
    assert V.pending_batches(d)
    with V.exclusive(d):                                     # an 'index add' is running
        with R.Retriever(d) as r:
            n = r.store.count()
            assert n > n0 and len(r) == n and np.array_equal(r.index.ids, np.arange(n))
        assert V.load_index_file(d / V.INDEX_FILE).ntotal == n0     # nothing written
        assert V.pending_batches(d)


def test_segments_without_vectors_are_named_and_resegmented_by_add(setup, tmp_path, monkeypatch):
    _, _, _, more, clean = setup
    d = tmp_path / "idx"
    shutil.copytree(clean, d)
    monkeypatch.setattr(IN, "sync_index", lambda *a, **k: None)
    IN.add_to_index(d, more, progress=False)
    monkeypatch.undo()
    with SegmentStore(d / "segments.sqlite") as st:
        n = st.count()
    shutil.rmtree(d / V.PENDING_DIR)                         # the new batches' vectors: lost
    with pytest.raises(StoreError, match="have no vector") as exc:
        R.Retriever(d)
    assert "index add" in exc.value.fix
    rep = IN.add_to_index(d, more, progress=False)            # segments them again
    assert (rep.added_images, rep.total_segments) == (3, n)
    with R.Retriever(d) as r:
        assert len(r) == n and np.array_equal(r.index.ids, np.arange(n))


def test_sharded_index_killed_mid_save_is_rebuilt_from_its_shards(setup, tmp_path, monkeypatch):
    """A sharded save writes the shard files, then the file naming them: killed in between, the
    index does not load, and is rebuilt from its shard files and the pending batches."""
    _, run, src, more, _ = setup
    d = tmp_path / "sharded"
    IN.build_index(run, src, d, batch=3, progress=False, index_options={"shards": 2})
    monkeypatch.setattr(IN, "sync_index", lambda *a, **k: None)
    IN.add_to_index(d, more, progress=False)
    monkeypatch.undo()
    with SegmentStore(d / "segments.sqlite") as st:
        n = st.count()
        complete = V.sync_index(d, st, save=False)
    complete.shards[0].save(complete.shard_path(d / V.INDEX_FILE, 0, 2))   # then killed
    with pytest.raises(Exception, match="shard 0 holds"):
        V.load_index_file(d / V.INDEX_FILE)
    with R.Retriever(d) as r:
        assert len(r) == n and np.array_equal(r.index.ids, np.arange(n))
        np.testing.assert_allclose(index_vectors(r.index)[1], index_vectors(complete)[1],
                                   atol=1e-6)
    assert V.load_index_file(d / V.INDEX_FILE).ntotal == n and V.pending_batches(d) == []
