"""Random-walk refinement (spec 7.2): every formulation against a float64 reference written
directly from the equations, hand-computed small cases, the top-k certificate, and the recipe."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spml_deploy.engine import chebyshev_walk as CW
from spml_deploy.engine import refine as R

BETA, ALPHA = 5.0, 20.0


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread for this module: the walks here are chains of many small products, which
    on a machine whose cores are shared with other jobs spend most of their time waiting for
    each other's threads (results do not depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clustered(batch: int, h: int, w: int, sigma: float, C: int = 21, K: int = 5, D: int = 64,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Realistic walk inputs: K Voronoi regions, each a random unit direction plus noise of
    std ``sigma`` (within-region cosine ~ 1 / (1 + sigma^2)); noisy softmax scores favouring
    each region's class; per-class max normalised. Returns scores [B, C, N] float32, unit phi
    [B, D, N] float32 and the region class [B, N]."""
    g = torch.Generator().manual_seed(seed)
    N = h * w
    cy, cx = torch.rand(batch, K, 1, generator=g) * h, torch.rand(batch, K, 1, generator=g) * w
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    reg = ((yy.reshape(1, 1, N) - cy) ** 2 + (xx.reshape(1, 1, N) - cx) ** 2).argmin(1)
    protos = F.normalize(torch.randn(batch, K, D, generator=g), dim=2)
    e = protos.gather(1, reg[..., None].expand(batch, N, D))
    e = e + sigma * torch.randn(batch, N, D, generator=g) / math.sqrt(D)
    phi = F.normalize(e, dim=2).transpose(1, 2).contiguous()
    lab = torch.randint(0, C, (batch, K), generator=g).gather(1, reg)
    logits = torch.randn(batch, C, N, generator=g) + 2.0 * F.one_hot(lab, C).permute(0, 2, 1)
    p = logits.softmax(1)
    return p / p.amax(2, keepdim=True), phi, lab


def reference_walk(scores: torch.Tensor, phi: torch.Tensor, steps: int = 64) -> torch.Tensor:
    """Spec 7.2 written out in numpy float64: A, column normalisation, T^steps, M T*."""
    out = []
    for m, p in zip(scores.double().numpy(), phi.double().numpy()):
        a = np.exp(BETA * (p.T @ p - 1.0)) ** ALPHA
        t = a / a.sum(axis=0, keepdims=True)
        out.append(m @ np.linalg.matrix_power(t, steps))
    return torch.from_numpy(np.stack(out))


# --------------------------------------------------------------------------------------------
# affinity and transition


def test_affinity_values_and_normalisation():
    phi = F.normalize(torch.randn(2, 8, 10, dtype=torch.float64), dim=1)
    A = R.affinity(phi)
    cos = phi.transpose(1, 2) @ phi
    torch.testing.assert_close(A, torch.exp(100.0 * (cos - 1.0)), rtol=1e-12, atol=0)
    torch.testing.assert_close(A, A.transpose(1, 2))
    T = R.transition(phi)
    torch.testing.assert_close(T.sum(1), torch.ones(2, 10, dtype=torch.float64))
    # min_affinity drops exactly the small entries
    A2 = R.affinity(phi, min_affinity=1e-3)
    assert torch.equal(A2 == 0, A < 1e-3)


def test_affinity_averages_passes():
    phi1 = F.normalize(torch.randn(1, 6, 12, dtype=torch.float64), dim=1)
    phi2 = F.normalize(torch.randn(1, 6, 12, dtype=torch.float64), dim=1)
    A = R.affinity([phi1, phi2])
    torch.testing.assert_close(A, (R.affinity(phi1) + R.affinity(phi2)) / 2)


