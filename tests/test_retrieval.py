"""Segment retrieval: store, index build/add/query, consistency after interruptions, quality.

Fast tests use an untrained tiny run deployed at 64 px (``max_side`` 64, so the network is
cheap) and an "oracle" backend whose embeddings are noisy class codes of the ground truth, so
that the retrieval quality test exercises the real segmentation/index/query code in seconds.
A committed trained tiny model (tests/assets/retrieval_tiny) checks issue 6's precision target;
the slow test trains one for real.
"""
from __future__ import annotations

import os

import dataclasses
import json
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runs import make_run

from spml_deploy.artifacts import read_manifest, write_manifest
from spml_deploy.engine.backends import load_backend
from spml_deploy.engine.forward import Engine
from spml_deploy.data.imageio import read_image, read_label_png
from spml_deploy.engine.preprocess import preprocess
from spml_deploy.serving import retrieval as R
from spml_deploy.errors import SpmlError
from spml_deploy.serving import ingest as IN
from spml_deploy.serving import segments as SG
from spml_deploy.serving import vectors as V
from spml_deploy.serving.store import (ImageRecord, SegmentStore, StoreError, rle_decode,
                                       rle_encode)
from spml_deploy.data.synth import SCENE_CLASSES, synthesize

pytest.importorskip("faiss")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors on a shared 2-core machine: one intra-op thread is many times faster than
    two contending ones (measured 50 ms vs 1.9 s per query under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_run(folder: Path, num_classes: int = 9, max_side: int = 64, seed: int = 0) -> Path:
    """An untrained tiny run whose test-time preprocessing resizes to ``max_side``."""
    make_run(folder, num_classes=num_classes, seed=seed)
    m = read_manifest(folder)
    m.preprocess = dataclasses.replace(m.preprocess, max_side=max_side)
    m.classes = list(SCENE_CLASSES[:num_classes]) if num_classes <= len(SCENE_CLASSES) else m.classes
    write_manifest(folder, m)
    return folder


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    synthesize(root / "data", n_train=24, n_val=6, size=64, seed=3)
    return root / "data"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return small_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def index6(tmp_path_factory, run, scenes) -> Path:
    """A flat index over 6 training images (built once, copied by tests that change it)."""
    src = tmp_path_factory.mktemp("src6")
    for p in sorted((scenes / "images").glob("train_*.png"))[:6]:
        shutil.copy(p, src / p.name)
    out = tmp_path_factory.mktemp("idx") / "index"
    IN.build_index(run, src, out, progress=False)
    return out


# ------------------------------------------------------------------------------------------
# small pieces, hand-computed


def test_rle_hand_example_and_roundtrip():
    m = np.array([[0, 1, 1], [1, 0, 0]], bool)
    assert np.frombuffer(rle_encode(m), "<u4").tolist() == [1, 3, 2]
    m2 = np.array([[1, 1], [0, 1]], bool)          # starts inside: a leading 0-length run
    assert np.frombuffer(rle_encode(m2), "<u4").tolist() == [0, 2, 1, 1]
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (64, 3), (13, 40)]:
        for p in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < p
            assert np.array_equal(rle_decode(rle_encode(mask), shape), mask)
    with pytest.raises(StoreError, match="covers"):
        rle_decode(rle_encode(m), (3, 3))


