"""kNN label retrieval (spec 7.3) and the prototype index: golden cases of the official
implementation, hand-computed votes, FAISS against the brute-force oracle."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from spml_deploy.engine import index as I
from spml_deploy.engine.index import exact as exact_module
from spml_deploy.engine.index import faiss_index
from spml_deploy.errors import ManifestError, MissingDependencyError, SpmlError

faiss = pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install 'spml-deploy[index]')")


@pytest.fixture(autouse=True, scope="module")
def _faiss_single_thread():
    """FAISS's OpenMP loops slow down ~5x when the 2 CI cores are shared with other work."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def clustered(n: int, d: int = 64, clusters: int = 100, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres; a vector's 10th neighbour is at cosine
    ~0.6, with many members of the same cluster at similar distances (not a trivial problem)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, d)))
    x = centres[rng.integers(0, clusters, n)] + 1.2 * unit(rng.standard_normal((n, d)))
    return unit(x)


def data_and_queries(n: int, nq: int, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` indexed vectors and ``nq`` queries drawn from the same clusters."""
    x = clustered(n + nq, d, seed=seed)
    return x[:n], x[n:]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


# --------------------------------------------------------------------------------------------
# golden cases


def test_golden_knn_topk_vote(golden, golden_compare):
    g = golden("knn_topk_vote")
    k, c = int(g["top_k"]), int(g["num_classes"])
    labels, sims = I.knn_labels(g["queries"], g["memory"], g["memory_labels"], k)
    assert sims.dtype == torch.float64
    assert torch.all(sims[:, :-1] >= sims[:, 1:])  # decreasing similarity
    np.testing.assert_array_equal(labels.numpy(), g["topk_labels"])
    majority = I.topk_vote(g["queries"], g["memory"], g["memory_labels"], k, c)
    np.testing.assert_array_equal(majority.numpy(), g["majority_label"])
    accuracy = (labels == torch.from_numpy(g["query_labels"])[:, None]).double().mean().item()
    assert abs(accuracy - float(g["accuracy"])) <= 1e-6 * abs(float(g["accuracy"]))
    tie = g["is_vote_tie"].astype(bool)
    assert tie.sum() == 6
    # the tie cases really are 10/10 and resolve to the smaller class id
    for row, lab in zip(g["topk_labels"][tie], g["majority_label"][tie]):
        values, counts = np.unique(row, return_counts=True)
        assert sorted(counts.tolist()) == [10, 10] and lab == values.min()


def test_golden_knn_segsort_predictions(golden):
    g = golden("knn_segsort_predictions")
    emb = torch.from_numpy(g["cluster_embedding"])
    # adapter: compact the cluster ids, prototypes = normalised sums, one vote per cluster
    _, inverse = torch.unique(torch.from_numpy(g["cluster_index"]), return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, emb.shape[1], dtype=emb.dtype).index_add_(0, inverse, emb)
    protos = torch.nn.functional.normalize(sums, dim=1)
    labels, _ = I.knn_labels(protos, g["memory"], g["memory_labels"], 20)
    votes = I.topk_vote(protos, g["memory"], g["memory_labels"], 20)  # classes 0..max label
    np.testing.assert_array_equal(labels[inverse].numpy(), g["topk_labels"])
    np.testing.assert_array_equal(votes[inverse].numpy(), g["prediction"])


# --------------------------------------------------------------------------------------------
# voting by hand


def test_votes_by_hand_ties_and_guards():
    memory = unit(np.eye(4)[[0, 1, 2, 3]] + 0.0)
    memory_labels = np.array([3, 1, 1, 3])
    q = unit(np.array([[1.0, 0.9, 0.5, 0.1]]))  # order: rows 0, 1, 2, 3
    lab, sims = I.knn_labels(q, memory, memory_labels, k=2)
    assert lab.tolist() == [[3, 1]]
    # k = 2: one vote each for 3 and 1 -> tie -> 1 (the smaller id), although 3 is nearest
    assert I.topk_vote(q, memory, memory_labels, k=2, num_classes=5).tolist() == [1]
    # k = 50 > 4 prototypes: all four vote, 2 / 2 -> 1
    assert I.topk_vote(q, memory, memory_labels, k=50, num_classes=5).tolist() == [1]
    assert I.knn_labels(q, memory, memory_labels, k=50)[0].shape == (1, 4)
    frac = I.soft_vote(q, memory, memory_labels, k=3, num_classes=5)
    torch.testing.assert_close(frac, torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3, 0.0]]))
    with pytest.raises(ValueError, match="0..2"):
        I.topk_vote(q, memory, memory_labels, num_classes=3)
    with pytest.raises(ValueError, match="VOID"):
        I.topk_vote(q, memory, np.array([0, 1, 255, 1]), num_classes=21)
    with pytest.raises(SpmlError, match="empty"):
        I.topk_vote(q, memory[:0], memory_labels[:0], num_classes=5)


# --------------------------------------------------------------------------------------------
# FAISS vs brute force


def test_flat_matches_exact_up_to_ties():
    x, q = data_and_queries(5000, 60, 32, seed=1)
    ids = np.arange(5000, dtype=np.int64) * 3 + 1000  # arbitrary, preserved
    fi, ex = I.PrototypeIndex(32, "flat"), I.ExactIndex(32, dtype=torch.float64)
    fi.add(x, ids)
    ex.add(x.astype(np.float64), ids)
    fs, fids = fi.search(q, 10)
    es, eids = ex.search(q, 10)
    np.testing.assert_allclose(fs, es, atol=2e-6)
    # ids equal except where two neighbours are tied within float32 rounding
    gap = np.minimum(np.abs(np.diff(es, axis=1, prepend=np.inf)), np.abs(np.diff(es, axis=1, append=-np.inf)))
    clear = gap > 1e-5
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(fids[clear], eids[clear])
    assert set(fids.ravel()) <= set(ids.tolist())


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(kind):
    x, q = data_and_queries(20000, 200, seed=3)
    truth = I.ExactIndex(64)
    truth.add(x)
    _, want = truth.search(q, 10)
    index = I.PrototypeIndex(64, kind)
    index.add(x)
    _, got = index.search(q, 10)
    r = recall_at(got, want)
    assert r >= 0.9, (kind, r, index.params)


def test_ivfpq_builds_and_reranks():
    x, q = data_and_queries(4000, 100, seed=4)
    truth = I.ExactIndex(64)
    truth.add(x)
    _, want = truth.search(q, 10)
    plain = I.PrototypeIndex(64, "ivfpq")
    plain.add(x)
    assert plain.params["pq_m"] == 16 and plain.params["pq_nbits"] == 6  # scaled to 4000 vectors
    reranked = I.PrototypeIndex(64, "ivfpq", rerank=8)
    reranked.add(x)
    r_plain, r_rerank = recall_at(plain.search(q, 10)[1], want), recall_at(reranked.search(q, 10)[1], want)
    assert r_plain >= 0.3 and r_rerank >= 0.9 and r_rerank > r_plain, (r_plain, r_rerank)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "exact"])
def test_save_load_roundtrip_keeps_ids_and_results(kind, tmp_path):
    x, q = data_and_queries(3000, 20, 16, seed=6)
    ids = np.random.default_rng(0).permutation(np.arange(3000, dtype=np.int64) * 1_000_003 + 17)
    index = I.ExactIndex(16) if kind == "exact" else I.PrototypeIndex(16, kind)
    index.add(x[:2000], ids[:2000])
    index.add(x[2000:], ids[2000:])  # a second add extends without retraining
    if kind in ("ivf", "ivfpq"):
        index.set_search_params(nprobe=4)
    before = index.search(q, 7)
    path = tmp_path / "sub" / "protos.npz"
    index.save(path)
    loaded = I.load_index(path)
    assert type(loaded) is type(index) and loaded.ntotal == 3000
    np.testing.assert_array_equal(loaded.ids, ids)
    after = loaded.search(q, 7)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    if kind != "exact":
        assert loaded.params == index.params
    assert not list(path.parent.glob("*.tmp*"))  # atomic write leaves nothing behind


def test_load_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        I.load_index(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an index")
    with pytest.raises(ManifestError, match="readable"):
        I.load_index(bad)
    good = tmp_path / "good.npz"
    index = I.ExactIndex(4)
    index.add(np.eye(4, dtype=np.float32))
    index.save(good)
    bad.write_bytes(good.read_bytes()[:200])  # truncated zip
    with pytest.raises(ManifestError, match="readable"):
        I.load_index(bad)


def test_k_larger_than_ntotal_and_empty_index():
    x = clustered(5, 8, seed=8)
    for index in (I.PrototypeIndex(8, "flat"), I.PrototypeIndex(8, "hnsw"), I.ExactIndex(8)):
        scores, ids = index.search(x[:2], 20)
        assert scores.shape == (2, 0) and ids.shape == (2, 0)
        index.add(x)
        scores, ids = index.search(x[:2], 20)
        assert ids.shape == (2, 5) and sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]
        assert ids[0, 0] == 0 and ids[1, 0] == 1
    with pytest.raises(SpmlError, match="empty"):
        I.ExactIndex(8).vote(x, 3, num_classes=2)
    with pytest.raises(SpmlError, match="empty"):
        I.PrototypeIndex(8).vote(x, 3, num_classes=2)


def test_bad_inputs_are_rejected():
    index = I.PrototypeIndex(8, "flat")
    with pytest.raises(ValueError, match="unit"):
        index.add(np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        index.add(np.ones((3, 7), np.float32))
    with pytest.raises(ValueError, match="ids"):
        index.add(clustered(3, 8), ids=[1, 2])
    with pytest.raises(ValueError, match="index_type"):
        I.PrototypeIndex(8, "lsh")


# --------------------------------------------------------------------------------------------
# classifier, fallback, GPU


def test_index_vote_matches_topk_vote():
    x, q = data_and_queries(4000, 50, 32, seed=9)
    labels = np.random.default_rng(1).integers(0, 6, 4000)
    ids = np.arange(4000, dtype=np.int64)[::-1] * 5 + 7  # labels[i] belongs to ids[i]
    want = I.topk_vote(q, x, labels, k=20, num_classes=6)
    for index in (I.PrototypeIndex(32, "flat"), I.ExactIndex(32)):
        index.add(x, ids, labels)
        assert torch.equal(index.vote(q, 20, 6), want)
        assert torch.equal(index.vote(torch.from_numpy(q), 20, 6), want)
        torch.testing.assert_close(index.vote(q, 20, 6, soft=True), I.soft_vote(q, x, labels, 20, 6))
        _, got_ids, got_labels = index.search_labels(q, 20)
        np.testing.assert_array_equal(got_labels, labels[3999 - (got_ids - 7) // 5])
    with pytest.raises(ValueError, match="0..4"):
        index.vote(q, 20, 5)                       # a label of 5 is no class of 5
    unlabelled = I.ExactIndex.of(x, np.where(labels == 0, -1, labels))   # -1 does not vote
    frac = unlabelled.vote(q, 20, 6, soft=True)
    assert torch.all(frac[:, 0] == 0) and torch.allclose(frac.sum(1), torch.ones(50))


def test_exact_search_matches_float64_brute_force():
    """The exact index (grouped top-k, float32) against a float64 brute-force oracle written
    directly in numpy, over sizes that take the grouped and the plain paths."""
    for n, k in ((9000, 20), (50, 7), (3001, 1)):
        x, q = data_and_queries(n, 80, 32, seed=n)
        ids = np.arange(n, dtype=np.int64) * 7 + 3
        scores, got = I.ExactIndex.of(x, ids=ids).search(q, k)
        sims = q.astype(np.float64) @ x.astype(np.float64).T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        want_s = np.take_along_axis(sims, order, axis=1)
        np.testing.assert_allclose(scores, want_s, rtol=0, atol=1e-5)
        s_next = np.sort(sims, axis=1)[:, ::-1][:, : k + 1]
        gaps = np.abs(np.diff(s_next, axis=1)).min(axis=1) > 1e-5      # no near-tie up to k + 1
        assert gaps.mean() > 0.8
        np.testing.assert_array_equal(got[gaps], ids[order][gaps])


def test_fallback_without_faiss(monkeypatch):
    def missing():
        raise MissingDependencyError("faiss", "index", "the FAISS prototype index")

    monkeypatch.setattr(faiss_index, "_faiss", missing)
    with pytest.raises(MissingDependencyError, match=r"spml-deploy\[index\]"):
        I.PrototypeIndex(8)
    index = I.make_index(8, "hnsw")
    assert isinstance(index, I.ExactIndex)
    assert not I.gpu_available()


@pytest.mark.gpu
@pytest.mark.skipif(not I.gpu_available(), reason="needs faiss-gpu and a CUDA device")
def test_gpu_matches_cpu():
    x, q = data_and_queries(20000, 100, seed=11)
    for kind in ("flat", "ivf"):
        cpu, gpu = I.PrototypeIndex(64, kind), I.PrototypeIndex(64, kind, use_gpu=True)
        cpu.add(x)
        gpu.add(x)
        assert gpu.on_gpu
        cs, ci = cpu.search(q, 10)
        gs, gi = gpu.search(q, 10)
        np.testing.assert_allclose(gs, cs, atol=1e-4)
        assert recall_at(gi, ci) >= (0.999 if kind == "flat" else 0.95)


# --------------------------------------------------------------------------------------------
# the two-stage exact top-k (MemoryMatrix) against one matmul + topk written directly


def reference_topk(q: torch.Tensor, m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec 7.3 retrieval written directly: all cosines, the k largest."""
    return torch.topk(q @ m.T, k, dim=1)


def reference_vote(q: torch.Tensor, m: torch.Tensor, labels: torch.Tensor, k: int, c: int) -> torch.Tensor:
    """Majority class of the k nearest rows, ties -> smallest class (bincount per query)."""
    idx = reference_topk(q, m, k)[1]
    counts = torch.stack([torch.bincount(labels[row], minlength=c) for row in idx])
    return counts.argmax(dim=1)


@pytest.mark.parametrize("group", [2, 8, 16, 64])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_grouped_topk_equals_plain_topk_float64(group, k):
    x, q = data_and_queries(3001, 150, 32, seed=12)          # 3001: padding columns exist
    m, qt = torch.from_numpy(x).double(), torch.from_numpy(q).double()
    mat = I.MemoryMatrix(m, group=group)
    want_v, want_i = reference_topk(qt, m, k)
    got_v, got_i = mat.topk(qt, k, method="grouped")
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-12)
    assert torch.all(got_v[:, 1:] <= got_v[:, :-1])                   # decreasing
    assert torch.equal(got_i.sort(1).values, want_i.sort(1).values)   # same neighbour sets
    # the rows returned score the similarities returned
    torch.testing.assert_close((qt[:, None, :] * m[got_i]).sum(2), got_v, rtol=0, atol=1e-12)


def test_grouped_topk_with_exact_ties_keeps_the_top_values():
    # every memory row appears 5 times: the k-th value is tied across groups
    base = torch.from_numpy(clustered(400, 16, seed=13)).double()
    m = base.repeat(5, 1)
    q = torch.from_numpy(clustered(30, 16, seed=14)).double()
    want_v, _ = reference_topk(q, m, 12)
    got_v, got_i = I.MemoryMatrix(m, group=8).topk(q, 12, method="grouped")
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-12)
    assert all(len(set(row.tolist())) == 12 for row in got_i)         # 12 distinct rows
    torch.testing.assert_close((q[:, None, :] * m[got_i]).sum(2), got_v, rtol=0, atol=1e-12)


def test_memory_vote_matches_reference_at_segment_job_size(monkeypatch):
    # the segment job's case: 576 query prototypes (4 images x 144 segments), ~9000 memory
    # prototypes of 9 classes, float32; the search runs in several chunks of queries
    x, q = data_and_queries(9216, 576, 32, seed=15)
    labels = torch.from_numpy(np.random.default_rng(2).integers(0, 9, 9216))
    m, qt = torch.from_numpy(x), torch.from_numpy(q)
    memory = I.ExactIndex.of(x, labels)
    want = reference_vote(qt, m, labels, 20, 9)
    assert torch.equal(memory.vote(qt, 20, 9), want)
    assert torch.equal(I.topk_vote(qt, x, labels, 20, 9), want)
    assert torch.equal(I.topk_vote(qt, I.MemoryMatrix(m), labels, 20, 9, method="plain"), want)
    monkeypatch.setattr(exact_module, "CPU_BLOCK_ELEMENTS", 1 << 16)    # chunks of ~5 queries
    assert torch.equal(I.ExactIndex.of(x, labels).vote(qt, 20, 9), want)
    got_l, got_s = I.knn_labels(qt, I.MemoryMatrix(m), labels, 20)
    want_s, want_i = reference_topk(qt, m, 20)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-6)
    gap = (want_s[:, 18] - want_s[:, 19]) > 1e-5                        # no near-tie at the cut
    assert gap.float().mean() > 0.9
    assert torch.equal(got_l[gap].sort(1).values, labels[want_i][gap].sort(1).values)


# --------------------------------------------------------------------------------------------
# the training memory as an index file (new runs: memory.npz; older runs: memory.npz of
# prototypes + labels beside memory_index.npz, a format-1 FAISS file without labels)


def _memory_case(n: int = 9216, nq: int = 576, seed: int = 15):
    x, q = data_and_queries(n, nq, 32, seed=seed)
    labels = np.random.default_rng(2).integers(0, 9, n)
    return x, q, labels


def _write_old_memory(folder, x, labels, index_type: str) -> None:
    """The files a run folder of the previous version holds: memory.npz (prototypes, labels)
    and memory_index.npz (format 1: the serialised FAISS index and its ids, no labels)."""
    import json

    np.savez(folder / "memory.npz", prototypes=x, labels=labels)
    index = I.PrototypeIndex(x.shape[1], index_type)
    index.add(x)
    meta = {"format_version": 1, "kind": "faiss", "dim": x.shape[1], "index_type": index_type,
            "params": index.params}
    np.savez(folder / "memory_index.npz", meta=np.array(json.dumps(meta)),
             ids=np.arange(len(x), dtype=np.int64), faiss=faiss.serialize_index(index._index))


def _clear_vote(q, x, labels, got):
    qt, m = torch.from_numpy(q).double(), torch.from_numpy(x).double()
    want = reference_vote(qt, m, torch.from_numpy(labels), 20, 9)
    s = reference_topk(qt, m, 21)[0]
    clear = (s[:, 19] - s[:, 20]) > 1e-5        # a vote can only differ at a float32 tie
    assert clear.float().mean() > 0.9
    assert got.dtype == torch.int64 and torch.equal(got[clear], want[clear])
    return want


def test_memory_file_round_trips_and_votes_exactly(tmp_path):
    x, q, labels = _memory_case()
    index = I.build_index(x, labels, "flat")
    assert isinstance(index, I.PrototypeIndex) and I.index_is_exact(index)
    index.save(tmp_path / "memory.npz")
    loaded = I.load_index(tmp_path / "memory.npz")
    np.testing.assert_array_equal(loaded.labels, labels)
    np.testing.assert_array_equal(loaded.vectors(), x)
    # a flat memory is searched by the exact index (the same neighbours as FAISS flat)
    memory = I.load_memory(tmp_path / "memory.npz")
    assert isinstance(memory, I.ExactIndex)
    _clear_vote(q, x, labels, memory.vote(torch.from_numpy(q), 20, 9))
    s_exact, i_exact = memory.search(q, 20)
    s_flat, i_flat = loaded.search(q, 20)
    np.testing.assert_allclose(s_exact, s_flat, rtol=0, atol=1e-5)
    gap = np.abs(np.diff(s_flat, axis=1)).min(1) > 1e-5
    assert gap.mean() > 0.9 and np.array_equal(i_exact[gap], i_flat[gap])


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_old_run_memory_files_still_load(tmp_path, index_type):
    x, q, labels = _memory_case(4000, 300, seed=21)
    _write_old_memory(tmp_path, x, labels, index_type)
    memory = I.load_memory(tmp_path / "memory.npz", tmp_path / "memory_index.npz")
    if index_type == "flat":                    # the exact search over memory.npz
        assert isinstance(memory, I.ExactIndex)
        _clear_vote(q, x, labels, memory.vote(torch.from_numpy(q), 20, 9))
    else:                                       # the approximate FAISS index, with labels
        assert isinstance(memory, I.PrototypeIndex) and memory.index_type == "hnsw"
        np.testing.assert_array_equal(memory.labels, labels)
        want = reference_vote(torch.from_numpy(q).double(), torch.from_numpy(x).double(),
                              torch.from_numpy(labels), 20, 9)
        assert (memory.vote(torch.from_numpy(q), 20, 9) == want).float().mean() >= 0.97
    # format-1 files are read by load_index too (labels -1, vectors from the flat structure)
    old = I.load_index(tmp_path / "memory_index.npz")
    assert np.all(old.labels == -1) and old.ntotal == len(x)
    if index_type == "flat":
        np.testing.assert_array_equal(old.vectors(), x)


def test_memory_errors_and_fallback_without_faiss(tmp_path, monkeypatch, caplog):
    x, q, labels = _memory_case(500, 10, seed=3)
    _write_old_memory(tmp_path, x, labels, "hnsw")
    short = tmp_path / "short"
    short.mkdir()
    _write_old_memory(short, x[:400], labels[:400], "hnsw")
    with pytest.raises(ManifestError, match="400 prototypes but the memory 500") as exc:
        I.load_memory(tmp_path / "memory.npz", short / "memory_index.npz")
    assert "train --resume" in exc.value.fix
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ManifestError, match="unreadable"):
        I.load_memory(tmp_path / "bad.npz")
    I.build_index(x, labels, "flat").save(tmp_path / "new.npz")

    def no_faiss():
        raise MissingDependencyError("faiss", "index", "the FAISS prototype index")

    monkeypatch.setattr(faiss_index, "_faiss", no_faiss)
    fallback = I.build_index(x, labels, "hnsw")
    assert isinstance(fallback, I.ExactIndex) and I.index_is_exact(fallback)
    want = reference_vote(torch.from_numpy(q).double(), torch.from_numpy(x).double(),
                          torch.from_numpy(labels), 20, 9)
    with caplog.at_level("WARNING"):            # a new flat memory file needs no FAISS
        flat = I.load_memory(tmp_path / "new.npz")
    assert isinstance(flat, I.ExactIndex) and "needs FAISS" not in caplog.text
    assert torch.equal(flat.vote(torch.from_numpy(q), 20, 9), want)
    with caplog.at_level("WARNING"):            # an old approximate one: exact, with a warning
        memory = I.load_memory(tmp_path / "memory.npz", tmp_path / "memory_index.npz")
    assert isinstance(memory, I.ExactIndex) and "needs FAISS" in caplog.text
    assert torch.equal(memory.vote(torch.from_numpy(q), 20, 9), want)


def test_memory_matrix_small_memories_dtypes_and_guards():
    x, q = data_and_queries(50, 7, 8, seed=16)
    m, qt = torch.from_numpy(x), torch.from_numpy(q)
    mat = I.MemoryMatrix(m, group=16)                                    # 4 groups < k = 20
    v, i = mat.topk(qt, 20)                                              # auto -> plain
    want_v, want_i = reference_topk(qt, m, 20)
    torch.testing.assert_close(v, want_v, rtol=0, atol=1e-6)
    assert torch.equal(i.sort(1).values, want_i.sort(1).values)
    with pytest.raises(ValueError, match="groups"):
        mat.topk(qt, 20, method="grouped")
    with pytest.raises(ValueError, match="k must lie"):
        mat.topk(qt, 51)
    with pytest.raises(ValueError, match="method"):
        mat.topk(qt, 3, method="fast")
    # float64 queries against a float32 matrix: searched in float64
    lab, sim = I.knn_labels(qt.double(), mat, torch.arange(50), 3)
    assert sim.dtype == torch.float64 and torch.equal(lab, reference_topk(qt.double(), m.double(), 3)[1])
    assert mat.to(dtype=torch.float32) is mat
    # no queries
    v0, i0 = I.MemoryMatrix(m, group=2).topk(qt[:0], 5, method="grouped")
    assert v0.shape == (0, 5) and i0.shape == (0, 5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_file_keeps_exact_vectors_and_labels_across_load_add_save(kind, tmp_path):
    """Every index file holds the exact vectors and labels (ivfpq keeps lossy codes only, so its
    vectors come from the file it was read from plus those added since)."""
    x, _ = data_and_queries(3000, 1, 16, seed=7)
    labels = np.random.default_rng(5).integers(-1, 4, 3000)
    index = I.PrototypeIndex(16, kind)
    index.add(x[:2000], labels=labels[:2000])
    path = tmp_path / "p.npz"
    index.save(path)
    loaded = I.load_index(path)
    loaded.add(x[2000:], labels=labels[2000:])
    loaded.save(path)                                   # over the file it was read from
    again = I.load_index(path)
    np.testing.assert_array_equal(again.vectors(), x)
    np.testing.assert_array_equal(again.labels, labels)
    np.testing.assert_array_equal(again.ids, np.arange(3000))