def test_two_cell_walk_by_hand():
    # cos = 0.99: a = exp(100 * -0.01) = e^-1; T = [[1, a], [a, 1]] / (1 + a), eigenvalues 1 and
    # lam = (1 - a) / (1 + a); a row [m1, m2] walks to mean +- (m1 - m2) / 2 * lam^s.
    c = 0.99
    phi = torch.tensor([[[1.0, c], [0.0, math.sqrt(1 - c * c)]]], dtype=torch.float64)
    M = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]], dtype=torch.float64)
    a = math.exp(-1.0)
    lam = (1 - a) / (1 + a)

    def expected(s: int) -> torch.Tensor:
        mean = M.mean(2, keepdim=True)
        half = (M[..., :1] - M[..., 1:]) / 2 * lam ** s
        return torch.cat([mean + half, mean - half], dim=2)

    torch.testing.assert_close(R.random_walk_dense(M, phi, squarings=3), expected(8))
    torch.testing.assert_close(R.random_walk_steps(M, phi, steps=1), expected(1))
    torch.testing.assert_close(R.random_walk_steps(M, phi, steps=0), M)
    for method in R.METHODS:  # tol: the Chebyshev walk's certified budget (exact at 1e-12)
        torch.testing.assert_close(R.random_walk(M, phi, method=method, tol=1e-12), expected(64))
    # at the default tol the Chebyshev walk is within its certified bound of the exact walk
    out, report = R.random_walk(M, phi, method="chebyshev", return_report=True)
    assert (out - expected(64)).abs().max() <= report.bounds[0] + 1e-12


# --------------------------------------------------------------------------------------------
# formulations vs the reference

# within-region cosine ~ 1 / (1 + sigma^2): 0.92 (tight), 0.83, 0.74, 0.5 (loose), 0 (random)
REGIMES = {"tight": 0.3, "mid": 0.45, "medium": 0.6, "loose": 1.0, "random": 100.0}