def test_pixel_to_cell_hand_example():
    # 10 original pixels resized to 20: centres 1, 3, ..., 19 -> cells floor(c / 4)
    assert SG.pixel_to_cell(10, 20, 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # downscale 12 -> 6 (cells of 4 resized px = 8 original px); clipped to the 2 valid cells
    assert SG.pixel_to_cell(12, 6, 2).tolist() == [0] * 8 + [1] * 4


# ------------------------------------------------------------------------------------------
# segments against a slow per-segment reference


def _embed(be, pp, images, flip=False):
    """(phi, logits, valid, preps) of the engine's forward pass, as retrieval runs it."""
    fw = Engine(be, pp).run(list(images), flip=flip)
    return fw.phi, fw.logits, fw.valid, fw.prepped


def test_segments_match_slow_reference(run, scenes):
    be = load_backend(run)
    pp = be.manifest.preprocess
    images = [read_image(scenes / "images" / "val_00000.png"),
              read_image(scenes / "images" / "val_00001.png")[:50, :37]]   # non-square: padding
    segs = SG.segment_images(be, pp, images, (12, 12), 10, be.num_classes)
    phi, logits, valid, preps = _embed(be, pp, images)
    for i, (seg, img) in enumerate(zip(segs, images)):
        H, W = img.shape[:2]
        assert (seg.width, seg.height) == (W, H)
        full = seg.segment_map()
        assert (full >= 0).all(), "every original pixel belongs to an indexed segment"
        hv, wv = seg.cells.shape
        rh, rw = preps[i].resized_hw
        assert (hv, wv) == (-(-rh // 4), -(-rw // 4))
        pred = logits[i].argmax(0)
        for s in range(seg.num_segments):
            m = full == s
            ys, xs = np.nonzero(m)
            assert seg.areas[s] == m.sum() > 0
            assert seg.boxes[s].tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                             ys.max() - ys.min() + 1]
            x, y, w, h = seg.boxes[s]
            assert np.array_equal(rle_decode(seg.masks[s], (h, w)), m[y:y + h, x:x + w])
            cells = np.argwhere(seg.cells == s)
            vec = F.normalize(sum(phi[i, :, r, c] for r, c in cells), dim=0)
            assert np.allclose(seg.vectors[s], vec.numpy(), atol=1e-5)
            votes = np.bincount([int(pred[r, c]) for r, c in cells], minlength=be.num_classes)
            assert seg.class_ids[s] == votes.argmax()
        # cells of a segment that covers no original pixel are -1; all others are used
        assert set(np.unique(seg.cells[seg.cells >= 0])) == set(range(seg.num_segments))


# ------------------------------------------------------------------------------------------
# FAISS index against brute force


def index_vectors(index) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N], vectors [N, D]) held by ``index``, by increasing id (the store keeps none)."""
    ids = np.asarray(index.ids)
    order = np.argsort(ids, kind="stable")
    return ids[order], index.vectors()[order]


def _exact_topk(vectors: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = (q.astype(np.float64) @ vectors.astype(np.float64).T)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def _queries(vecs: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = vecs[rng.choice(len(vecs), n, replace=False)] + noise * rng.standard_normal((n, vecs.shape[1]))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_flip_averaging_is_the_two_pass_mean_mapped_back(run, scenes):
    """flip=True: phi = normalise(phi(x) + mirror(phi(mirror x))), logits the mean of the two;
    so the mirror image's flip-averaged embeddings are exactly the mirrored ones of the image
    (64 px scenes at max_side 64: no resize, no padding)."""
    be = load_backend(run)
    pp = be.manifest.preprocess
    img = read_image(scenes / "images" / "val_00000.png")
    mirror = np.ascontiguousarray(img[:, ::-1])
    phi, logits, _, _ = _embed(be, pp, [img], flip=True)
    p1, l1, _, _ = _embed(be, pp, [img])
    p2, l2, _, _ = _embed(be, pp, [mirror])
    assert torch.allclose(phi, F.normalize(p1 + p2.flip(-1), dim=1), atol=1e-6)
    assert torch.allclose(logits, (l1 + l2.flip(-1)) / 2, atol=1e-5)
    assert not torch.allclose(phi, p1, atol=1e-2), "the mirrored pass must change the embedding"
    phi_m, logits_m, _, _ = _embed(be, pp, [mirror], flip=True)
    assert torch.allclose(phi_m, phi.flip(-1), atol=1e-6)
    assert torch.allclose(logits_m, logits.flip(-1), atol=1e-5)


def test_index_keeps_its_flip_setting(run, scenes, tmp_path):
    """'index build --no-flip' through the CLI: stored in the index, used by every query (the
    indexed segment under a point comes back first with cosine 1 only when the query embeds the
    image the same way); indexes from before the option read as no flip."""
    from click.testing import CliRunner

    from spml_deploy.cli import cli

    src = tmp_path / "src"
    src.mkdir()
    img_path = src / "a.png"
    shutil.copy(scenes / "images" / "train_00001.png", img_path)
    res = CliRunner().invoke(cli, ["index", "build", str(run), str(src), "--out",
                                   str(tmp_path / "idx"), "--no-flip", "--quiet"])
    assert res.exit_code == 0, res.output
    with R.Retriever(tmp_path / "idx") as r:
        assert r.flip is False and r.info()["flip"] is False
        seg = r.segment(read_image(img_path))
        y, x = np.argwhere(seg.segment_map() == int(np.argmax(seg.areas)))[0]
        flipped = SG.segment_images(r.backend, r.manifest.preprocess, [read_image(img_path)],
                                   r.grid, r.iters, len(r.classes), flip=True)[0]
    res = CliRunner().invoke(cli, ["query", str(tmp_path / "idx"), str(img_path), "--point",
                                   f"{x},{y}", "-k", "1", "--json", "--include-self"])
    assert res.exit_code == 0, res.output
    assert res.output.count('"score"') == 1
    top = json.loads(res.output)["hits"][0]
    assert top["score"] == pytest.approx(1.0, abs=1e-5)
    q = flipped.vectors[flipped.cells[flipped.row_cell[y], flipped.col_cell[x]]]
    with R.Retriever(tmp_path / "idx") as r:
        assert r.search(q, 1)[0].score < 0.9999, "a flip-averaged query is another vector"
        r.store.set_meta({"flip": True})                 # the query follows the stored setting
    with R.Retriever(tmp_path / "idx") as r:
        hits, _ = r.query(img_path, point=(x, y), k=1, exclude_self=False)
        assert r.flip is True and hits[0].score == pytest.approx(r.search(q, 1)[0].score)
    con = sqlite3.connect(tmp_path / "idx" / "segments.sqlite")
    con.execute("DELETE FROM meta WHERE key = 'flip'")    # an index from before the option
    con.commit()
    con.close()
    with R.Retriever(tmp_path / "idx") as r:
        hits, _ = r.query(img_path, point=(x, y), k=1, exclude_self=False)
        assert r.flip is False and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_flat_index_equals_brute_force(index6):
    """The FAISS flat index of a built collection against two brute-force oracles: float64
    numpy and the project's ExactIndex (torch)."""
    from spml_deploy.engine.index import ExactIndex

    with SegmentStore(index6 / "segments.sqlite") as st:
        index = IN.sync_index(index6, st, save=False)
    ids, vecs = index_vectors(index)
    assert np.array_equal(ids, np.arange(len(ids))) and index.ntotal == len(ids)
    q = _queries(vecs, 40, 0.05, 1)
    scores, got = index.search(q, 10)
    ref_s, ref_i = _exact_topk(vecs, q, 10)
    assert np.allclose(scores, ref_s, atol=1e-5)
    # ids equal except where two candidates tie to within float32 rounding
    assert (got == ref_i).mean() > 0.99
    assert np.allclose(np.take_along_axis(q @ vecs.T, got, 1), ref_s, atol=1e-5)
    exact = ExactIndex(vecs.shape[1])
    exact.add(vecs, ids)
    ex_s, ex_i = exact.search(q, 10)
    assert np.allclose(scores, ex_s, atol=1e-5) and (got == ex_i).mean() > 0.99


