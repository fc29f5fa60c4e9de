"""The sharded prototype index: merged shard results against one index of the same vectors
(exact for ``flat``), the merge rule on constructed ties, one trained structure shared by the
shards, and persistence."""
from __future__ import annotations

import numpy as np
import pytest

from spml_deploy.engine import index as I
from spml_deploy.engine.index import faiss_index
from spml_deploy.errors import ManifestError, SpmlError

faiss = pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install 'spml-deploy[index]')")

from test_index import _faiss_single_thread, unit  # noqa: E402,F401  (the fixture is autouse)


def clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, d)))
    return unit(centres[rng.integers(0, clusters, n)] + 1.2 * unit(rng.standard_normal((n, d))))


def test_merge_topk_orders_by_score_then_id_and_puts_missing_last():
    a = (np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[7, 3, -1]]))
    b = (np.array([[0.9, 0.6, 0.5]], np.float32), np.array([[2, 8, 1]]))
    scores, ids = I.merge_topk([a, b], 6)
    np.testing.assert_array_equal(ids, [[2, 7, 8, 1, 3, -1]])
    np.testing.assert_array_equal(scores[0, :5], np.float32([0.9, 0.9, 0.6, 0.5, 0.5]))
    assert scores[0, 5] == -np.inf
    s2, i2 = I.merge_topk([a, b], 2)  # k below the total
    # further per-result arrays (labels) travel with their entries
    _, i3, l3 = I.merge_topk([(*a, np.array([[70, 30, -1]])), (*b, np.array([[20, 80, 10]]))], 6)
    np.testing.assert_array_equal(l3, np.where(i3 >= 0, i3 * 10, -1))
    np.testing.assert_array_equal(i2, [[2, 7]])
    assert s2.dtype == np.float32 and s2.shape == (1, 2)
    with pytest.raises(ValueError):
        I.merge_topk([], 3)


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_flat_shards_return_what_one_flat_index_returns(shards):
    x = clustered(2000)
    q = clustered(300, seed=1)
    ids = np.random.default_rng(2).permutation(10_000)[:2000].astype(np.int64)  # sparse ids
    one = I.PrototypeIndex(32, "flat")
    one.add(x, ids)
    sharded = I.ShardedIndex(32, shards, "flat")
    sharded.add(x[:700], ids[:700])   # two adds: the structure is made once, on the first
    sharded.add(x[700:], ids[700:])
    assert sharded.ntotal == 2000 and sorted(sharded.ids) == sorted(ids)
    assert all(s.ntotal for s in sharded.shards) and len(sharded.shards) == shards
    for s, shard in enumerate(sharded.shards):
        assert np.all(shard.ids % shards == s)
    for k in (1, 10, 50):
        s1, i1 = one.search(q, k)
        s2, i2 = sharded.search(q, k)
        np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-6)
        # the same neighbours wherever the scores are not (numerically) tied
        gap = np.abs(np.diff(s1, axis=1)) > 1e-5
        distinct = np.ones_like(i1, bool)
        distinct[:, 1:] &= gap
        distinct[:, :-1] &= gap
        np.testing.assert_array_equal(i2[distinct], i1[distinct])
        assert distinct.mean() > 0.95
    assert I.index_is_exact(sharded)


def test_exact_shards_without_faiss_match_the_exact_index(monkeypatch):
    x, q = clustered(500), clustered(40, seed=3)
    truth = I.ExactIndex(32)
    truth.add(x)
    monkeypatch.setattr(faiss_index, "_faiss", lambda: (_ for _ in ()).throw(SpmlError("no faiss")))
    sharded = I.ShardedIndex(32, 4, "ivf")
    sharded.add(x)
    assert all(isinstance(s, I.ExactIndex) for s in sharded.shards)
    s1, i1 = truth.search(q, 15)
    s2, i2 = sharded.search(q, 15)
    np.testing.assert_allclose(s2, s1, atol=1e-6)
    np.testing.assert_array_equal(i2, i1)
    assert I.index_is_exact(sharded)


def test_k_beyond_the_shards_and_empty_shards():
    x = clustered(5)
    sharded = I.ShardedIndex(32, 8, "flat")  # 5 vectors in 8 shards: 3 shards stay empty
    sharded.add(x)
    scores, ids = sharded.search(x, 20)
    assert scores.shape == (5, 5) and sorted(ids[0]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))  # each vector finds itself first
    empty = I.ShardedIndex(32, 3)
    assert empty.search(x, 4)[1].shape == (5, 0)
    with pytest.raises(ValueError):
        I.ShardedIndex(32, 0)
    with pytest.raises(ValueError):
        sharded.search(x, 0)


