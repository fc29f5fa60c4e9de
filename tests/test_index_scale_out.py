"""Scale-out indexes: index build with --shards and with --ray give the same store and hits as
the single-process, single-index build (flat, small scale; a local Ray instance of 2 CPUs), and
the FAISS index is filled from the store in bounded chunks after one training on a sample."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from spml_deploy.cli import main
from spml_deploy.engine.index import ShardedIndex, load_index
from spml_deploy.serving import retrieval as R
from spml_deploy.serving import ingest as IN
from spml_deploy.serving.store import SegmentStore
from spml_deploy.serving import vectors as V
from spml_deploy.data.synth import synthesize
from test_retrieval import small_run

pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install 'spml-deploy[index]')")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_index")
    synthesize(root / "data", n_train=8, n_val=2, size=64, seed=5)
    src = root / "src"
    src.mkdir()
    for p in sorted((root / "data" / "images").glob("train_*.png")):
        shutil.copy(p, src / p.name)
    (src / "broken.png").write_text("not an image")
    run = small_run(root / "run")
    return root, run, src


def _build(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:   # exit 1: the broken image is listed
        main(["index", "build", *args, "--quiet"])
    return exc.value.code


def _segments(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / "segments.sqlite") as db:
        images = dict(db.execute("select id, rel from images"))
        rows = db.execute("select image_id, segment_index, x, y, w, h, area, class_id, mask_rle "
                          "from segments order by id").fetchall()
    return [(images[r[0]], *r[1:]) for r in rows]


def _hits(index_dir: Path, run: Path, src: Path) -> list[list[tuple]]:
    retriever = R.Retriever(index_dir, run)
    try:
        out = []
        for name in ("train_00001.png", "train_00004.png"):
            hits, _ = retriever.query(src / name, point=(20, 30), k=12, exclude_self=False)
            out.append([(h.image_rel, h.segment_id, h.score) for h in hits])
        return out
    finally:
        retriever.close()


def test_shards_and_ray_give_the_single_process_index(setup):
    root, run, src = setup
    one, sharded = root / "one", root / "sharded"
    assert _build([str(run), str(src), "--out", str(one)]) == 1
    assert _build([str(run), str(src), "--out", str(sharded), "--shards", "3"]) == 1
    index = load_index(sharded / "prototypes.npz")
    assert isinstance(index, ShardedIndex) and index.num_shards == 3
    assert all(s.ntotal for s in index.shards)
    assert _segments(sharded) == _segments(one)
    for a, b in zip(_hits(sharded, run, src), _hits(one, run, src)):
        assert [x[:2] for x in a] == [x[:2] for x in b]
        np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], atol=1e-6)

    ray = pytest.importorskip("ray", reason="ray not installed (pip install 'spml-deploy[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
    try:
        on_ray = root / "ray"
        assert _build([str(run), str(src), "--out", str(on_ray), "--ray", "--ray-workers", "2",
                       "--batch", "3", "--shards", "2"]) == 1
        # the same segments (order of images aside) and the same hits
        assert sorted(_segments(on_ray)) == sorted(_segments(one))
        with sqlite3.connect(on_ray / "segments.sqlite") as db:
            assert db.execute("select count(*) from images").fetchone()[0] == 8
        ours, theirs = _hits(on_ray, run, src), _hits(one, run, src)
        for a, b in zip(ours, theirs):   # ids differ with the order of images: compare the rest
            assert [x[0] for x in a] == [x[0] for x in b]
            np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], atol=1e-5)
        assert (on_ray / "failed.txt").read_text().count("broken.png") == 1
        # index add --ray: nothing new to add, the broken image reported again
        with pytest.raises(SystemExit) as exc:
            main(["index", "add", str(on_ray), str(src), "--ray", "--quiet"])
        assert exc.value.code == 1
        with sqlite3.connect(on_ray / "segments.sqlite") as db:
            assert db.execute("select count(*) from images").fetchone()[0] == 8
    finally:
        ray.shutdown()


def test_index_filled_in_chunks_and_trained_on_a_sample(setup, monkeypatch):
    """The index is filled a chunk at a time (vectors with their labels), and a new ivf index
    is trained once on an even sample, with nlist following the whole collection."""
    root, run, src = setup
    one = root / "one"
    if not (one / "segments.sqlite").exists():
        IN.build_index(run, src, one, progress=False)
    store = SegmentStore(one / "segments.sqlite")
    try:
        n, dim = store.count(), int(store.meta()["embed_dim"])
        built = load_index(one / "prototypes.npz")
        ids, vecs = built.ids, built.vectors()
        labels = store.class_ids(0, n)
        np.testing.assert_array_equal(ids, np.arange(n))
        np.testing.assert_array_equal(built.labels, labels)        # label = the segment's class
        reads = []

        def read(a, b):
            reads.append((a, b))
            return vecs[a:b], labels[a:b]

        monkeypatch.setattr(V, "FILL_CHUNK", 100)
        monkeypatch.setattr(V, "TRAIN_SAMPLE", 300)
        flat = V.new_index(dim, "flat")
        V.fill_index(flat, read, 0, n)
        assert max(b - a for a, b in reads) == 100
        np.testing.assert_array_equal(flat.ids, ids)
        np.testing.assert_array_equal(flat.labels, labels)
        q = vecs[::50]
        truth = V.new_index(dim, "flat")
        truth.add(vecs, ids)
        for a, b in zip(flat.search(q, 5), truth.search(q, 5)):
            np.testing.assert_array_equal(a, b)
        trained = []
        ivf = V.new_index(dim, "ivf", {"shards": 2})
        original = ShardedIndex.train
        monkeypatch.setattr(ShardedIndex, "train", lambda self, v, n_total=None: (
            trained.append((len(v), n_total)), original(self, v, n_total))[1])
        V.fill_index(ivf, read, 0, n)
        assert trained == [(len(vecs[::-(-n // 300)]), n)]     # one training, on the sample
        assert ivf.ntotal == n and np.array_equal(ivf.ids, ids)
        nlist = ivf.shards[0].params["nlist"]
        assert nlist == min(int(4 * np.sqrt(n)), trained[0][0] // 39)
    finally:
        store.close()