def test_gpu_index_matches_cpu(index6, tmp_path):
    """Where faiss-gpu sees a GPU, the index runs there (chosen automatically) with the CPU's
    results."""
    from spml_deploy.engine.index import gpu_available

    if not gpu_available():
        pytest.skip("faiss-gpu with a visible GPU is not installed here")
    with SegmentStore(index6 / "segments.sqlite") as st:
        gpu = IN.sync_index(index6, st, save=False)
    ids, vecs = index_vectors(gpu)
    assert gpu.on_gpu
    cpu = V._index_api().PrototypeIndex(vecs.shape[1], "flat", use_gpu=False)
    cpu.add(vecs, ids)
    q = _queries(vecs, 40, 0.05, 3)
    (gs, gi), (cs, ci) = gpu.search(q, 10), cpu.search(q, 10)
    assert np.allclose(gs, cs, atol=1e-4) and (gi == ci).mean() > 0.99


@pytest.mark.parametrize("index_type,options,min_recall", [
    ("ivf", {}, 0.9), ("hnsw", {}, 0.95), ("ivfpq", {"rerank": 8}, 0.8)])
def test_approximate_index_recall(index6, tmp_path, index_type, options, min_recall):
    """Build the index of another type from the flat index's vectors (as ``sync_index`` fills
    one, trained on them); recall@10 vs exact."""
    with SegmentStore(index6 / "segments.sqlite") as st:
        ids, vecs = index_vectors(IN.sync_index(index6, st, save=False))
        labels = st.class_ids(0, len(ids))
    index = V.new_index(vecs.shape[1], index_type, options)
    V.fill_index(index, lambda a, b: (vecs[a:b], labels[a:b]), 0, len(ids))
    index.save(tmp_path / "approx.npz")
    index = V.load_index_file(tmp_path / "approx.npz")
    assert index.ntotal == len(ids) and np.array_equal(index.labels[np.argsort(index.ids)], labels)
    q = _queries(vecs, 60, 0.1, 2)
    _, got = index.search(q, 10)
    _, ref = _exact_topk(vecs, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), ref.tolist())])
    assert recall >= min_recall, f"{index_type} recall@10 {recall:.3f}"


# ------------------------------------------------------------------------------------------
# store / index consistency


def test_interrupted_add_is_completed_on_open(index6, scenes, tmp_path, monkeypatch):
    d = tmp_path / "idx"
    shutil.copytree(index6, d)
    more = tmp_path / "more"
    more.mkdir()
    for p in sorted((scenes / "images").glob("train_*.png"))[6:9]:
        shutil.copy(p, more / p.name)
    n0 = V.load_index_file(d / V.INDEX_FILE).ntotal

    def crash(*a, **k):       # killed after the store commit, before the index write
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(IN, "sync_index", crash)
    with pytest.raises(KeyboardInterrupt):
        IN.add_to_index(d, more, progress=False)
    monkeypatch.undo()
    with SegmentStore(d / "segments.sqlite") as st:
        n = st.count()
        assert st.num_images() == 9
    assert n > n0 == V.load_index_file(d / V.INDEX_FILE).ntotal       # the index lags the store
    with R.Retriever(d) as r:                                       # open -> completed
        assert len(r) == n
        assert np.array_equal(r.index.ids, np.arange(n))
        ids, vecs = index_vectors(r.index)
        _, top = r.index.search(vecs, 1)
        assert np.array_equal(top[:, 0], ids) or np.mean(top[:, 0] == ids) > 0.99
    assert V.load_index_file(d / V.INDEX_FILE).ntotal == n             # and written back
    assert V.pending_batches(d) == []                                # merged pending files gone
    rep = IN.add_to_index(d, more, progress=False)                   # rerun: nothing twice
    assert (rep.added_images, rep.skipped_images, rep.total_segments) == (0, 3, n)