@functools.lru_cache(maxsize=None)
def case32(regime: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One realistic 32x32 (N = 1024) input per regime and its float64 reference walk."""
    M, phi, _ = clustered(1, 32, 32, REGIMES[regime], seed=11)
    return M, phi, reference_walk(M, phi)


@pytest.mark.parametrize("regime", ["tight"])
def test_dense_and_matvec_match_reference_32x32(regime):
    M, phi, ref = case32(regime)
    for method in ("dense", "matvec"):
        out64 = R.random_walk(M.double(), phi.double(), method=method)
        assert (out64 - ref).abs().max() <= 1e-9, method
        out32 = R.random_walk(M, phi, method=method)
        assert out32.dtype == torch.float32
        assert (out32.double() - ref).abs().max() <= 1e-4, method
        assert torch.equal(out32.argmax(1), ref.argmax(1))
    assert ref.min() >= 0 and ref.max() <= 1 + 1e-12  # averages of [0, 1] scores


def test_steps_mode_is_one_product():
    M, phi, _ = clustered(2, 8, 8, 0.5, C=4, seed=2)
    T = R.transition(phi.double())
    out = R.random_walk_steps(M.double(), phi.double(), steps=1, min_affinity=0.0)
    torch.testing.assert_close(out, M.double() @ T)
    out3 = R.random_walk_steps(M.double(), phi.double(), steps=3, min_affinity=0.0)
    torch.testing.assert_close(out3, M.double() @ T @ T @ T)


@pytest.mark.parametrize("regime", ["tight", "mid", "medium", "loose"])
def test_topk_certificate_bounds_the_error(regime):
    M, phi, ref = case32(regime)
    out, report = R.random_walk(M.double(), phi.double(), method="topk", k=32, return_report=True)
    assert report.methods == ["topk"]
    err = (out - ref).abs().max().item()
    assert err <= report.bounds[0] + 1e-9, (err, report.bounds[0])


def test_topk_stated_tolerances():
    # well separated neighbourhoods: certified, and within 1e-4
    M, phi, ref = case32("loose")
    out, report = R.random_walk(M, phi, method="topk", k=32, return_report=True)
    assert report.bounds[0] <= 1e-4
    assert (out.double() - ref).abs().max() <= 1e-4
    # clustered embeddings: a real approximation, but argmax labels agree on >= 97% of cells
    for regime in ("tight", "mid"):
        M, phi, ref = case32(regime)
        out = R.random_walk(M, phi, method="topk", k=32)
        assert (out.double() - ref).abs().max() > 1e-3, regime
        agree = (out.argmax(1) == ref.argmax(1)).double().mean().item()
        assert agree >= 0.97, (regime, agree)
    # k >= N keeps everything: exact
    M, phi, _ = clustered(1, 4, 4, 0.3, seed=4)
    out = R.random_walk(M.double(), phi.double(), method="topk", k=64)
    assert (out - reference_walk(M, phi)).abs().max() <= 1e-9


def test_auto_on_cpu_picks_per_image_and_stays_within_tol():
    (Mt, pt, rt), (Ml, pl, rl) = case32("tight"), case32("loose")
    M, phi, ref = torch.cat([Mt, Ml]), torch.cat([pt, pl]), torch.cat([rt, rl])
    out, report = R.random_walk(M, phi, method="auto", tol=1e-4, return_report=True)
    # clustered: dense affinity; well separated: thresholded sparse affinity
    assert report.methods == ["chebyshev", "chebyshev-sparse"]
    assert max(report.bounds) <= 5e-5  # tol / 2
    err = (out.double() - ref).abs().amax(dim=(1, 2))
    assert (err <= torch.tensor(report.bounds, dtype=torch.float64) + 2e-5).all()
    assert err.max() <= 1e-4
    assert torch.equal(out.argmax(1), ref.argmax(1))
    # small grids (N <= 400) use the dense squarings
    _, small = R.random_walk(M[:, :2, :40], phi[:, :, :40], method="auto", return_report=True)
    assert small.methods == ["dense", "dense"]


# --------------------------------------------------------------------------------------------
# the Chebyshev walk


def test_power_coefficients_reproduce_the_power():
    for steps in (1, 8, 64):
        for lower in (0.0, R.CHEB_LOWER):
            c, tails = CW._power_coeffs(steps, lower)
            x = np.linspace(lower, 1.0, 101)
            y = (2 * x - 1 - lower) / (1 - lower)
            np.testing.assert_allclose(np.polynomial.chebyshev.chebval(y, c), x ** steps,
                                       rtol=0, atol=1e-13)
            assert min(c) >= -1e-14 and tails[-1] == 0.0
            assert all(a >= b for a, b in zip(tails, tails[1:]))
    # the truncated series whose c_0 takes the tail: p(1) = 1 and max |p - x^64| <= tails[m],
    # and the bound is not loose by more than 2x
    c, tails = CW._power_coeffs(64, R.CHEB_LOWER)
    x = np.linspace(R.CHEB_LOWER, 1.0, 200001)
    y = (2 * x - 1 - R.CHEB_LOWER) / (1 - R.CHEB_LOWER)
    for m in (10, 20, 27):
        cm = np.array(c[: m + 1])
        cm[0] += tails[m] / 2
        assert abs(np.polynomial.chebyshev.chebval(1.0, cm) - 1.0) < 1e-14
        err = np.abs(np.polynomial.chebyshev.chebval(y, cm) - x ** 64).max()
        assert tails[m] / 2 <= err <= tails[m]
    # the degree is the smallest that meets the target, far below the 64 steps
    for target in (1e-3, 1e-6, 1e-9):
        m = R.chebyshev_degree(64, target)
        assert tails[m] <= target < tails[m - 1]
    assert R.chebyshev_degree(64, 1e-6) <= 30
    assert R.chebyshev_degree(64, 0.0) == 64 and R.chebyshev_degree(5, 1e-30) == 5


def test_chebyshev_series_is_the_polynomial_of_the_transition():
    # T = D^1/2 S D^-1/2 with S symmetric: x p(T) through the eigendecomposition of S
    g = torch.Generator().manual_seed(3)
    phi = F.normalize(torch.randn(1, 4, 12, generator=g, dtype=torch.float64), dim=1)
    A = R.affinity(phi, beta=1.0, alpha=1.0)[0]  # a PSD kernel with strong off-diagonal mass
    d = A.sum(0)
    x = torch.rand(1, 3, 12, generator=g, dtype=torch.float64)
    lam, V = torch.linalg.eigh(A / torch.outer(d.sqrt(), d.sqrt()))
    assert lam.min() >= -1e-12 and lam.max() <= 1 + 1e-12
    c, tails = CW._power_coeffs(16, R.CHEB_LOWER)
    for m in (3, 9, 16):
        cm = np.array(c[: m + 1])
        cm[0] += tails[m] / 2
        plam = torch.from_numpy(np.polynomial.chebyshev.chebval(
            (2 * lam.numpy() - 1 - R.CHEB_LOWER) / (1 - R.CHEB_LOWER), cm))
        pT = d.sqrt()[:, None] * (V * plam) @ V.T / d.sqrt()[None, :]
        out = CW._chebyshev_series(x, lambda v: v @ A.T, 1.0 / d, 16, m, R.CHEB_LOWER)
        torch.testing.assert_close(out[0], x[0] @ pT, atol=1e-12, rtol=0)
    exact = x[0] @ torch.linalg.matrix_power(A / d[None, :], 16)
    torch.testing.assert_close(out[0], exact, atol=1e-12, rtol=0)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_chebyshev_within_certified_bound_32x32(regime):
    M, phi, ref = case32(regime)
    for sparse in (True, False):
        report = R.WalkReport()
        out64 = R.random_walk_chebyshev(M.double(), phi.double(), sparse=sparse, report=report)
        err = (out64 - ref).abs().max().item()
        assert report.bounds[0] <= 5e-5 and err <= report.bounds[0] + 1e-9, (sparse, err, report)
        if not sparse:
            assert report.methods == ["chebyshev"]
        report = R.WalkReport()
        out32 = R.random_walk_chebyshev(M, phi, sparse=sparse, report=report)
        assert out32.dtype == torch.float32
        err32 = (out32.double() - ref).abs().max().item()
        assert err32 <= report.bounds[0] + 2e-5 and err32 <= 1e-4, (sparse, err32)
        assert torch.equal(out32.argmax(1), ref.argmax(1))
    # the thresholded sparse affinity where the walk is local, dense where it mixes
    _, rep = R.random_walk(M, phi, method="chebyshev", return_report=True)
    assert rep.methods == ["chebyshev" if regime in ("tight", "mid") else "chebyshev-sparse"]


def test_chebyshev_tolerance_is_the_knob():
    M, phi, ref = case32("tight")
    errs = []
    for tol in (1e-2, 1e-4, 1e-8):
        out, report = R.random_walk(M.double(), phi.double(), method="chebyshev", tol=tol,
                                    return_report=True)
        err = (out - ref).abs().max().item()
        assert err <= report.bounds[0] + 1e-9 and report.bounds[0] <= tol / 2
        errs.append(err)
    assert errs[0] > errs[1] > errs[2]  # a lower degree is really less accurate


def test_chebyshev_fallbacks_give_the_same_walk(monkeypatch):
    M, phi, ref = case32("tight")
    M, phi = M.double(), phi.double()
    dense = R.random_walk_chebyshev(M, phi, sparse=False)
    # everything sparse (tight: ~30% of the entries kept) is still within the bound
    monkeypatch.setattr(CW, "SPARSE_MAX_DENSITY", 1.0)
    report = R.WalkReport()
    out = R.random_walk_chebyshev(M, phi, report=report)
    assert report.methods == ["chebyshev-sparse"]
    assert (out - ref).abs().max() <= report.bounds[0] + 1e-9
    # the sampled rows (every 4th cell) are isolated, the others one cluster: the sample says
    # sparse, the running count says dense -> rebuilt dense, the same walk as dense from the start
    g = torch.Generator().manual_seed(5)
    p = F.normalize(torch.randn(1, 16, 1024, generator=g, dtype=torch.float64), dim=1)
    one = F.normalize(torch.ones(1, 16, 1, dtype=torch.float64), dim=1)
    p[:, :, torch.arange(1024) % 4 != 0] = one
    monkeypatch.setattr(CW, "SPARSE_MAX_DENSITY", 0.1)
    report = R.WalkReport()
    out = R.random_walk_chebyshev(M[:, :3], p, report=report)
    assert report.methods == ["chebyshev"]
    dense3 = R.random_walk_chebyshev(M[:, :3], p, sparse=False)
    torch.testing.assert_close(out, dense3, atol=1e-12, rtol=0)
    # torch.bmm instead of oneDNN (the CUDA path) and one block of N rows (as on CUDA)
    monkeypatch.setattr(CW, "_onednn_linear_ok", lambda: False)
    monkeypatch.setattr(CW, "AFFINITY_BLOCK_ROWS", 1 << 20)
    bmm = R.random_walk_chebyshev(M, phi, sparse=False)
    torch.testing.assert_close(bmm, dense, atol=1e-12, rtol=0)
    out32 = R.random_walk_chebyshev(M.float(), phi.float(), sparse=False)
    assert (out32.double() - dense).abs().max() <= 2e-5


def test_affinity_rows_match_the_affinity():
    g = torch.Generator().manual_seed(6)
    p1 = F.normalize(torch.randn(2, 8, 300, generator=g, dtype=torch.float64) + 2.0, dim=1)
    p2 = F.normalize(torch.randn(2, 8, 300, generator=g, dtype=torch.float64) + 2.0, dim=1)
    valid = torch.rand(300, generator=g) > 0.1
    A = R.affinity([p1, p2], valid=valid[None].expand(2, -1), min_affinity=R.MIN_AFFINITY)[1]
    lo = math.log(R.MIN_AFFINITY)
    full = CW._affinity_rows([p1, p2], 1, valid, 100.0, lo, 0.0, 0, 64,
                            lambda: torch.empty(300, 300, dtype=torch.float64))
    assert full.csr is None and torch.equal(full.dropped, torch.zeros(300, dtype=torch.float64))
    torch.testing.assert_close(full.diag, A.diagonal(), atol=1e-12, rtol=0)
    torch.testing.assert_close(full.dense + torch.diag(full.diag), A, atol=2e-12, rtol=1e-12)
    torch.testing.assert_close(full.d, A.sum(1), atol=1e-12, rtol=1e-12)
    tau = 1e-3
    sp = CW._affinity_rows([p1, p2], 1, valid, 100.0, lo, tau, 300 * 300, 64, None)
    crow, col, val = sp.csr
    S = torch.sparse_csr_tensor(crow, col, val, size=(300, 300), check_invariants=True).to_dense()
    off = A - torch.diag(A.diagonal())
    torch.testing.assert_close(S, torch.where(off >= tau, off, 0.0), atol=1e-12, rtol=1e-12)
    assert (sp.dropped >= torch.where(off < tau, off, 0.0).sum(1)).all()  # a valid bound
    torch.testing.assert_close(sp.d, A.sum(1), atol=1e-12, rtol=1e-12)


def test_chebyshev_constant_rows_and_mixed_batch():
    (Mt, pt, rt), (Mr, pr, rr) = case32("tight"), case32("random")
    M, phi, ref = torch.cat([Mt, Mr]).double(), torch.cat([pt, pr]).double(), torch.cat([rt, rr])
    M[:, 3] = 0.0   # an absent class
    M[:, 5] = 0.25  # a constant row
    ref[:, 3], ref[:, 5] = 0.0, 0.25
    out, report = R.random_walk(M, phi, method="chebyshev", return_report=True)
    assert report.methods == ["chebyshev", "chebyshev-sparse"]
    assert torch.equal(out[:, 3], M[:, 3]) and torch.equal(out[:, 5], M[:, 5])
    err = (out - ref).abs().amax(dim=(1, 2))
    assert (err <= torch.tensor(report.bounds, dtype=torch.float64) + 1e-9).all()


def test_valid_mask_excludes_padding():
    h, w, wv = 8, 10, 6  # the valid image is the left 8x6 part of an 8x10 canvas
    M, phi, _ = clustered(1, h, w, 0.8, C=4, seed=8)
    M, phi = M.double(), phi.double()
    valid = torch.zeros(1, h, w, dtype=torch.bool)
    valid[:, :, :wv] = True
    sub = lambda x: x.view(x.shape[0], x.shape[1], h, w)[..., :wv].flatten(2)  # noqa: E731
    expected = R.random_walk_dense(sub(M), sub(phi))
    for method in R.METHODS:
        out = R.random_walk(M, phi, method=method, valid=valid.flatten(1), tol=1e-12)
        torch.testing.assert_close(sub(out), expected, atol=1e-9, rtol=0)
        pad = ~valid.flatten(1)
        torch.testing.assert_close(out[:, :, pad[0]], M[:, :, pad[0]])  # padding untouched


def test_chunking_does_not_change_results():
    M, phi, _ = clustered(3, 8, 8, 0.5, C=3, seed=9)
    for method in ("dense", "matvec", "topk", "chebyshev"):
        a = R.random_walk(M.double(), phi.double(), method=method)
        b = R.random_walk(M.double(), phi.double(), method=method, max_bytes=1)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_bad_arguments():
    M, phi, _ = clustered(1, 4, 4, 0.5, C=3)
    with pytest.raises(ValueError, match="method"):
        R.random_walk(M, phi, method="fast")
    with pytest.raises(ValueError, match="N = 16"):
        R.random_walk(M[:, :, :10], phi)


# --------------------------------------------------------------------------------------------
# the refinement recipe


def _two_region_case(seed: int = 0):
    """A 64x64 image: class 1 on the left half, class 2 on the right; embeddings (stride 4)
    cleanly split; softmax scores that prefer the wrong class on a third of the 8x8 cells."""
    g = torch.Generator().manual_seed(seed)
    D = 16
    dirs = F.normalize(torch.randn(2, D, generator=g), dim=1)
    phi = torch.empty(1, D, 16, 16)
    phi[0, :, :, :8] = dirs[0][:, None, None]
    phi[0, :, :, 8:] = dirs[1][:, None, None]
    phi = F.normalize(phi + 0.05 * torch.randn(phi.shape, generator=g), dim=1)
    truth = torch.zeros(1, 64, 64, dtype=torch.long)
    truth[:, :, :32] = 1
    truth[:, :, 32:] = 2
    logits = torch.zeros(1, 4, 8, 8)
    logits[0, 1, :, :4] = 1.0
    logits[0, 2, :, 4:] = 1.0
    flip = torch.rand(8, 8, generator=g) < 0.33
    logits[0, 1] += torch.where(flip & (torch.arange(8) >= 4), 2.0, 0.0)
    logits[0, 2] += torch.where(flip & (torch.arange(8) < 4), 2.0, 0.0)
    logits[0, 3] = 0.5  # a class absent from the image, fairly likely everywhere
    prob = F.interpolate(logits.softmax(1), size=(64, 64), mode="nearest")
    return prob, phi, truth


def test_refine_labels_cleans_noisy_scores():
    prob, phi, truth = _two_region_case()
    # class 0 has a flat score: after max normalisation it would be ~1 everywhere, so it is
    # marked absent here (as are the classes an annotation does not mention)
    present = torch.tensor([[False, True, True, False]])
    raw = prob.argmax(1)
    assert (raw != truth).float().mean() > 0.1  # the input is really noisy
    labels = R.refine_labels(prob, phi, present, (64, 64), method="dense")
    assert labels.shape == (1, 64, 64) and labels.dtype == torch.int64
    assert (labels != truth).float().mean() < 0.01
    # per-class max normalisation: rescaling a class does not change the result
    scaled = prob * torch.tensor([1.0, 0.2, 3.0, 1.0])[None, :, None, None]
    assert torch.equal(R.refine_labels(scaled, phi, present, (64, 64), method="dense"), labels)
    for method in ("matvec", "topk", "chebyshev", "auto"):
        assert torch.equal(R.refine_labels(prob, phi, present, (64, 64), method=method), labels)


def test_refine_labels_absent_classes_never_win():
    prob, phi, _ = _two_region_case(1)
    only2 = R.refine_labels(prob, phi, torch.tensor([[False, False, True, False]]))
    assert torch.equal(only2, torch.full_like(only2, 2))  # the walk spreads it everywhere
    labels = R.refine_labels(prob, phi, torch.tensor([[False, True, True, False]]))
    assert set(labels.unique().tolist()) == {1, 2}
    # without the mask the flat classes 0 and 3 are max-normalised to ~1 and take cells
    assert not set(R.refine_labels(prob, phi, None).unique().tolist()) <= {1, 2}


def test_refine_labels_scores_at_grid_and_padding():
    prob, phi, truth = _two_region_case(2)
    present = torch.tensor([[False, True, True, False]])
    # scores already on the 8x8 grid give the same labels as full-resolution scores
    grid = F.interpolate(prob, size=(8, 8), mode="bilinear", align_corners=False)
    full = R.refine_labels(prob, phi, present, method="dense")
    assert torch.equal(R.refine_labels(grid, phi, present, (64, 64), method="dense"), full)
    # the image is the top 64x48 of a padded 64x64 canvas holding garbage on the right
    img = prob[..., :48]
    canvas = torch.cat([img, torch.rand(1, 4, 64, 16)], dim=3)
    canvas_phi = torch.cat([phi[..., :12], F.normalize(torch.randn(1, 16, 16, 4), dim=1)], dim=3)
    valid = torch.zeros(1, 64, 64, dtype=torch.bool)
    valid[..., :48] = True
    padded, up = R.refine_labels(canvas, canvas_phi, present, valid=valid, method="dense",
                                 return_scores=True)
    cropped = R.refine_labels(img, phi[..., :12], present, method="dense")
    # identical away from the last grid column (whose bilinear upsampling sees the padding)
    assert torch.equal(padded[..., :40], cropped[..., :40])
    assert up.shape == (1, 4, 64, 64)


def test_refine_labels_batched_and_float64():
    prob, phi, _ = _two_region_case(3)
    prob2, phi2, _ = _two_region_case(4)
    both = R.refine_labels(torch.cat([prob, prob2]).double(), torch.cat([phi, phi2]).double(),
                           method="dense")
    assert torch.equal(both[:1], R.refine_labels(prob.double(), phi.double(), method="dense"))
    assert torch.equal(both[1:], R.refine_labels(prob2.double(), phi2.double(), method="dense"))


def test_refine_labels_large_grid_uses_chebyshev():
    # a 256x256 image: a 32x32 walk grid (N = 1024 > 400 cells), padding on the right, two
    # passes of embeddings: `auto` (the Chebyshev walk) gives the dense reference's labels
    M, phi, _ = clustered(1, 32, 32, 0.45, C=5, seed=12)
    prob = F.interpolate(M.view(1, 5, 32, 32), size=(256, 256), mode="bilinear",
                         align_corners=False)
    emb = phi.view(1, 64, 32, 32)
    noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    passes = [emb, F.normalize(emb + 0.05 * noise, dim=1)]
    valid = torch.ones(1, 256, 256, dtype=torch.bool)
    valid[..., 200:] = False
    present = torch.tensor([[True, True, False, True, True]])
    ref_labels, ref_up = R.refine_labels(prob, passes, present, valid=valid, method="dense",
                                         return_scores=True)
    labels, up = R.refine_labels(prob, passes, present, valid=valid, method="auto",
                                 return_scores=True)
    assert (up - ref_up).abs().max() <= 1e-4
    assert (labels != ref_labels).float().mean() <= 1e-3  # ties within 1e-4 may flip
    assert not (labels == 2).any()  # the absent class


# --------------------------------------------------------------------------------------------
# the batched walk of a GPU segment job (matvec, one batched product per step)


def test_auto_method_and_budget_by_device(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert R.auto_method(cuda, 4096) == "matvec" and R.auto_method(cpu, 4096) == "chebyshev"
    assert R.auto_method(cuda, R.DENSE_MAX_CELLS) == R.auto_method(cpu, 100) == "dense"
    assert R.walk_budget(cpu) == R.DEFAULT_MAX_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (100 << 30, 140 << 30))
    assert R.walk_budget(cuda) == 50 << 30                      # half of the free memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1 << 20, 140 << 30))
    assert R.walk_budget(cuda) == R.DEFAULT_MAX_BYTES
    # 16 images of a 64x64 grid (2 x 64 MiB each for matvec) are one walk within 50 GiB
    assert len(CW._chunks(16, 4096, 4, 2, 50 << 30)) == 1


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_batched_matvec_walk_matches_per_image_dense_fp32(monkeypatch, sigma: float):
    """The CUDA ``auto`` path (matvec, the whole batch in one walk) against the per-image
    float32 dense walk: max abs difference <= 1e-4, >= 99.9% equal labels."""
    scores, phi, _ = clustered(4, 32, 32, sigma, C=21, seed=7)
    ref = torch.cat([R.random_walk_dense(scores[i:i + 1], phi[i:i + 1]) for i in range(4)])
    chunks = []
    real = CW._chunks

    def spy(*args):
        out = real(*args)
        chunks.append(len(out))
        return out

    monkeypatch.setattr(R, "_chunks", spy)
    monkeypatch.setattr(R, "walk_budget", lambda device: 64 << 20)
    monkeypatch.setattr(R, "auto_method", lambda device, cells: "matvec")   # as on CUDA
    got, report = R.random_walk(scores, phi, method="auto", return_report=True)
    assert chunks == [1] and report.methods == ["matvec"] * 4
    assert float((got - ref).abs().max()) <= 1e-4
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.999