def test_ivf_shards_share_one_trained_quantiser_and_search_like_one_ivf_index():
    x, q = clustered(6000), clustered(200, seed=4)
    sharded = I.ShardedIndex(32, 3, "ivf", nprobe=8)
    sharded.add(x)
    quantisers = [faiss.extract_index_ivf(s._index).quantizer for s in sharded.shards]
    centroids = [qz.reconstruct_n(0, qz.ntotal) for qz in quantisers]
    assert centroids[0].shape[0] == sharded.shards[0].params["nlist"] > 1
    for c in centroids[1:]:
        np.testing.assert_array_equal(c, centroids[0])
    assert not I.index_is_exact(sharded)
    # one IVF index with the same quantiser visits the same lists: the same results
    one = sharded.shards[0].empty_copy()
    assert one.ntotal == 0 and one.params["nprobe"] == 8
    one.add(x)
    s1, i1 = one.search(q, 10)
    s2, i2 = sharded.search(q, 10)
    np.testing.assert_allclose(s2, s1, atol=1e-6)
    assert np.mean(i1 == i2) > 0.99  # equal up to ties
    truth = I.ExactIndex(32)
    truth.add(x)
    _, want = truth.search(q, 10)
    sharded.set_search_params(nprobe=sharded.shards[0].params["nlist"])  # every list: exact
    _, all_lists = sharded.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(all_lists, want)]) > 0.999


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, index_type):
    x, q = clustered(800), clustered(30, seed=5)
    sharded = I.ShardedIndex(32, 3, index_type)
    sharded.add(x, np.arange(100, 900))
    path = tmp_path / "prototypes.npz"
    sharded.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "prototypes.npz", "prototypes.shard-0-of-3.npz", "prototypes.shard-1-of-3.npz",
        "prototypes.shard-2-of-3.npz"]
    loaded = I.load_index(path)
    assert isinstance(loaded, I.ShardedIndex) and loaded.ntotal == 800
    for a, b in zip(sharded.search(q, 12), loaded.search(q, 12)):
        np.testing.assert_array_equal(a, b)
    # a shard file replaced by another one is noticed
    other = I.PrototypeIndex(32, index_type)
    other.add(x[:10])
    other.save(I.ShardedIndex.shard_path(path, 1, 3))
    with pytest.raises(ManifestError, match="shard 1 holds 10 vectors"):
        I.load_index(path)
    I.ShardedIndex.shard_path(path, 1, 3).unlink()
    with pytest.raises(ManifestError, match="not found"):
        I.load_index(path)


def test_votes_through_shards(tmp_path):
    x = clustered(600)
    labels = np.random.default_rng(6).integers(0, 5, 600)
    one, sharded = I.PrototypeIndex(32, "flat"), I.ShardedIndex(32, 4, "flat")
    one.add(x, labels=labels)
    sharded.add(x, labels=labels)
    q = clustered(100, seed=7)
    want = I.topk_vote(q, x, labels, 9, 5)
    np.testing.assert_array_equal(sharded.vote(q, 9, 5).numpy(), want.numpy())
    np.testing.assert_array_equal(one.vote(q, 9, 5).numpy(), want.numpy())
    np.testing.assert_allclose(sharded.vote(q, 9, 5, soft=True).numpy(),
                               I.soft_vote(q, x, labels, 9, 5).numpy(), atol=1e-6)
    # labels and vectors survive the shard files, in id order
    sharded.save(tmp_path / "s.npz")
    loaded = I.load_index(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.labels, labels)
    np.testing.assert_array_equal(loaded.vectors(), x)
    np.testing.assert_array_equal(loaded.vote(q, 9, 5).numpy(), want.numpy())


@pytest.mark.gpu
def test_shards_spread_over_gpus_match_cpu():
    if not I.gpu_available():
        pytest.skip("needs faiss-gpu and a GPU")
    x, q = clustered(3000), clustered(50, seed=8)
    cpu, gpu = I.ShardedIndex(32, 2, "flat"), I.ShardedIndex(32, 2, "flat", use_gpu=True)
    cpu.add(x)
    gpu.add(x)
    assert all(s.on_gpu for s in gpu.shards)
    np.testing.assert_allclose(gpu.search(q, 10)[0], cpu.search(q, 10)[0], atol=1e-5)