def test_failed_transaction_leaves_store_unchanged(index6, tmp_path):
    d = tmp_path / "idx"
    shutil.copytree(index6, d)
    with SegmentStore(d / "segments.sqlite") as st:
        n, n_img = st.count(), st.num_images()
        good = ImageRecord("/x/a.png", "a.png", 8, 8, np.array([[0, 0, 8, 8]]), np.array([64]),
                           np.array([1]), [rle_encode(np.ones((8, 8), bool))],
                           np.eye(1, 32, dtype=np.float32))
        bad = dataclasses.replace(good, path="/x/b.png", masks=[])   # fails mid-transaction
        with pytest.raises(IndexError):
            st.add_images([good, bad])
        assert (st.count(), st.num_images()) == (n, n_img)
        assert "/x/a.png" not in st.image_paths()


def test_index_file_ahead_of_store_is_rebuilt(index6, tmp_path):
    """An index file with ids the store lacks (never written by this code: a file copied by
    hand) is rebuilt from its vectors of the store's ids instead of returning orphan ids."""
    d = tmp_path / "idx"
    shutil.copytree(index6, d)
    with SegmentStore(d / "segments.sqlite") as st:
        n = st.count()
        ids, vecs = index_vectors(V.load_index_file(d / V.INDEX_FILE))
        bigger = V.new_index(vecs.shape[1], "flat")
        bigger.add(np.concatenate([vecs, vecs[:5]]), np.arange(n + 5))
        bigger.save(d / V.INDEX_FILE)
        index = IN.sync_index(d, st)
    assert index.ntotal == n and np.array_equal(index.ids, np.arange(n))
    assert np.array_equal(index_vectors(index)[1], vecs)


def test_model_mismatch_is_refused(index6, tmp_path):
    other = small_run(tmp_path / "other", seed=5)
    with pytest.raises(StoreError, match="not the one this index was built with"):
        R.Retriever(index6, other)
    same_weights_larger_input = small_run(tmp_path / "at96", max_side=96)   # e.g. a bundle
    with pytest.raises(StoreError, match="resizes images to 96 px but this index was built at 64"):
        R.Retriever(index6, same_weights_larger_input)
    with pytest.raises(StoreError, match="resizes images to 96"):
        IN.add_to_index(index6, tmp_path, model_path=same_weights_larger_input, progress=False)


def test_build_refuses_existing_index_and_reports_bad_images(run, index6, tmp_path, scenes):
    with pytest.raises(SpmlError, match="already holds an index"):
        IN.build_index(run, scenes / "images", index6, progress=False)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(scenes / "images" / "val_00000.png", src / "ok.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rep = IN.build_index(run, src, tmp_path / "idx", progress=False)
    assert rep.added_images == 1 and [Path(p).name for p, _ in rep.failed] == ["broken.png"]
    assert "broken.png" in (tmp_path / "idx" / IN.FAILED_FILE).read_text()


# ------------------------------------------------------------------------------------------
# queries


def test_query_point_box_mask(index6, scenes, tmp_path):
    img_path = sorted((scenes / "images").glob("train_*.png"))[2]      # an indexed image
    image = read_image(img_path)
    with R.Retriever(index6) as r:
        seg = r.segment(image)
        s = int(np.argmax(seg.areas))
        x, y, w, h = seg.boxes[s]
        full = seg.segment_map()
        py, px = np.argwhere(full == s)[0]
        hits, desc = r.query(img_path, point=f"{px},{py}", k=5, exclude_self=False)
        assert desc["segment"] == s and desc["in_index"] is True and desc["excluded_images"] == 0
        # the same segment of the same image is stored: it comes first with cosine 1
        assert Path(hits[0].image).name == img_path.name and hits[0].score == pytest.approx(1, abs=1e-5)
        assert hits[0].box == tuple(int(v) for v in seg.boxes[s])
        assert hits[0].row.full_mask().sum() == seg.areas[s]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))

        # box / mask: normalised pixel-weighted pooling, slow reference per pixel
        def slow(mask):
            acc = torch.zeros(seg.phi.shape[0], dtype=torch.float64)
            for yy, xx in np.argwhere(mask):
                acc += seg.phi[:, seg.row_cell[yy], seg.col_cell[xx]].double()
            return F.normalize(acc, dim=0).float().numpy()

        box = (3, 5, 20, 11)
        bm = np.zeros(full.shape, bool)
        bm[5:16, 3:23] = True
        vb, _ = SG.query_vector(seg, box=box)
        assert np.allclose(vb, slow(bm), atol=1e-5)
        vm, _ = SG.query_vector(seg, mask=full == s)
        assert np.allclose(vm, slow(full == s), atol=1e-5)
        assert np.allclose(vm, seg.vectors[s], atol=1e-5)   # a whole segment: its prototype
        vbm, _ = SG.query_vector(seg, mask=bm)
        assert np.allclose(vbm, vb, atol=1e-6)

        # mask file (white on black) through the query API
        from PIL import Image
        Image.fromarray((full == s).astype(np.uint8) * 255).save(tmp_path / "m.png")
        hm, _ = r.query(image, mask=tmp_path / "m.png", k=3, exclude_self=False)
        assert hm[0].segment_id == hits[0].segment_id

        # class filter: the filtered exact ranking
        ids, vecs = index_vectors(r.index)
        cls = np.array([row.class_id for row in r.store.segments(ids)])
        target = int(np.bincount(cls).argmax())
        hc, _ = r.query(image, point=(px, py), k=7, class_name=r.classes[target],
                        exclude_self=False)
        assert len(hc) == 7 and all(h.class_id == target for h in hc)
        sims = vecs[cls == target] @ seg.vectors[s]
        ref = np.sort(sims)[::-1][:7]
        assert np.allclose([h.score for h in hc], ref, atol=1e-5)

        # malformed queries -> QueryError naming the problem
        H, W = image.shape[:2]
        for kwargs, msg in [({"point": (W, 0)}, "outside"), ({"point": (-1, 3)}, "outside"),
                            ({"point": "3"}, "2 finite numbers"), ({"box": (W - 5, 0, 10, 10)}, "inside"),
                            ({"box": (0, 0, 0, 4)}, "empty"),
                            ({"mask": np.zeros((H, W), bool)}, "empty"),
                            ({"mask": np.ones((H + 1, W), bool)}, "size"),
                            ({"point": (1, 1), "box": (0, 0, 2, 2)}, "exactly one"), ({}, "exactly one")]:
            with pytest.raises(SG.QueryError, match=msg):
                r.query(image, **kwargs)
        with pytest.raises(SG.QueryError, match="unknown class"):
            r.query(image, point=(1, 1), class_name="unicorn")


