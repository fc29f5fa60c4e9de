"""One SPML training step's losses (training/spml_loss.py).

* Golden: the official head's L_I, L_A, L_C and gradients for a VOC-scribble-like batch with a
  two-entry memory bank (``losses_voc_scribble_unl21`` keeps unlabelled pixels as code 21 = C;
  ``losses_voc_scribble_unl255`` is the official data setting where unlabelled pixels are 255,
  i.e. already void: we feed those labels unchanged, which is exactly what
  ``compat.unlabeled_as_void`` produces from UNL-coded labels).
* A slow reference written from spec section 5 (python loops over pixels, float64) on small
  random batches with void pixels, unlabelled pixels, an empty k-means cell, an image without
  foreground tags, memory entries, fallback pixels, and a pool with no negatives.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import GOLDEN_DIR, load_golden
from spml_deploy.config import VOID, CompatConfig, LossConfig, SegmentationConfig
from spml_deploy.errors import TrainingError
from spml_deploy.engine.kmeans import kmeans_clusters
from spml_deploy.engine.prototypes import form_segments, resize_labels_nearest
from spml_deploy.training.spml_loss import (AFFINITY_PHI_SCALE, AFFINITY_THRESHOLD, MemoryBank,
                                            SegmentPool, image_similarity_loss, spml_losses)

OFFICIAL = CompatConfig(set_empty_tag_double_count=True)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread avoids thread hand-off overhead on busy CI
    machines (several times faster here); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# golden


def _golden_step(name: str, dtype: torch.dtype, compat: CompatConfig = OFFICIAL,
                 with_grads: bool = True):
    g = load_golden(name)
    meta = json.loads(str(g["__meta__"]))
    emb = torch.tensor(g["embedding"], dtype=dtype, requires_grad=True)
    b, _, h, w = emb.shape
    labels = resize_labels_nearest(torch.tensor(g["semantic_label"]), (h, w))
    regions = resize_labels_nearest(torch.tensor(g["instance_label"]), (h, w))
    np.testing.assert_array_equal(labels.numpy(), g["semantic_label_small"])
    np.testing.assert_array_equal(regions.numpy(), g["instance_label_small"])
    ka, kc, ki = (float(v) for v in g["concentrations"])
    la, lc, li = (float(v) for v in g["loss_weights"])
    loss_cfg = LossConfig(kappa_i=ki, kappa_a=ka, kappa_c=kc, lambda_i=li, lambda_a=la,
                          lambda_c=lc, lambda_o=0.0)
    seg_cfg = SegmentationConfig(train_grid=(6, 6), kmeans_iters=10, memory_size=2)
    memory = MemoryBank(2)
    start = 0
    for size in g["memory_sizes"]:             # older entry first, as the official bank
        sl = slice(start, start + int(size))
        start += int(size)
        memory.push(SegmentPool(mu=torch.tensor(g["memory_prototype"][sl]),
                                label=torch.tensor(g["memory_prototype_semantic_label"][sl]),
                                tags=torch.tensor(g["memory_prototype_semantic_tag"][sl]),
                                batch=torch.tensor(g["memory_prototype_batch_index"][sl])))
    out = spml_losses(emb, labels, regions, torch.tensor(g["semantic_tag"]), loss_cfg, seg_cfg,
                      compat, memory, meta["config"]["num_classes"], update_memory=False)
    grads = {}
    parts = (("img_sim", li * out["L_I"]), ("sem_ann", la * out["L_A"]),
             ("sem_occ", lc * out["L_C"]), ("total", out["loss"]))
    for key, part in parts if with_grads else ():
        (gr,) = torch.autograd.grad(part, emb, retain_graph=True)
        grads[f"grad_embedding_{key}"] = gr.double().numpy()
    ce = float(g["classifier_ce"])             # the official f0 term, log(21) with a zeroed conv
    res = {k: out[k].detach().double().numpy() for k in ("L_I", "L_A", "L_C")}
    res.update(img_sim_loss=li * res["L_I"], sem_ann_loss=la * (ce + res["L_A"]),
               sem_occ_loss=lc * res["L_C"],
               total_loss=out["loss"].detach().double().numpy() + la * ce, **grads)
    return g, out, res


@pytest.mark.parametrize("name", ["losses_voc_scribble_unl21", "losses_voc_scribble_unl255"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_golden_losses(name, dtype, rtol, golden_compare):
    g, out, res = _golden_step(name, dtype)
    assert out["num_segments"] == g["prototype"].shape[0]
    assert out["num_memory"] == g["memory_prototype"].shape[0]
    assert out["num_pixels"] == g["pixel_index"].shape[0]
    rows = golden_compare.compare_case(str(GOLDEN_DIR / f"{name}.npz"), res, rtol=rtol,
                                       keys=list(res))
    bad = [(r["key"], r.get("rel_l2")) for r in rows if r["status"] != "ok"]
    assert len(rows) == len(res) and not bad, bad


def test_golden_subtractive_is_bit_close():
    """With compat.subtractive_positive_sum the official float64 arithmetic is reproduced; the
    log-domain L_I differs from it by the official cancellation error only (~1e-10 here)."""
    g, _, res = _golden_step("losses_voc_scribble_unl255", torch.float64,
                             replace(OFFICIAL, subtractive_positive_sum=True))
    for key in ("L_I", "L_A", "L_C", "grad_embedding_total"):
        err = np.linalg.norm(res[key] - g[key]) / np.linalg.norm(g[key])
        assert err < 1e-12, (key, err)


def test_golden_paper_default_skips_tagless_pixels():
    """Default compat (skip all-zero tag rows) changes L_C only, and only through image 1
    (background strokes only): L_C becomes the mean over the pixels of the tagged images."""
    g, out_off, _ = _golden_step("losses_voc_scribble_unl21", torch.float64, with_grads=False)
    _, out_def, _ = _golden_step("losses_voc_scribble_unl21", torch.float64, CompatConfig(),
                                 with_grads=False)
    for key in ("L_I", "L_A"):
        assert float(out_def[key].detach()) == float(out_off[key].detach())
    assert abs(float(out_def["L_C"].detach()) - float(out_off["L_C"].detach())) > 1e-3


def test_unlabeled_as_void_equals_recoding():
    g = load_golden("losses_voc_scribble_unl21")
    emb = torch.tensor(g["embedding"][:2])
    labels = torch.tensor(g["semantic_label_small"][:2])
    regions = torch.tensor(g["instance_label_small"][:2])
    tags = torch.tensor(g["semantic_tag"][:2])
    cfg, seg = LossConfig(), SegmentationConfig()
    recoded = torch.where(labels == 21, torch.full_like(labels, VOID), labels)
    a = spml_losses(emb, labels, regions, tags, cfg, seg, CompatConfig(unlabeled_as_void=True), None, 21)
    b = spml_losses(emb, recoded, regions, tags, cfg, seg, CompatConfig(), None, 21)
    c = spml_losses(emb, labels, regions, tags, cfg, seg, CompatConfig(), None, 21)
    for key in ("L_I", "L_A", "L_C"):
        assert float(a[key]) == float(b[key])
    assert a["num_pixels"] < c["num_pixels"] and a["num_segments"] < c["num_segments"]


# ----------------------------------------------------------------------------------------------
# slow reference from spec section 5


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.clamp(v.norm(), min=1e-12)


def _pixel_loss(f, protos, kappa, pos, neg, own, stats=None):
    """Spec 4 for one pixel: NCA over the other positives, else the own segment."""
    e = torch.exp(kappa * (protos @ f))
    others = [s for s in pos if s != own]
    if stats is not None:
        stats["nca" if others else "fallback"] += 1
    num = e[others].sum() if others else e[own]
    den = num + (e[neg].sum() if neg else torch.zeros((), dtype=f.dtype))
    return -torch.log(num / den)


def reference_step(e, labels, regions, tags, cfg: LossConfig, seg: SegmentationConfig,
                   compat: CompatConfig, mem: SegmentPool | None, C: int, stats=None):
    """Literal spec 3.6 / 5 with python loops over pixels (segments from the core k-means)."""
    B, D, h, w = e.shape
    labels = labels.clone()
    if compat.unlabeled_as_void:
        labels[labels >= C] = VOID
    clusters = kmeans_clusters(e, labels != VOID, seg.train_grid, seg.kmeans_iters,
                               zero_centroid_for_empty=compat.zero_centroid_for_empty)
    segs = form_segments(clusters, labels, regions)
    S = segs.num_segments
    pixels = []                                             # (b, r, c, own)
    for b in range(B):
        for r in range(h):
            for c in range(w):
                if int(segs.index[b, r, c]) >= 0:
                    pixels.append((b, r, c, int(segs.index[b, r, c])))
    phi = {p[:3]: _unit(e[p[0], :, p[1], p[2]]) for p in pixels}
    loc = {p[:3]: torch.tensor([p[1] / (h - 1) - 0.5, p[2] / (w - 1) - 0.5], dtype=e.dtype)
           for p in pixels}
    psi = {k: _unit(torch.cat([phi[k], loc[k]])) for k in phi}
    members = [[p[:3] for p in pixels if p[3] == s] for s in range(S)]
    mu = torch.stack([_unit(sum(phi[k] for k in m)) for m in members])
    nu = torch.stack([_unit(sum(psi[k] for k in m)) for m in members])
    seg_b, seg_l, seg_o = segs.batch.tolist(), segs.label.tolist(), segs.region.tolist()

    # (I)
    per_image = []
    for b in range(B):
        pool = [s for s in range(S) if seg_b[s] == b]
        losses = []
        for (pb, r, c, own) in pixels:
            if pb != b:
                continue
            pos = [s for s in pool if seg_o[s] == int(regions[b, r, c])]
            neg = [s for s in pool if seg_o[s] != int(regions[b, r, c])]
            losses.append(_pixel_loss(psi[(b, r, c)], nu, cfg.kappa_i, pos, neg, own, stats))
        if losses:
            per_image.append(torch.stack(losses).mean())
    L_I = torch.stack(per_image).mean()

    # pool for A, C, O: current then memory
    all_mu = mu if mem is None else torch.cat([mu, mem.mu])
    all_lab = seg_l + ([] if mem is None else mem.label.tolist())
    all_tags = [tags[b] for b in seg_b] + ([] if mem is None else list(mem.tags))
    P = all_mu.shape[0]

    # (A)
    labelled_pool = [s for s in range(P) if all_lab[s] < C]
    la = []
    for (b, r, c, own) in pixels:
        y = int(labels[b, r, c])
        if y >= C:
            continue
        pos = [s for s in labelled_pool if all_lab[s] == y]
        neg = [s for s in labelled_pool if all_lab[s] != y]
        la.append(_pixel_loss(phi[(b, r, c)], all_mu, cfg.kappa_a, pos, neg, own, stats))
    L_A = torch.stack(la).mean()

    # (C): tags as python sets of foreground classes
    fg = [frozenset(torch.nonzero(t[1:]).flatten().tolist()) for t in all_tags]
    lc = []
    for (b, r, c, own) in pixels:
        ti = frozenset(torch.nonzero(tags[b][1:]).flatten().tolist())
        if not ti and not compat.set_empty_tag_double_count:
            continue                                       # no co-occurrence positive: skipped
        pos = [s for s in range(P) if ti & fg[s]]
        neg = [s for s in range(P) if not ti & fg[s]]
        lc.append(_pixel_loss(phi[(b, r, c)], all_mu, cfg.kappa_c, pos, neg, own, stats))
    L_C = torch.stack(lc).mean()

    # (O): same-image top-1 propagation on normalize(sum [0.1 phi; loc]), threshold 0.95
    L_O = torch.zeros((), dtype=e.dtype)
    if cfg.lambda_o > 0 and not compat.disable_feature_affinity:
        prop = torch.stack([_unit(sum(torch.cat([AFFINITY_PHI_SCALE * phi[k], loc[k]]) for k in m))
                            for m in members]).detach()
        all_prop = prop if mem is None else torch.cat([prop, mem.prop])
        all_img = seg_b + ([] if mem is None else mem.batch.tolist())
        cos = (all_prop @ all_prop.t()).tolist()
        expanded = []                                      # label set of each pool segment
        for s in range(P):
            cand = [j for j in range(P) if all_img[j] == all_img[s] and all_lab[j] < C]
            t = frozenset(range(C))                        # neutral: no confident neighbour
            if cand:
                best = max(cand, key=lambda j: (cos[s][j], -j))
                if cos[s][best] >= AFFINITY_THRESHOLD:
                    t = frozenset([all_lab[best]])
            expanded.append(t)
        lo = []
        for (b, r, c, own) in pixels:
            pos = [s for s in range(P) if expanded[own] & expanded[s]]
            neg = [s for s in range(P) if not expanded[own] & expanded[s]]
            lo.append(_pixel_loss(phi[(b, r, c)], all_mu, cfg.kappa_o, pos, neg, own, stats))
        L_O = torch.stack(lo).mean()
        if stats is not None:
            stats["accepted"] = sum(len(t) == 1 for t in expanded)
            stats["neutral"] = sum(len(t) == C for t in expanded)
    total = cfg.lambda_i * L_I + cfg.lambda_a * L_A + cfg.lambda_c * L_C + cfg.lambda_o * L_O
    return {"L_I": L_I, "L_A": L_A, "L_C": L_C, "L_O": L_O, "loss": total, "num_segments": S}


C_SMALL = 4


def _random_batch(seed: int, h: int = 10, w: int = 10, shared_tag: bool = False,
                  rare: bool = False):
    """3 images, C = 4, unlabelled codes 4 and 7, a void band, a fully void grid cell (empty
    k-means cluster), an image with background strokes only (no foreground tag), regions of
    several sizes (small ones lie inside one segment: fallback pixels in I); ``rare`` adds a
    one-pixel class-2 stroke (its only positive is its own segment in A)."""
    gen = torch.Generator().manual_seed(seed)
    B, D = 3, 4
    e = torch.randn(B, D, h, w, generator=gen, dtype=torch.float64)
    e[:, 0] += torch.linspace(-1, 1, w, dtype=torch.float64)      # some spatial structure
    labels = torch.where(torch.rand(B, h, w, generator=gen) < 0.5, 4, 7)
    labels[1] = 4
    labels[0, 3:5, :] = 1
    labels[0, 7, 2:8] = 0
    if rare:
        labels[0, 8, 8] = 2
    labels[1, 2:4, :] = 0                                         # background only
    labels[2, 5:, 5:] = 3
    labels[2, 6, 1:4] = 0
    labels[:, :, -1] = VOID                                       # padding band
    labels[2, :3, :3] = VOID                                      # empty first grid cell
    labels[0, 5, 5] = VOID
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    regions = torch.stack([(rows // 4) * 3 + cols // 4, (rows // 2) * 5 + cols // 2,
                           (rows // 5) * 2 + cols // 5]) + 10 * torch.arange(B)[:, None, None]
    tags = torch.zeros(B, C_SMALL)
    for b in range(B):
        present = labels[b].unique()
        tags[b, present[(present > 0) & (present < C_SMALL)]] = 1
    if shared_tag:
        tags[:, 1] = 1
    return e, labels, regions, tags


SEG = SegmentationConfig(train_grid=(3, 3), kmeans_iters=4, memory_size=2)


def _compare_with_reference(cfg: LossConfig, compat: CompatConfig, with_memory: bool,
                            shared_tag: bool = False):
    memory = MemoryBank(2)
    if with_memory:                                               # two earlier iterations
        for seed in (21, 22):
            e0, l0, r0, t0 = _random_batch(seed, shared_tag=shared_tag)
            spml_losses(e0, l0, r0, t0, cfg, SEG, compat, memory, C_SMALL)
        assert len(memory) == 2
    e, labels, regions, tags = _random_batch(3, shared_tag=shared_tag, rare=True)
    e_ref = e.clone().requires_grad_(True)
    stats = {"nca": 0, "fallback": 0}
    ref = reference_step(e_ref, labels, regions, tags, cfg, SEG, compat, memory.entries(),
                         C_SMALL, stats)
    e_fast = e.clone().requires_grad_(True)
    fast = spml_losses(e_fast, labels, regions, tags, cfg, SEG, compat, memory, C_SMALL,
                       update_memory=False)
    assert fast["num_segments"] == ref["num_segments"]
    for key in ("L_I", "L_A", "L_C", "L_O", "loss"):
        torch.testing.assert_close(fast[key].detach(), ref[key].detach(), rtol=1e-11, atol=1e-12)
    (g_ref,) = torch.autograd.grad(ref["loss"], e_ref)
    (g_fast,) = torch.autograd.grad(fast["loss"], e_fast)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)
    assert float(g_fast.abs().sum()) > 0
    return fast, stats


@pytest.mark.parametrize("compat", [CompatConfig(), OFFICIAL, CompatConfig(unlabeled_as_void=True)],
                         ids=["paper", "official", "unl_void"])
def test_step_matches_reference(compat):
    cfg = LossConfig(kappa_i=16, kappa_a=6, kappa_c=12, lambda_i=0.1, lambda_a=1.0, lambda_c=0.5)
    fast, stats = _compare_with_reference(cfg, compat, with_memory=True)
    assert stats["nca"] > 0 and stats["fallback"] > 0           # both branches exercised
    assert fast["num_memory"] > 0


def test_step_with_feature_affinity_matches_reference():
    cfg = LossConfig(kappa_i=16, kappa_a=6, kappa_c=12, kappa_o=12, lambda_i=1.0, lambda_a=1.0,
                     lambda_c=1.0, lambda_o=0.5)
    fast, stats = _compare_with_reference(cfg, CompatConfig(), with_memory=True)
    assert stats["accepted"] > 0 and stats["neutral"] > 0
    assert float(fast["L_O"].detach()) > 0
    off = spml_losses(*_random_batch(3), cfg, SEG, CompatConfig(disable_feature_affinity=True),
                      None, C_SMALL)
    assert float(off["L_O"]) == 0.0


def test_pool_without_negatives():
    """Every image (and memory image) shares a tag: (C) has no negatives and is exactly 0."""
    cfg = LossConfig(lambda_i=0.1, lambda_a=1.0, lambda_c=0.5)
    fast, _ = _compare_with_reference(cfg, CompatConfig(), with_memory=True, shared_tag=True)
    assert float(fast["L_C"].detach()) == 0.0


def test_fully_void_image_and_empty_batch():
    """A padding-only image contributes nothing and leaves every gradient finite (zero on it);
    an all-void batch gives differentiable zeros."""
    e, labels, regions, tags = _random_batch(9)
    labels[1] = VOID
    cfg = LossConfig()
    x = e.clone().requires_grad_(True)
    full = spml_losses(x, labels, regions, tags, cfg, SEG, CompatConfig(), None, C_SMALL)
    (g,) = torch.autograd.grad(full["loss"], x)
    assert torch.isfinite(g).all() and float(g[1].abs().max()) == 0.0
    keep = [0, 2]
    part = spml_losses(e[keep], labels[keep], regions[keep], tags[keep], cfg, SEG, CompatConfig(),
                       None, C_SMALL)
    for key in ("L_I", "L_A", "L_C"):
        torch.testing.assert_close(full[key].detach(), part[key], rtol=1e-12, atol=1e-14)
    x = e.clone().requires_grad_(True)
    empty = spml_losses(x, torch.full_like(labels, VOID), regions, tags, cfg, SEG, CompatConfig(),
                        MemoryBank(2), C_SMALL)
    assert empty["num_segments"] == 0 and float(empty["loss"].detach()) == 0.0
    (g,) = torch.autograd.grad(empty["loss"], x)
    assert float(g.abs().max()) == 0.0


def test_chunked_step_equals_unchunked():
    e, labels, regions, tags = _random_batch(4)
    cfg = LossConfig(lambda_o=0.5)
    outs = []
    for chunk in (None, 23):
        x = e.clone().requires_grad_(True)
        r = spml_losses(x, labels, regions, tags, cfg, SEG, CompatConfig(), None, C_SMALL,
                        chunk_size=chunk)
        outs.append((r["loss"].detach(), *torch.autograd.grad(r["loss"], x)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_float32_close_to_float64():
    e, labels, regions, tags = _random_batch(5)
    cfg = LossConfig()
    r64 = spml_losses(e, labels, regions, tags, cfg, SEG, CompatConfig(), None, C_SMALL)
    r32 = spml_losses(e.float(), labels, regions, tags, cfg, SEG, CompatConfig(), None, C_SMALL)
    assert r32["num_segments"] == r64["num_segments"]
    for key in ("L_I", "L_A", "L_C"):
        assert r32[key].dtype == torch.float32
        torch.testing.assert_close(r32[key].double(), r64[key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# fused implementation against the generic autograd implementation


def _image_similarity_inputs(seed: int):
    """4 images of 30 pixels: segments per image 5, 1, 0 (no segment, no kept pixel) and 8;
    regions with gaps in their ids, several segments per region (NCA pixels), single-segment
    regions (fallback pixels) and non-kept pixels."""
    gen = torch.Generator().manual_seed(seed)
    b, n, f = 4, 30, 5
    per_image = [5, 1, 0, 8]
    seg_batch = torch.repeat_interleave(torch.arange(b), torch.tensor(per_image))
    s = int(seg_batch.numel())
    seg_region = torch.randint(0, 4, (s,), generator=gen) * 7 + 3
    protos = torch.nn.functional.normalize(torch.randn(s, f, generator=gen, dtype=torch.float64),
                                           dim=1)
    start = torch.tensor([0, 5, 6, 6])
    own = torch.zeros(b, n, dtype=torch.long)
    kept = torch.rand(b, n, generator=gen) < 0.8
    kept[2] = False
    for i, k in enumerate(per_image):
        if k:
            own[i] = start[i] + torch.randint(0, k, (n,), generator=gen)
    pix_region = torch.where(kept, seg_region[own.clamp(max=s - 1)], torch.full_like(own, 99))
    feat = torch.nn.functional.normalize(torch.randn(b, n, f, generator=gen, dtype=torch.float64)
                                         + 2 * protos[own.clamp(max=s - 1)], dim=2)
    return feat, kept, own, pix_region, protos, seg_batch, seg_region


@pytest.mark.parametrize("seed", [0, 1])
def test_image_similarity_fused_matches_generic(seed):
    feat, kept, own, pix_region, protos, seg_batch, seg_region = _image_similarity_inputs(seed)
    results = []
    for impl, chunk in (("generic", None), ("fused", None), ("fused", 4)):
        f = feat.clone().requires_grad_(True)
        m = protos.clone().requires_grad_(True)
        loss = image_similarity_loss(f, kept, own, pix_region, m, seg_batch, seg_region, 16.0,
                                     chunk_size=chunk, impl=impl)
        results.append((loss.detach(), *torch.autograd.grad(loss, (f, m))))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert float(results[1][1][2].abs().max()) == 0.0          # image without segments
    assert float(results[1][1][~kept].abs().max()) == 0.0      # non-kept pixels


@pytest.mark.parametrize("compat", [CompatConfig(), OFFICIAL], ids=["paper", "official"])
def test_step_fused_matches_generic(compat):
    """The whole step (I, A, C, O with memory) in float64: same losses and gradients."""
    cfg = LossConfig(kappa_i=16, kappa_a=6, kappa_c=12, kappa_o=12, lambda_i=0.1, lambda_a=1.0,
                     lambda_c=0.5, lambda_o=0.5)
    memory = MemoryBank(2)
    for seed in (21, 22):
        spml_losses(*_random_batch(seed), cfg, SEG, compat, memory, C_SMALL)
    e, labels, regions, tags = _random_batch(3, rare=True)
    outs = {}
    for impl in ("generic", "fused"):
        x = e.clone().requires_grad_(True)
        r = spml_losses(x, labels, regions, tags, cfg, SEG, compat, memory, C_SMALL,
                        update_memory=False, loss_impl=impl)
        outs[impl] = (r, torch.autograd.grad(r["loss"], x)[0])
    (fused, g_fused), (generic, g_generic) = outs["fused"], outs["generic"]
    assert fused["num_memory"] > 0
    for key in ("L_I", "L_A", "L_C", "L_O", "loss"):
        torch.testing.assert_close(fused[key].detach(), generic[key].detach(), rtol=1e-11,
                                   atol=1e-13)
    assert float(fused["L_O"].detach()) > 0
    torch.testing.assert_close(g_fused, g_generic, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# memory bank


def test_memory_bank_fifo_ids_and_state():
    e, labels, regions, tags = _random_batch(6)
    x = e.clone().requires_grad_(True)
    memory = MemoryBank(2)
    sizes = []
    for _ in range(3):
        spml_losses(x, labels, regions, tags, LossConfig(), SEG, CompatConfig(), memory, C_SMALL)
        sizes.append(len(memory))
    assert sizes == [1, 2, 2]
    mem = memory.entries()
    assert not mem.mu.requires_grad and not mem.nu.requires_grad
    assert int(mem.batch.max()) < 0                              # never a current image id
    halves = mem.batch.split(len(mem) // 2)
    assert set(halves[0].tolist()).isdisjoint(halves[1].tolist())  # distinct per iteration
    clone = MemoryBank(2)
    clone.load_state_dict(memory.state_dict())
    torch.testing.assert_close(clone.entries().mu, mem.mu)
    assert clone._next_id == memory._next_id
    off = MemoryBank(0)
    spml_losses(x, labels, regions, tags, LossConfig(), SEG, CompatConfig(), off, C_SMALL)
    assert len(off) == 0 and off.entries() is None


def test_memory_is_read_before_it_is_updated():
    e, labels, regions, tags = _random_batch(7)
    memory = MemoryBank(1)
    first = spml_losses(e, labels, regions, tags, LossConfig(), SEG, CompatConfig(), memory, C_SMALL)
    again = spml_losses(e, labels, regions, tags, LossConfig(), SEG, CompatConfig(), memory, C_SMALL)
    assert first["num_memory"] == 0 and again["num_memory"] == first["num_segments"]
    fresh = spml_losses(e, labels, regions, tags, LossConfig(), SEG, CompatConfig(), None, C_SMALL)
    assert float(first["L_A"]) == float(fresh["L_A"])
    assert float(again["L_A"]) != float(first["L_A"])


def test_bad_shapes_raise():
    e, labels, regions, tags = _random_batch(8)
    with pytest.raises(TrainingError, match="embedding grid"):
        spml_losses(e, labels[:, :5], regions, tags, LossConfig(), SEG, CompatConfig(), None, C_SMALL)
