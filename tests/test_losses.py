"""The contrastive primitive (training/losses/) and label propagation (training/affinity.py).

Golden cases (official SegSortLoss / SetSegSortLoss / nearest-neighbour propagation, float64)
are compared with the project's ``compare.py``; a slow per-pixel reference written directly from
the equations of spec section 4 checks the fast code on random inputs with every edge case.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import GOLDEN_DIR, load_golden
from spml_deploy.errors import ConfigError
from spml_deploy.training.affinity import propagate_labels
from spml_deploy.training.losses import (FusedPlan, contrastive_nll, grouped_contrastive_nll,
                                         segsort_plus_loss, set_segsort_loss)
from spml_deploy.training.losses import fused as fused_module
from spml_deploy.training.losses import plan as plan_module
from spml_deploy.training.losses.plan import FUSED_CPU_CHUNK_ELEMENTS
from spml_deploy.training.losses.segsort import _unique_rows

SEGSORT_CASES = ["segsort_plus_allpos_k6", "segsort_plus_mixed_k8", "segsort_plus_mixed_k12",
                 "segsort_plus_ownonly_k16", "segsort_plus_memory_k6", "segsort_plus_large_k6",
                 "segsort_plus_illcond_k16"]
SET_CASES = ["setsegsort_random_k12", "setsegsort_images_k8"]
NNPROP_CASES = ["nnprop_t095_top1_self", "nnprop_tneg1_top1", "nnprop_t09_top3"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread avoids thread hand-off overhead on busy CI
    machines (several times faster here); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Execution plans of the fused primitive, all checked against the same references: the CPU's
#: default, the row-max shift with index_add and gathered coefficients (the CPU's plan before
#: the bound shift and group ranges), and CUDA's (large chunks, one-hot matmul group sums,
#: bound shift, group ranges) run on the CPU.
PLANS = {
    "default": None,
    "rowmax": FusedPlan(FUSED_CPU_CHUNK_ELEMENTS),
    "cuda": FusedPlan(1 << 28, group_matmul=True, bound_shift=True, group_ranges=True),
}


@pytest.fixture(params=list(PLANS))
def plan(request, monkeypatch):
    """Runs a test under each fused plan (``fused_plan`` returns it whatever the device)."""
    chosen = PLANS[request.param]
    if chosen is not None:
        monkeypatch.setattr(fused_module, "fused_plan", lambda device, g, b: chosen)
    return request.param


def _run_case(name: str, dtype: torch.dtype, subtractive: bool = False,
              chunk_size: int | None = None) -> dict[str, np.ndarray]:
    """Per-pixel losses, mean and gradients of one golden primitive case."""
    g = load_golden(name)
    emb = torch.tensor(g["embeddings"], dtype=dtype, requires_grad=True)
    protos = torch.tensor(g["prototypes"], dtype=dtype, requires_grad=True)
    own = torch.tensor(g["instance_labels"])
    kappa = float(g["concentration"])
    labels = torch.tensor(g["semantic_labels"])
    proto_labels = torch.tensor(g["prototype_semantic_labels"])
    if name.startswith("setsegsort"):
        # The official SetSegSortLoss double-counts the own segment of all-zero tag rows.
        def fn(reduction: str) -> torch.Tensor:
            return set_segsort_loss(emb, labels, own, protos, proto_labels, kappa, empty="double_count",
                                    reduction=reduction, subtractive=subtractive, chunk_size=chunk_size)
    else:
        def fn(reduction: str) -> torch.Tensor:
            return segsort_plus_loss(emb, labels, own, protos, proto_labels, kappa, reduction=reduction,
                                     subtractive=subtractive, chunk_size=chunk_size)
    per_pixel = fn("none")
    mean = fn("mean")
    mean.backward()
    return {"loss_per_pixel": per_pixel.detach().double().numpy(),
            "loss_mean": mean.detach().double().numpy(),
            "grad_embeddings": emb.grad.double().numpy(),
            "grad_prototypes": protos.grad.double().numpy()}


def _assert_golden(compare, name: str, outputs: dict[str, np.ndarray], rtol: float) -> None:
    rows = compare.compare_case(str(GOLDEN_DIR / f"{name}.npz"), outputs, rtol=rtol,
                                keys=list(outputs))
    assert len(rows) == len(outputs)
    bad = [(r["key"], r.get("rel_l2"), r.get("rtol_used", rtol)) for r in rows if r["status"] != "ok"]
    assert not bad, f"{name}: {bad}"


@pytest.mark.parametrize("name", SEGSORT_CASES + SET_CASES)
def test_golden_float64(name, golden_compare, plan):
    _assert_golden(golden_compare, name, _run_case(name, torch.float64), rtol=1e-8)


@pytest.mark.parametrize("name", SEGSORT_CASES + SET_CASES)
def test_golden_float32_log_domain(name, golden_compare, plan):
    _assert_golden(golden_compare, name, _run_case(name, torch.float32), rtol=1e-5)


@pytest.mark.parametrize("name", SEGSORT_CASES + SET_CASES)
def test_golden_subtractive_float64_is_bit_close(name, golden_compare):
    """compat.subtractive_positive_sum reproduces the official float64 arithmetic, including
    its cancellation error on the ill-conditioned case (no min_rtol needed there)."""
    out = _run_case(name, torch.float64, subtractive=True)
    g = load_golden(name)
    for key in ("loss_per_pixel", "loss_mean", "grad_embeddings", "grad_prototypes"):
        err = np.linalg.norm(out[key] - g[key]) / np.linalg.norm(g[key])
        assert err < 1e-12, (name, key, err)


def test_golden_chunked(golden_compare, plan):
    name = "segsort_plus_memory_k6"
    _assert_golden(golden_compare, name, _run_case(name, torch.float64, chunk_size=150), rtol=1e-8)
    name = "setsegsort_images_k8"
    _assert_golden(golden_compare, name, _run_case(name, torch.float64, chunk_size=130), rtol=1e-8)


def test_illcond_log_domain_beats_subtractive_in_float32():
    g = load_golden("segsort_plus_illcond_k16")
    exact = g["loss_per_pixel_exact"]
    ours64 = _run_case("segsort_plus_illcond_k16", torch.float64)["loss_per_pixel"]
    assert np.max(np.abs(ours64 - exact)) < 1e-12
    # The official float64 oracle itself carries cancellation error of up to ~2.4e-4.
    assert np.max(np.abs(ours64 - g["loss_per_pixel"])) < 3e-4
    log32 = _run_case("segsort_plus_illcond_k16", torch.float32)["loss_per_pixel"]
    sub32 = _run_case("segsort_plus_illcond_k16", torch.float32, subtractive=True)["loss_per_pixel"]
    err_log = np.max(np.abs(log32 - exact))
    err_sub = np.max(np.abs(sub32 - exact))
    assert err_log < 1e-4
    assert err_sub > 1.0
    assert err_sub > 1e4 * err_log


# ----------------------------------------------------------------------------------------------
# slow reference written from spec section 4


def reference_pixel_loss(f: torch.Tensor, protos: torch.Tensor, kappa: float, positives: list[int],
                         negatives: list[int], own: int) -> torch.Tensor:
    """L(i) of spec 4, literally: NCA over P_i minus own if non-empty, else the own segment."""
    e = [torch.exp(kappa * torch.dot(f, protos[s])) for s in range(protos.shape[0])]
    others = [s for s in positives if s != own]
    num = sum(e[s] for s in others) if others else e[own]
    den = num + sum((e[s] for s in negatives), torch.zeros((), dtype=f.dtype))
    return -torch.log(num / den)


def reference_single(emb, labels, own, protos, proto_labels, kappa):
    out = []
    for i in range(emb.shape[0]):
        pos = [s for s in range(protos.shape[0]) if int(proto_labels[s]) == int(labels[i])]
        neg = [s for s in range(protos.shape[0]) if int(proto_labels[s]) != int(labels[i])]
        out.append(reference_pixel_loss(emb[i], protos, kappa, pos, neg, int(own[i])))
    return torch.stack(out)


def reference_set(emb, tags, own, protos, proto_tags, kappa):
    out = []
    for i in range(emb.shape[0]):
        shared = [int((tags[i] * proto_tags[s]).sum()) for s in range(protos.shape[0])]
        pos = [s for s, a in enumerate(shared) if a > 0]
        neg = [s for s, a in enumerate(shared) if a == 0]
        out.append(reference_pixel_loss(emb[i], protos, kappa, pos, neg, int(own[i])))
    return torch.stack(out)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _random_single(seed: int):
    """Random pool with: a class present in a single segment (own-only positive), a class with
    several segments, memory rows owned by no pixel, and a pixel whose class covers the pool."""
    gen = torch.Generator().manual_seed(seed)
    d, p_cur, p_mem = 6, 12, 8
    protos = _unit(torch.randn(p_cur + p_mem, d, generator=gen, dtype=torch.float64))
    proto_labels = torch.randint(0, 4, (p_cur + p_mem,), generator=gen)
    proto_labels[0] = 9                       # class 9: only segment 0 (fallback branch)
    own = torch.randint(0, p_cur, (40,), generator=gen)
    own[:3] = 0
    labels = proto_labels[own].clone()
    emb = _unit(torch.randn(40, d, generator=gen, dtype=torch.float64) + 2 * protos[own])
    return emb, labels, own, protos, proto_labels


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kappa", [6.0, 16.0])
def test_single_label_matches_reference(seed, kappa):
    emb, labels, own, protos, proto_labels = _random_single(seed)
    emb.requires_grad_(True)
    protos.requires_grad_(True)
    ref = reference_single(emb, labels, own, protos, proto_labels, kappa)
    fast = segsort_plus_loss(emb, labels, own, protos, proto_labels, kappa, reduction="none")
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref.mean(), (emb, protos))
    g_fast = torch.autograd.grad(
        segsort_plus_loss(emb, labels, own, protos, proto_labels, kappa, chunk_size=7), (emb, protos))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _random_set(seed: int):
    """Random multi-hot tags including all-zero rows (pixels and segments) and all-ones rows."""
    gen = torch.Generator().manual_seed(seed)
    d, p, n, t = 5, 15, 30, 4
    protos = _unit(torch.randn(p, d, generator=gen, dtype=torch.float64))
    proto_tags = (torch.rand(p, t, generator=gen) < 0.3).long()
    proto_tags[0] = 0
    proto_tags[1] = 0
    proto_tags[2] = 1
    own = torch.randint(0, p, (n,), generator=gen)
    own[:4] = torch.tensor([0, 1, 2, 2])
    tags = proto_tags[own].clone()
    emb = _unit(torch.randn(n, d, generator=gen, dtype=torch.float64))
    return emb, tags, own, protos, proto_tags


@pytest.mark.parametrize("seed", [0, 3])
def test_set_form_matches_reference(seed):
    emb, tags, own, protos, proto_tags = _random_set(seed)
    emb.requires_grad_(True)
    protos.requires_grad_(True)
    kappa = 12.0
    ref = reference_set(emb, tags, own, protos, proto_tags, kappa)
    empty = tags.sum(1) == 0
    assert empty.any() and (~empty).any()
    dbl = set_segsort_loss(emb, tags, own, protos, proto_tags, kappa, empty="double_count",
                           reduction="none")
    torch.testing.assert_close(dbl, ref, rtol=1e-12, atol=1e-12)
    # Double-count: the own segment is counted in the numerator and again among the negatives.
    i = int(torch.nonzero(empty)[0])
    e = torch.exp(kappa * protos @ emb[i])
    expect = -torch.log(e[own[i]] / (e[own[i]] + e.sum()))
    torch.testing.assert_close(dbl[i], expect, rtol=1e-12, atol=1e-12)
    # Skip (paper default): all-zero rows are left out of the mean and report 0.
    skip = set_segsort_loss(emb, tags, own, protos, proto_tags, kappa, reduction="none")
    assert torch.all(skip[empty] == 0)
    torch.testing.assert_close(skip[~empty], ref[~empty], rtol=1e-12, atol=1e-12)
    mean = set_segsort_loss(emb, tags, own, protos, proto_tags, kappa, chunk_size=4)
    torch.testing.assert_close(mean, ref[~empty].mean(), rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref[~empty].mean(), (emb, protos))
    g_fast = torch.autograd.grad(mean, (emb, protos))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_negatives_gives_zero_and_finite_gradients():
    gen = torch.Generator().manual_seed(5)
    protos = _unit(torch.randn(4, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    emb = _unit(torch.randn(6, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    own = torch.tensor([0, 1, 2, 3, 0, 1])
    # Every segment shares tag 0 with every pixel: no negatives anywhere -> the term is 0.
    tags = torch.ones(6, 2, dtype=torch.long)
    loss = set_segsort_loss(emb, tags, own, protos, torch.ones(4, 2, dtype=torch.long), 12.0)
    assert float(loss.detach()) == 0.0
    g = torch.autograd.grad(loss, (emb, protos))
    assert all(torch.isfinite(t).all() and float(t.abs().max()) < 1e-12 for t in g)
    # A pool holding only the own segment (fallback, no negatives): loss 0, gradient finite.
    single = segsort_plus_loss(emb[:1], torch.tensor([7]), torch.tensor([0]), protos[:1],
                               torch.tensor([7]), 16.0)
    assert float(single.detach()) == 0.0
    assert all(torch.isfinite(t).all() for t in torch.autograd.grad(single, (emb, protos)))


def test_row_with_every_other_entry_excluded_is_finite():
    """Rows whose only valid entry is the own segment (everything else masked out) and rows
    whose only valid entries are negatives stay finite in value and gradient."""
    logits = torch.tensor([[3.0, -1.0, 2.0], [0.5, 4.0, -2.0], [1.0, 1.0, 1.0]],
                          dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[True, False, False], [False, True, True], [True, True, True]])
    valid = torch.tensor([[True, False, False], [True, True, False], [False, False, True]])
    own = torch.tensor([0, 1, 2])
    loss = contrastive_nll(logits, pos, own, valid)
    assert loss[0] == 0.0 and loss[2] == 0.0
    torch.testing.assert_close(loss[1], torch.log1p(torch.exp(torch.tensor(0.5 - 4.0, dtype=torch.float64))))
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(g).all()
    assert float(g[0].abs().sum()) == 0.0 and float(g[1, 2]) == 0.0
    # Large logit range (kappa 16 on opposite unit vectors) in float32: still exact.
    big = torch.tensor([[16.0, -16.0, 15.0]], requires_grad=True)
    val = contrastive_nll(big, torch.tensor([[True, True, False]]), torch.tensor([0]))
    torch.testing.assert_close(val, torch.log1p(torch.exp(torch.tensor([31.0]))), rtol=1e-6, atol=0)
    (gb,) = torch.autograd.grad(val.sum(), big)
    assert torch.isfinite(gb).all()


@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_chunked_equals_unchunked(use_checkpoint):
    emb, labels, own, protos, proto_labels = _random_single(7)
    results = []
    for chunk in (None, 1, 9, 1000):
        e = emb.clone().requires_grad_(True)
        p = protos.clone().requires_grad_(True)
        loss = segsort_plus_loss(e, labels, own, p, proto_labels, 8.0, chunk_size=chunk,
                                 checkpoint=use_checkpoint)
        results.append((loss.detach(), *torch.autograd.grad(loss, (e, p))))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_memory_rows_get_gradient_only_as_pool_members():
    emb, labels, own, protos, proto_labels = _random_single(2)
    protos = protos.clone().requires_grad_(True)
    loss = segsort_plus_loss(emb, labels, own, protos, proto_labels, 6.0)
    (g,) = torch.autograd.grad(loss, protos)
    assert float(g[12:].abs().sum()) > 0          # memory rows are in every pixel's denominator


# ----------------------------------------------------------------------------------------------
# label propagation


def _nnprop_inputs(g, dtype):
    t = {k: torch.tensor(g[k]) for k in ("query_batch_index", "prototype_semantic_labels",
                                         "prototype_batch_index")}
    return (torch.tensor(g["queries"], dtype=dtype), t["query_batch_index"],
            torch.tensor(g["prototypes"], dtype=dtype), t["prototype_semantic_labels"],
            t["prototype_batch_index"])


@pytest.mark.parametrize("name", NNPROP_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nnprop_golden(name, dtype, golden_compare):
    g = load_golden(name)
    args = _nnprop_inputs(g, dtype)
    kw = dict(num_classes=int(g["num_classes"]), top_k=int(g["top_k"]), threshold=float(g["threshold"]))
    raw = propagate_labels(*args, **kw, unknown="zeros")
    _assert_golden(golden_compare, name, {"multiset_labels": raw.numpy()}, rtol=1e-8)
    # Head usage: rows without an accepted neighbour become neutral all-ones rows.
    filled = propagate_labels(*args, **kw)
    expect = g["multiset_labels"].copy()
    expect[expect.sum(1) == 0] = 1
    np.testing.assert_array_equal(filled.numpy(), expect)


def reference_propagation(q, qb, p, pl, pb, c, top_k, threshold, same_image):
    out = torch.zeros(q.shape[0], c, dtype=torch.long)
    for i in range(q.shape[0]):
        cand = [j for j in range(p.shape[0]) if 0 <= int(pl[j]) < c
                and (not same_image or int(pb[j]) == int(qb[i]))]
        cand.sort(key=lambda j: (-float(q[i] @ p[j]), j))
        for j in cand[:top_k]:
            if float(q[i] @ p[j]) >= threshold:
                out[i, int(pl[j])] = 1
        if out[i].sum() == 0:
            out[i] = 1
    return out


@pytest.mark.parametrize("same_image", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_propagation_matches_reference(same_image, top_k):
    gen = torch.Generator().manual_seed(11)
    p = _unit(torch.randn(30, 4, generator=gen, dtype=torch.float64))
    p[5] = p[3]                                    # exact tie: smallest index wins
    pl = torch.randint(0, 7, (30,), generator=gen)  # 5, 6 are unlabelled codes (C = 5)
    pb = torch.randint(0, 3, (30,), generator=gen)
    pb[5] = pb[3]
    q = _unit(p + 0.3 * torch.randn(30, 4, generator=gen, dtype=torch.float64))
    qb = pb.clone()
    qb[0] = 9                                      # image without candidates
    ref = reference_propagation(q, qb, p, pl, pb, 5, top_k, 0.8, same_image)
    fast = propagate_labels(q, qb, p, pl, pb, 5, top_k=top_k, threshold=0.8, same_image=same_image)
    torch.testing.assert_close(fast, ref)
    assert bool((fast.sum(1) == 5).any()) and bool((fast.sum(1) < 5).any())


# ----------------------------------------------------------------------------------------------
# fused path (closed-form gradient, group sums) against the generic autograd implementation


def _values_and_grads(fn, emb: torch.Tensor, protos: torch.Tensor, reduction: str):
    """Loss (per pixel or reduced) and d(sum of it)/d(emb, protos), on fresh leaves."""
    e = emb.detach().clone().requires_grad_(True)
    p = protos.detach().clone().requires_grad_(True)
    out = fn(e, p, reduction)
    # a non-uniform output gradient for per-pixel losses exercises the backward's scaling
    weight = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).view(out.shape)
    g_e, g_p = torch.autograd.grad((out * weight).sum(), (e, p))
    return out.detach(), g_e, g_p


def _assert_same(fused, generic, rtol=1e-10, atol=1e-12):
    for a, b in zip(fused, generic):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _random_set_mixed(seed: int, n: int = 40, zero_segment: bool = True):
    """Set form with: all-zero tag rows (pixels; segments if ``zero_segment``: empty positive
    set, double count), an all-ones pixel row (positive to every tagged segment: without
    ``zero_segment`` it has no negative), memory rows owned by no pixel, and a pixel whose own
    segment is a negative."""
    gen = torch.Generator().manual_seed(seed)
    d, p_cur, p_mem, t = 6, 14, 10, 5
    protos = _unit(torch.randn(p_cur + p_mem, d, generator=gen, dtype=torch.float64))
    proto_tags = (torch.rand(p_cur + p_mem, t, generator=gen) < 0.35).long()
    if not zero_segment:
        proto_tags[proto_tags.sum(1) == 0, 0] = 1
    proto_tags[0] = 0
    if not zero_segment:
        proto_tags[0, 1] = 1
    proto_tags[1] = 1
    own = torch.randint(0, p_cur, (n,), generator=gen)
    own[:4] = torch.tensor([0, 1, 2, 3])
    tags = proto_tags[own].clone()
    tags[5] = 0                               # own segment tagged, pixel not: own is a negative
    tags[6] = 1                               # positive to every tagged segment
    emb = _unit(torch.randn(n, d, generator=gen, dtype=torch.float64) + protos[own])
    return emb, tags, own, protos, proto_tags


@pytest.mark.parametrize("seed,zero_segment", [(0, True), (1, False), (2, True)])
@pytest.mark.parametrize("empty", ["skip", "double_count"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_fused_set_matches_generic(seed, zero_segment, empty, reduction, plan):
    emb, tags, own, protos, proto_tags = _random_set_mixed(seed, zero_segment=zero_segment)
    results = {}
    for impl, chunk in (("generic", None), ("fused", None), ("fused", 7)):
        def fn(e, p, red, impl=impl, chunk=chunk):
            return set_segsort_loss(e, tags, own, p, proto_tags, 12.0, empty=empty, reduction=red,
                                    impl=impl, chunk_size=chunk)
        results[impl, chunk] = _values_and_grads(fn, emb, protos, reduction)
    _assert_same(results["fused", None], results["generic", None])
    _assert_same(results["fused", 7], results["generic", None])
    loss = results["fused", None][0]
    if reduction == "none" and not zero_segment:
        assert float(loss[6]) == 0.0 and bool((loss > 0).any())    # a row without negatives
    if reduction == "none" and empty == "double_count":
        assert float(loss[5]) > 0 and bool((tags.sum(1) == 0).any())
    assert float(results["fused", None][2][14:].abs().sum()) > 0     # memory rows get gradient


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_single_label_matches_generic(seed, reduction, plan):
    emb, labels, own, protos, proto_labels = _random_single(seed)
    labels = labels.clone()
    labels[3] = 7            # a label no segment has: no positive, own segment is a negative
    labels[4] = 9            # label of segment 0 only, own segment elsewhere: own is a negative
    out = {}
    for impl in ("generic", "fused"):
        def fn(e, p, red, impl=impl):
            return segsort_plus_loss(e, labels, own, p, proto_labels, 16.0, reduction=red,
                                     impl=impl, chunk_size=5 if impl == "fused" else None)
        out[impl] = _values_and_grads(fn, emb, protos, reduction)
    _assert_same(out["fused"], out["generic"])


def test_fused_float32_close_to_float64_generic(plan):
    emb, tags, own, protos, proto_tags = _random_set_mixed(4)
    ref = _values_and_grads(lambda e, p, r: set_segsort_loss(e, tags, own, p, proto_tags, 16.0,
                                                              reduction=r, impl="generic"),
                            emb, protos, "mean")
    f32 = _values_and_grads(lambda e, p, r: set_segsort_loss(e, tags, own, p, proto_tags, 16.0,
                                                             reduction=r),
                            emb.float(), protos.float(), "mean")
    for a, b in zip(f32, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def _grouped_problem(seed: int, b: int = 3, n: int = 17, p: int = 9, g: int = 4):
    """B independent pools with excluded groups (neither positive nor negative, like padding)."""
    gen = torch.Generator().manual_seed(seed)
    feat = _unit(torch.randn(b * n, 5, generator=gen, dtype=torch.float64)).view(b, n, 5)
    protos = _unit(torch.randn(b * p, 5, generator=gen, dtype=torch.float64)).view(b, p, 5)
    group = torch.randint(0, g, (b, p), generator=gen)
    group[:, 0] = 0
    pos = torch.rand(b, n, g, generator=gen) < 0.4
    pos[:, :, 0] = True                             # the own segments (group 0) are positives
    excluded = torch.zeros(b, 1, g, dtype=torch.bool)
    excluded[:, :, g - 1] = True                    # group g-1: padding
    group[:, -2:] = g - 1
    pos &= ~excluded
    neg = ~pos & ~excluded
    neg[0, :3] = False                              # rows without negatives
    own = torch.zeros(b, n, dtype=torch.long)
    own[:, ::2] = torch.randint(0, p - 2, (b, (n + 1) // 2), generator=gen)
    own_group = group.gather(1, own).unsqueeze(2)
    valid_own = (pos | neg).gather(2, own_group).squeeze(2)      # own segment never excluded
    own = torch.where(valid_own, own, 0)
    assert bool(neg.gather(2, group.gather(1, own).unsqueeze(2)).any())   # some own negatives
    return feat, protos, group, pos, neg, own


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("b", [3, 1])
def test_grouped_primitive_matches_expanded_masks(seed, weighted, b, plan):
    """grouped_contrastive_nll == contrastive_nll on the expanded masks (B > 1 and one shared
    pool, excluded groups, rows without negatives), values and gradients, under every plan
    (group sums by ``index_add_`` or a one-hot matmul, row-max or bound shift, coefficients
    gathered or applied per group range)."""
    feat, protos, group, pos, neg, own = _grouped_problem(seed, b=b)
    b, n, _ = feat.shape
    p = protos.shape[1]
    w = torch.rand(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    idx = group.unsqueeze(1).expand(b, n, p)
    pos_x, valid_x = pos.gather(2, idx), (pos | neg).gather(2, idx)

    def generic(f, m):
        logits = 10.0 * torch.bmm(f, m.transpose(1, 2))
        out = contrastive_nll(logits.reshape(b * n, p), pos_x.reshape(b * n, p), own.reshape(-1),
                              valid_x.reshape(b * n, p)).view(b, n)
        return (out * w).sum() if weighted else out

    def fused(f, m):
        return grouped_contrastive_nll(f, m, group, pos, own, 10.0, neg,
                                       weights=w if weighted else None, chunk_size=4)

    ref = _values_and_grads(lambda f, m, _: generic(f, m), feat, protos, "none")
    out = _values_and_grads(lambda f, m, _: fused(f, m), feat, protos, "none")
    _assert_same(out, ref)
    if not weighted:
        assert torch.all(out[0][0, :3] == 0)


def test_fused_edge_cases():
    gen = torch.Generator().manual_seed(8)
    protos = _unit(torch.randn(4, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    emb = _unit(torch.randn(6, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    own = torch.tensor([0, 1, 2, 3, 0, 1])
    ones = torch.ones(6, 2, dtype=torch.long)
    # no negatives anywhere: exactly 0, zero gradients (the fused path computes nothing)
    loss = set_segsort_loss(emb, ones, own, protos, torch.ones(4, 2, dtype=torch.long), 12.0)
    assert float(loss.detach()) == 0.0
    g = torch.autograd.grad(loss, (emb, protos))
    assert all(float(t.abs().max()) == 0.0 for t in g)
    # no pixels: a differentiable 0 in every reduction
    for red in ("mean", "sum"):
        z = segsort_plus_loss(emb[:0], own[:0], own[:0], protos, own[:4], 6.0, reduction=red)
        assert float(z.detach()) == 0.0 and z.requires_grad
    assert segsort_plus_loss(emb[:0], own[:0], own[:0], protos, own[:4], 6.0,
                             reduction="none").shape == (0,)
    # without autograd: values only
    with torch.no_grad():
        a = segsort_plus_loss(emb, own % 2, own, protos, torch.arange(4) % 2, 6.0)
    b = segsort_plus_loss(emb, own % 2, own, protos, torch.arange(4) % 2, 6.0, impl="generic")
    torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=0)
    # gradient for one input only (the other detached): each path of the eager gradient
    for leaf in (0, 1):
        args = [emb.detach().clone(), protos.detach().clone()]
        args[leaf].requires_grad_(True)
        grads = [torch.autograd.grad(segsort_plus_loss(args[0], own % 2, own, args[1],
                                                       torch.arange(4) % 2, 6.0, impl=impl),
                                     args[leaf])[0] for impl in ("fused", "generic")]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-13)
        assert float(grads[0].abs().sum()) > 0
    with pytest.raises(ConfigError, match="implementation"):
        segsort_plus_loss(emb, own % 2, own, protos, torch.arange(4) % 2, 6.0, impl="fast")
    with pytest.raises(ConfigError, match="reduction"):
        segsort_plus_loss(emb, own % 2, own, protos, torch.arange(4) % 2, 6.0, reduction="max")


def test_unique_rows_packs_and_falls_back():
    gen = torch.Generator().manual_seed(3)
    for t in (5, 70):
        rows = torch.rand(60, t, generator=gen) < 0.1
        rows[10:20] = rows[0]
        uniq, inv = _unique_rows(rows)
        assert torch.equal(uniq[inv], rows)
        assert uniq.shape[0] == torch.unique(rows, dim=0).shape[0]


def test_fused_plans_by_device_and_the_bound_shift_fallback(monkeypatch):
    """CUDA plans: large chunks bounded by the free memory, matmul group sums, bound shift and
    group ranges; a kappa whose bound would underflow exponentials falls back to the row max."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (120 << 30, 140 << 30))
    plan = plan_module.fused_plan(cuda, 20, 1)
    assert plan == FusedPlan(plan_module.FUSED_CUDA_CHUNK_ELEMENTS, True, True, True)
    assert not plan_module.fused_plan(cuda, 20, 8).group_ranges       # B > 1: no ranges
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1 << 30, 140 << 30))
    assert plan_module.fused_plan(cuda, 20, 1).chunk_elements == 1 << 25  # a quarter, 2 x fp32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1 << 28, 140 << 30))
    assert plan_module.fused_plan(cuda, 20, 1).chunk_elements == plan_module.MAX_CHUNK_ELEMENTS
    cpu = plan_module.fused_plan(torch.device("cpu"), 20, 1)
    assert cpu.chunk_elements == FUSED_CPU_CHUNK_ELEMENTS and not cpu.group_matmul
    # kappa 50 on unit vectors: the bound (50) exceeds BOUND_SHIFT_MAX, the row max is used
    monkeypatch.setattr(fused_module, "fused_plan", lambda device, g, b: PLANS["cuda"])
    seen = []
    real = fused_module._Problem.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.bound is not None)

    monkeypatch.setattr(fused_module._Problem, "__init__", spy)
    emb, tags, own, protos, proto_tags = _random_set_mixed(6)
    for kappa in (12.0, 50.0):
        out = {impl: _values_and_grads(
            lambda e, p, r, impl=impl: set_segsort_loss(e, tags, own, p, proto_tags, kappa,
                                                        reduction=r, impl=impl), emb, protos,
            "mean") for impl in ("generic", "fused")}
        _assert_same(out["fused"], out["generic"])
    assert seen == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_on_cuda_matches_cpu():
    emb, tags, own, protos, proto_tags = _random_set_mixed(5, n=300)

    def fn(e, p, r):
        return set_segsort_loss(e, tags.to(e.device), own.to(e.device), p,
                                proto_tags.to(e.device), 12.0, reduction=r, chunk_size=64)
    cpu = _values_and_grads(fn, emb, protos, "mean")
    gpu = _values_and_grads(fn, emb.cuda(), protos.cuda(), "mean")
    _assert_same([t.cpu() for t in gpu], cpu)