def test_render_hits(index6, scenes, tmp_path):
    img = scenes / "images" / "val_00002.png"
    hits = R.query(index6, None, img, point=(30, 30), k=4)
    out = R.render_hits(hits, tmp_path / "grid.png", tile=96, cols=2,
                        query_image=read_image(img), query_mask=np.ones((64, 64), bool))
    grid = read_image(out)
    assert grid.shape == (3 * 96, 2 * 96, 3)        # query + 4 hits in 2 columns
    # a hit tile shows its segment tinted green: greener than the same crop untinted
    h = hits[0]
    image = read_image(h.image)
    plain = R._tile(image, np.zeros(image.shape[:2], bool), h.box, "", 96, (80, 255, 80))
    tile = grid[0:96, 96:192].astype(int)
    plain = plain.astype(int)
    assert (tile[..., 1] - tile[..., 0]).mean() > (plain[..., 1] - plain[..., 0]).mean() + 5


# ------------------------------------------------------------------------------------------
# retrieval quality with an oracle embedding


class OracleBackend:
    """Embeddings = noisy one-hot codes of the ground-truth class (from the GT masks); logits =
    5 x the one-hot class. Recognises its images (and their mirror images) by their
    preprocessed bytes."""

    name = "oracle"

    def __init__(self, run: Path, dataset: Path, noise: float = 0.1, seed: int = 0):
        self.manifest = read_manifest(run)
        self.device = torch.device("cpu")
        self.embed_dim = self.manifest.model.embed_dim
        self.num_classes = self.manifest.num_classes
        self.noise = noise
        self.gen = torch.Generator().manual_seed(seed)
        self.masks: dict[bytes, np.ndarray] = {}
        pp = self.manifest.preprocess
        for img_path in sorted((dataset / "images").glob("*.png")):
            x, prep = preprocess(read_image(img_path), pp)
            mask = read_label_png(dataset / "masks" / img_path.name)
            import cv2
            rh, rw = prep.resized_hw
            m = cv2.resize(mask, (rw, rh), interpolation=cv2.INTER_NEAREST)
            canvas = np.zeros(prep.padded_hw, np.int64)
            canvas[:rh, :rw] = m
            self.masks[x.tobytes()] = canvas[2::4, 2::4]
            # the mirrored canvas too (flip-averaged embeddings run it)
            mirrored = np.ascontiguousarray(canvas[:, ::-1][2::4, 2::4])
            self.masks[np.ascontiguousarray(x[:, :, ::-1]).tobytes()] = mirrored

    def __call__(self, x: torch.Tensor):
        labels = torch.stack([torch.from_numpy(self.masks[x[i].numpy().tobytes()])
                              for i in range(x.shape[0])])                       # [B, h, w]
        onehot = F.one_hot(labels, self.embed_dim).permute(0, 3, 1, 2).float()
        noise = torch.randn(onehot.shape, generator=self.gen) * self.noise
        phi = F.normalize(onehot + noise, dim=1)
        logits = 5.0 * F.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float()
        return phi, logits

    def close(self) -> None:
        pass


def precision_at_k(retriever, dataset: Path, k: int = 10) -> tuple[float, int]:
    """Mean over val objects (a point deep inside each connected object region) of the fraction
    of the k hits whose ground-truth class (majority of the GT mask under the hit) matches."""
    from spml_deploy.serving.retrieval_quality import point_query_precision

    report = point_query_precision(retriever, dataset, k)
    assert report.confusion.sum() == report.queries * k        # every query got k hits
    return report.precision, report.queries


def test_query_points_lie_deep_inside_each_object():
    from spml_deploy.serving.retrieval_quality import query_points

    mask = np.zeros((40, 60), np.uint8)
    mask[5:25, 5:15] = 3           # two regions of class 3
    mask[10:30, 40:58] = 3
    mask[32:36, 20:24] = 5         # 16 pixels: under min_area, no query
    pts = sorted(query_points(mask, min_area=30))
    assert [c for _, _, c in pts] == [3, 3]
    (x0, y0, _), (x1, y1, _) = pts
    assert x0 in (9, 10) and 9 <= y0 <= 20         # >= 4 px from every edge of the 10 x 20 box
    assert x1 in (48, 49) and 14 <= y1 <= 25       # ... and of the 18 x 20 box
    assert query_points(np.zeros((8, 8), np.uint8)) == []


def test_oracle_retrieval_precision(run, scenes, tmp_path):
    oracle = OracleBackend(run, scenes)
    train = tmp_path / "train"
    train.mkdir()
    for p in sorted((scenes / "images").glob("train_*.png")):
        shutil.copy(p, train / p.name)
    IN.build_index(run, train, tmp_path / "idx", backend=oracle, progress=False)
    with R.Retriever(tmp_path / "idx", backend_obj=oracle) as r:
        p10, n = precision_at_k(r, scenes, 10)
    print(f"oracle embedding: precision@10 {p10:.3f} over {n} queries")
    assert n >= 15
    assert p10 >= 0.8, f"precision@10 {p10:.3f} over {n} queries"


def test_random_embedding_precision_is_low(run, scenes, tmp_path):
    """The quality measure can fail: pure-noise embeddings give chance-level precision."""
    oracle = OracleBackend(run, scenes, noise=1e3, seed=1)
    train = tmp_path / "train"
    train.mkdir()
    for p in sorted((scenes / "images").glob("train_*.png"))[:12]:
        shutil.copy(p, train / p.name)
    IN.build_index(run, train, tmp_path / "idx", backend=oracle, progress=False)
    with R.Retriever(tmp_path / "idx", backend_obj=oracle) as r:
        p10, _ = precision_at_k(r, scenes, 10)
    print(f"noise embedding: precision@10 {p10:.3f}")
    assert p10 < 0.5


# ------------------------------------------------------------------------------------------
# issue 6's target with a trained tiny model (committed: training it takes two hours here)

TRAINED_MODEL = Path(__file__).parent / "assets" / "retrieval_tiny"


def test_trained_model_reaches_the_precision_target(tmp_path):
    """A tiny model trained on the built-in scenes (the bundle in tests/assets/retrieval_tiny;
    how it was made: its README.md), the first 256 training scenes of seed 0 indexed with the
    defaults (flat index, flip averaging), a point deep inside every val object: precision@10
    >= 0.8. The scenes are regenerated here: same seed, the same files the model was trained
    and measured on (benchmarks/results/retrieval_quality.md)."""
    from spml_deploy.serving.retrieval_quality import point_query_precision

    synthesize(tmp_path / "data", n_train=256, n_val=64, size=128, seed=0)
    IN.build_index(TRAINED_MODEL, str(tmp_path / "data" / "images" / "train_*.png"),
                  tmp_path / "idx", progress=False)
    with R.Retriever(tmp_path / "idx") as r:
        assert r.flip and len(r.store.image_paths()) == 256
        report = point_query_precision(r, tmp_path / "data", 10, num_classes=len(r.classes))
    print(report.format(r.classes))
    assert report.queries == 329
    assert report.precision >= 0.8, report.format(r.classes)


# ------------------------------------------------------------------------------------------
# the real thing, slow


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPML_QUALITY_TESTS"),
                    reason="trains for about two hours on a 2-core CPU; the committed model "
                           "(test_trained_model_reaches_the_precision_target) checks the target on "
                           "every run. Run with SPML_QUALITY_TESTS=1 (SPML_QUALITY_ITERS, _WIDTH, "
                           "_SCENES, _SUPERVISION, _BASELINE, _MAX_SIDE: iterations, the tiny "
                           "network's width, training scenes, supervision, baseline, deployed size)")
def test_trained_model_retrieval_precision(tmp_path):
    """Train the tiny model for real (lr 0.03, no f1 stage; ``SPML_QUALITY_SUPERVISION``, default
    full; ``SPML_QUALITY_BASELINE``, default ``ce``, or ``pce``, or empty for SPML itself;
    ``SPML_QUALITY_ITERS`` iterations, default 48000; ``SPML_QUALITY_WIDTH``, default 16;
    ``SPML_QUALITY_SCENES`` training scenes, default 1024) on the built-in scenes, export it at
    ``SPML_QUALITY_MAX_SIDE`` px (default 192), index the first 256 training images, query with
    a point deep inside every val object: precision@10 >= 0.8 (the issue's target).

    The defaults follow the committed model, with one difference: that one was trained for 30000
    iterations and resumed for 18000 more (tests/assets/retrieval_tiny/README.md); one straight
    48000-iteration run has not been measured. Every run so far, with its command and figures:
    benchmarks/results/retrieval_quality.md (same seed, index and queries as here)."""
    from spml_deploy.export.bundle import export_bundle
    from spml_deploy.training.train import train

    iters = int(os.environ.get("SPML_QUALITY_ITERS", "48000"))
    width = int(os.environ.get("SPML_QUALITY_WIDTH", "16"))
    n_train = int(os.environ.get("SPML_QUALITY_SCENES", "1024"))
    supervision = os.environ.get("SPML_QUALITY_SUPERVISION", "full")
    baseline = os.environ.get("SPML_QUALITY_BASELINE", "ce")
    max_side = int(os.environ.get("SPML_QUALITY_MAX_SIDE", "192"))
    synthesize(tmp_path / "data", n_train=n_train, n_val=64, size=128, seed=0)
    t0 = time.perf_counter()
    train(tmp_path / "data", supervision, tmp_path / "run", progress=False,
          overrides={"train": {"classifier_iters": 0, "iters": iters, "baseline": baseline},
                     "model": {"width": width}})
    export_bundle(tmp_path / "run", tmp_path / "bundle", max_side=max_side)
    index_images = sorted((tmp_path / "data" / "images").glob("train_*.png"))[:256]
    (tmp_path / "index-images").mkdir()
    for p in index_images:
        shutil.copy(p, tmp_path / "index-images" / p.name)
    IN.build_index(tmp_path / "bundle", tmp_path / "index-images", tmp_path / "idx",
                  progress=False)
    with R.Retriever(tmp_path / "idx") as r:
        p10, n = precision_at_k(r, tmp_path / "data", 10)
    print(f"trained tiny model ({supervision}{' ' + baseline if baseline else ''}, width "
          f"{width}, {n_train} scenes, {iters} iterations, at {max_side} px): "
          f"precision@10 {p10:.3f} over {n} queries, {time.perf_counter() - t0:.0f} s")
    assert p10 >= 0.8, f"precision@10 {p10:.3f} over {n} queries"


# ------------------------------------------------------------------------------------------
# per-cell geometry (no per-pixel maps), whole-pixel coordinates


@pytest.mark.parametrize("orig,resized", [((37, 50), (64, 86)),      # upscaled: empty cells
                                          ((300, 170), (64, 36)),     # downscaled
                                          ((64, 64), (64, 64))])
def test_segment_geometry_equals_the_full_size_map(orig, resized):
    """Boxes, areas and masks computed from the cells equal those read off the full-size map
    (the oracle: ``local[row_cell][:, col_cell]``), also when some cells hold no original
    pixel (upscaled images) and some segments cover none."""
    rng = np.random.default_rng(sum(orig))
    (H, W), (rh, rw) = orig, resized
    hv, wv = -(-rh // 4), -(-rw // 4)
    n = 7
    local = rng.integers(0, n + 1, (hv, wv)).astype(np.int32)      # n = no segment
    local[:, :3] = rng.integers(0, 3, (hv, 1))                       # some larger segments
    row_cell, col_cell = SG.pixel_to_cell(H, rh, hv), SG.pixel_to_cell(W, rw, wv)
    keep, boxes, areas, masks = SG.segment_geometry(local, n, row_cell, col_cell)
    full = local[row_cell[:, None], col_cell[None, :]]
    want = [s for s in range(n) if (full == s).any()]
    assert keep.tolist() == want
    for j, s in enumerate(keep):
        ys, xs = np.nonzero(full == s)
        assert areas[j] == ys.size
        x0, y0 = xs.min(), ys.min()
        assert boxes[j].tolist() == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
        w, h = boxes[j][2], boxes[j][3]
        assert np.array_equal(rle_decode(masks[j], (h, w)), (full == s)[y0:y0 + h, x0:x0 + w])
    # mask query weights: pixels of a mask per cell, against a per-pixel bincount
    mask = rng.random((H, W)) < 0.3
    ys, xs = np.nonzero(mask)
    ref = np.bincount(row_cell[ys] * wv + col_cell[xs], minlength=hv * wv).reshape(hv, wv)
    assert np.array_equal(SG._cell_counts(mask, row_cell, col_cell, hv, wv), ref)


def test_coordinates_are_whole_pixels():
    assert SG.parse_coords("12, 7", 2, "point") == (12, 7)
    assert SG.parse_coords("12.0,7", 2, "point") == (12, 7)          # integral: accepted
    assert SG.parse_coords((1, 2, 3, 4), 4, "box") == (1, 2, 3, 4)
    for value, msg in [("1.5,2.5", "whole pixels"), ("1,2,3", "2 finite"), ("a,b", "2 numbers"),
                       ("nan,1", "finite")]:
        with pytest.raises(SG.QueryError, match=msg) as err:
            SG.parse_coords(value, 2, "point")
        assert "point" in err.value.message
    with pytest.raises(SG.QueryError, match="whole pixels") as err:
        SG.parse_coords("0,0,10.5,4", 4, "box")
    assert "box 0,0,10,4" in err.value.fix


# ------------------------------------------------------------------------------------------
# the query image itself, relative names


def test_query_image_in_the_index_is_left_out(index6, scenes, tmp_path):
    """The indexed copy of the query image (recognised by its pixels, also under another
    path and re-encoded) is left out by default; the hits are then the exact top-k of the
    other images' segments. --include-self / exclude_self=False keeps it (cosine 1 first)."""
    from PIL import Image

    src = sorted((scenes / "images").glob("train_*.png"))[2]          # indexed
    copy = tmp_path / "elsewhere.png"
    Image.open(src).save(copy, compress_level=9)                        # other bytes, same pixels
    assert copy.read_bytes() != src.read_bytes()
    with R.Retriever(index6) as r:
        seg = r.segment(read_image(copy))
        s = int(np.argmax(seg.areas))
        py, px = np.argwhere(seg.segment_map() == s)[0]
        hits, desc = r.query(copy, point=(px, py), k=8)
        assert desc["in_index"] is True and desc["excluded_images"] == 1
        assert all(h.image_rel != src.name for h in hits) and len(hits) == 8
        ids, vecs = index_vectors(r.index)
        rows = r.store.segments(ids)
        other = np.array([row.image_rel != src.name for row in rows])
        ref_scores, ref_ids = _exact_topk(vecs[other], seg.vectors[s][None], 8)
        assert [h.segment_id for h in hits] == ids[other][ref_ids[0]].tolist()
        with_self, desc2 = r.query(copy, point=(px, py), k=8, exclude_self=False)
        assert desc2["in_index"] is True and desc2["excluded_images"] == 0
        assert with_self[0].image_rel == src.name
        assert with_self[0].score == pytest.approx(1.0, abs=1e-5)
        # an image that is not in the index: nothing left out
        _, desc3 = r.query(scenes / "images" / "val_00000.png", point=(1, 1), k=3)
        assert desc3["in_index"] is False and desc3["excluded_images"] == 0
        # the class filter and the exclusion together
        hc, _ = r.query(copy, point=(px, py), k=3, class_name=r.classes[hits[0].class_id])
        assert hc and all(h.image_rel != src.name and h.class_id == hits[0].class_id for h in hc)


def test_index_from_before_content_hashes_still_works(index6, scenes, tmp_path):
    """An index whose images table has no hash column (written before it existed) opens and
    answers queries (in_index: None = cannot tell); 'index add' adds the column and hashes the
    new images, which are then recognised."""
    idx = tmp_path / "old"
    shutil.copytree(index6, idx)
    con = sqlite3.connect(idx / "segments.sqlite")
    con.execute("DROP INDEX images_hash")
    con.execute("ALTER TABLE images DROP COLUMN content_sha256")
    con.execute("DELETE FROM meta WHERE key = 'images_root'")
    con.commit()
    con.close()
    indexed = sorted((scenes / "images").glob("train_*.png"))[0]
    with R.Retriever(idx) as r:
        hits, desc = r.query(indexed, point=(5, 5), k=3)
        assert desc["in_index"] is None and desc["excluded_images"] == 0 and len(hits) == 3
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(scenes / "images" / "train_00010.png", new / "n.png")
    rep = IN.add_to_index(idx, new, progress=False)
    assert rep.added_images == 1
    with R.Retriever(idx) as r:
        _, desc = r.query(new / "n.png", point=(5, 5), k=3)
        assert desc["in_index"] is True and desc["excluded_images"] == 1
        _, desc = r.query(indexed, point=(5, 5), k=3)
        assert desc["in_index"] is None          # old images still have no hash
        rels = {row.image_rel for row in r.store.segments(range(r.store.count()))}
    assert "n.png" in rels                       # no images_root: named relative to IMAGES


def test_images_are_named_relative_to_the_build_folder(run, scenes, tmp_path):
    """Hits name images relative to the folder given to 'index build' (stored as meta
    images_root); 'index add' of a subfolder keeps names relative to that root, images from
    elsewhere are named relative to the folder given to 'add'. to_dict() never holds the
    absolute path unless asked (local_paths=True)."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    shutil.copy(scenes / "images" / "train_00000.png", root / "a" / "x.png")
    IN.build_index(run, root, tmp_path / "idx", progress=False)
    shutil.copy(scenes / "images" / "train_00001.png", root / "b" / "y.png")
    IN.add_to_index(tmp_path / "idx", root / "b", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(scenes / "images" / "train_00002.png", other / "z.png")
    IN.add_to_index(tmp_path / "idx", other, progress=False)
    with R.Retriever(tmp_path / "idx") as r:
        assert r.meta["images_root"] == str(root.resolve())
        hits, _ = r.query(scenes / "images" / "val_00000.png", point=(3, 3), k=len(r))
    by_rel = {h.image_rel: h for h in hits}
    assert set(by_rel) == {"a/x.png", "b/y.png", "z.png"}
    assert by_rel["a/x.png"].image == str((root / "a" / "x.png").resolve())
    d = by_rel["b/y.png"].to_dict()
    assert d["image"] == "b/y.png" and "path" not in d and str(tmp_path) not in json.dumps(d)
    local = by_rel["b/y.png"].to_dict(local_paths=True)
    assert local["path"] == str((root / "b" / "y.png").resolve())
    assert len({h.image_id for h in hits}) == 3
