"""Export: ONNX graph, bundle contents, parity, refusals, atomicity, TensorRT (skipped here)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from runs import make_run
from spml_deploy.artifacts import read_manifest, read_onnx_manifest, sha256_file, write_manifest
from spml_deploy.engine.backends import Backend, OnnxRuntimeBackend, TorchBackend, load_backend
from spml_deploy.errors import ExportError, ManifestError, MissingDependencyError, SpmlError
from spml_deploy.export import bundle as bundle_mod
from spml_deploy.export.benchmark import benchmark, format_table
from spml_deploy.export.bundle import engine_profile, export_bundle
from spml_deploy.export.onnx_export import export_onnx, fp32_island
from spml_deploy.export.parity import (MARGIN_TOLERANCE_HALF, label_agreement, label_disagreements,
                                       make_inputs, margin_tolerance,
                                       parity, parity_sizes)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

EXPORT_HW = (64, 64)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export") / "run", with_f1=True, index=True)


@pytest.fixture(scope="module")
def bundle(run) -> tuple[Path, dict]:
    out = run.parent / "bundle"
    report = export_bundle(run, out, imgsz=EXPORT_HW[0])
    return out, report


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------
# the bundle


def test_bundle_files_and_manifest(run, bundle):
    out, report = bundle
    m = read_manifest(out, verify=True)                    # every sha256 checks out
    assert m.kind == "bundle"
    run_m = read_manifest(run)
    assert m.classes == run_m.classes and m.model == run_m.model
    assert set(m.files) == {"onnx", "weights", "config", "index"}
    for role in ("weights", "config", "index"):                 # copied unchanged, same paths
        assert m.files[role]["path"] == run_m.files[role]["path"]
        assert m.files[role]["sha256"] == run_m.files[role]["sha256"]
    (entry,) = m.exports
    assert entry["format"] == "onnx" and entry["opset"] == 17
    assert entry["input_names"] == ["images"] and entry["output_names"] == ["embeddings", "logits"]
    assert entry["dynamic_axes"]["images"] == {"0": "batch", "2": "height", "3": "width"}
    assert entry["precision"] == "fp32" and entry["device"] == "cpu"
    assert entry["classifier"] == "f1"
    p = entry["parity"]
    assert p["passed"] and p["mean_cosine"] >= 0.9999 and p["label_agreement"] >= 0.999
    assert p["max_abs_diff_embeddings"] < 1e-4
    assert len(p["sizes"]) == 2
    for h, w in p["sizes"]:                         # measured away from the export size
        assert h != EXPORT_HW[0] and w != EXPORT_HW[1]
    assert p["batch"] != entry["example_shape"][0]  # and at another batch size
    assert not _leftovers(out.parent)
    assert report["formats"] == ["onnx"]


def test_bundle_deployed_at_another_max_side(run, tmp_path):
    """--max-side: the bundle's spml.json (what inference reads) gets the new input size, the
    ONNX example follows it, the copied config.json stays the training record, and the
    pipeline on the bundle really runs the network at that size."""
    from spml_deploy.engine.pipeline import load_pipeline

    run_m = read_manifest(run)
    assert run_m.preprocess.max_side != 96
    report = export_bundle(run, tmp_path / "b96", max_side=96)
    m = read_manifest(tmp_path / "b96", verify=True)
    assert m.preprocess.max_side == 96
    assert m.preprocess.mean == run_m.preprocess.mean
    assert m.files["config"]["sha256"] == run_m.files["config"]["sha256"]
    assert report["exports"][0]["example_shape"][2:] == [96, 96]
    seen = []
    pipe = load_pipeline(tmp_path / "b96")
    real = pipe.backend._run
    pipe.backend._run = lambda x: (seen.append(tuple(x.shape[-2:])), real(x))[1]
    pipe.predict([np.zeros((40, 30, 3), np.uint8)])
    pipe.close()
    assert seen == [(96, 96)]
    with pytest.raises(ExportError, match="max-side"):
        export_bundle(run, tmp_path / "b4", max_side=4)
    assert not (tmp_path / "b4").exists()


def test_onnx_graph_checked_dynamic_and_carries_manifest(bundle):
    out, _ = bundle
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in model.graph.output] == ["embeddings", "logits"]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)   # folded
    meta = read_onnx_manifest(out / "model.onnx")
    bundle_m = read_manifest(out)
    assert meta.model == bundle_m.model and meta.classes == bundle_m.classes
    assert meta.preprocess == bundle_m.preprocess
    island = fp32_island(model.graph)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert sorted(ops[n] for n in island) == ["Clip", "Div", "Mul", "ReduceSum", "Sqrt"]


def test_onnxruntime_matches_torch_at_other_sizes(run, bundle):
    """The exported graph at sizes and a batch it was not traced with (truly dynamic axes)."""
    out, _ = bundle
    ref = TorchBackend(run)
    cand = load_backend(out, "onnxruntime")
    gen = torch.Generator().manual_seed(1)
    for shape in [(3, 3, 40, 56), (2, 3, 56, 40)]:
        x = torch.randn(shape, generator=gen)
        rp, rl = ref(x)
        cp, cl = cand(x)
        assert cp.shape == (shape[0], 32, shape[2] // 4, shape[3] // 4)
        assert cl.shape == (shape[0], 4, shape[2] // 4, shape[3] // 4)
        torch.testing.assert_close(cp, rp, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cl, rl, atol=1e-4, rtol=1e-4)


def test_bare_onnx_file_is_self_describing(bundle, tmp_path):
    out, _ = bundle
    lone = tmp_path / "lone.onnx"
    shutil.copy(out / "model.onnx", lone)                    # no spml.json next to it
    b = load_backend(lone, "onnxruntime")
    assert b.num_classes == 4 and b.embed_dim == 32
    phi, logits = b(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 4, 8, 8)


# ------------------------------------------------------------------------------------------
# refusals


def test_opset_16_refused(run, tmp_path):
    with pytest.raises(ExportError, match="opset 16") as exc:
        export_bundle(run, tmp_path / "b", opset=16)
    assert exc.value.exit_code == 2
    with pytest.raises(ExportError, match="opset 16"):
        export_onnx(run, tmp_path / "m.onnx", opset=16)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_refused(run, tmp_path):
    with pytest.raises(ExportError, match="unknown format 'tflite'") as exc:
        export_bundle(run, tmp_path / "b", format="tflite")
    assert exc.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_missing_weights_refused(tmp_path):
    run = make_run(tmp_path / "run")
    data = bytearray((run / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF                              # one flipped byte
    (run / "weights.pt").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256") as exc:
        export_bundle(run, tmp_path / "b")
    assert exc.value.exit_code == 2
    (run / "weights.pt").unlink()
    with pytest.raises(ManifestError, match="missing"):
        export_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not _leftovers(tmp_path)


def test_unreadable_weights_with_matching_hash_refused(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "weights.pt").write_bytes(b"not a torch archive")
    m = read_manifest(run, verify=False)
    m.add_file(run, "weights", "weights.pt")                 # hash now matches the junk
    write_manifest(run, m)
    with pytest.raises(ManifestError, match="corrupt"):
        export_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not _leftovers(tmp_path)


def test_existing_output_refused(run, bundle):
    out, _ = bundle
    before = sha256_file(out / "spml.json")
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(run, out)
    assert sha256_file(out / "spml.json") == before


def test_bundle_is_atomic_when_export_fails_midway(run, tmp_path, monkeypatch):
    def broken_parity(*args, **kwargs):
        # the ONNX file and the copied run files exist in the temporary folder at this point
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        assert len(partial) == 1 and (partial[0] / "model.onnx").is_file()
        raise ExportError("simulated failure during the parity check")

    monkeypatch.setattr(bundle_mod, "parity", broken_parity)
    with pytest.raises(ExportError, match="simulated"):
        export_bundle(run, tmp_path / "b", imgsz=32)
    assert list(tmp_path.iterdir()) == []                   # no bundle, no temporary folder


def test_engine_needs_tensorrt_and_gpu(run, tmp_path):
    try:
        import tensorrt  # noqa: F401
        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present: the real build test covers this")
    except ImportError:
        pass
    with pytest.raises((MissingDependencyError, ExportError)) as exc:
        export_bundle(run, tmp_path / "b", format="engine")
    assert isinstance(exc.value, SpmlError) and exc.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_simplify_without_onnxsim_is_an_error(run, tmp_path):
    try:
        import onnxsim  # noqa: F401
        pytest.skip("onnxsim is installed")
    except ImportError:
        pass
    with pytest.raises(ExportError, match="onnxsim"):
        export_onnx(run, tmp_path / "m.onnx", imgsz=32, simplify=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# variants


def test_half_export_keeps_normalisation_fp32(run, tmp_path):
    info = export_onnx(run, tmp_path / "h.onnx", imgsz=32, half=True)
    model = onnx.load(str(tmp_path / "h.onnx"))
    fp16 = onnx.TensorProto.FLOAT16
    assert any(t.data_type == fp16 for t in model.graph.initializer)
    io = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]
    assert io == [onnx.TensorProto.FLOAT] * 3
    # the island between the last Resize and the embeddings output is computed in fp32
    producer = {o: n for n in model.graph.node for o in n.output}
    div = producer["embeddings"]
    assert div.op_type == "Div"
    assert producer[div.input[0]].op_type == "Cast"          # fp16 -> fp32 before normalising
    assert len(info["fp32_nodes"]) == 5
    r = parity(TorchBackend(run), OnnxRuntimeBackend(tmp_path / "h.onnx"), [(40, 48)], batch=2,
               num_images=2)
    assert r["passed"] and 1e-6 < r["max_abs_diff_embeddings"] < 1e-2   # really fp16, still close


def test_static_export_has_fixed_shape(run, tmp_path):
    export_onnx(run, tmp_path / "s.onnx", imgsz=32, batch=2, dynamic=False)
    model = onnx.load(str(tmp_path / "s.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 32, 32]
    b = OnnxRuntimeBackend(tmp_path / "s.onnx")
    assert b(torch.zeros(2, 3, 32, 32))[0].shape == (2, 32, 8, 8)
    with pytest.raises(Exception):
        b(torch.zeros(2, 3, 40, 32))


# ------------------------------------------------------------------------------------------
# parity helpers


def test_label_agreement_hand_example():
    ref = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)     # class 0 | class 0
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)    # class 0 | class 1
    # 4x bilinear upsampling of a 1x2 map: columns at t = -.375 .. 1.375 (clamped to [0, 1]);
    # cand is class 0 for t < 0.5, i.e. the first 4 of 8 columns
    assert label_agreement(ref, cand) == pytest.approx(0.5)
    assert label_agreement(ref, ref) == 1.0
    assert label_agreement(ref, -ref) == 0.0
    with pytest.raises(ExportError):
        label_agreement(ref, torch.zeros(1, 2, 2, 2))


def test_margin_aware_agreement_forgives_near_ties_only():
    # three pixels (1x3 map, read out at its own size): a near-tie flipped, a clear winner
    # flipped, a clear winner kept
    ref = torch.tensor([[1.0, 3.0, 0.0], [0.9995, 0.0, 2.0]]).reshape(1, 2, 1, 3)
    cand = torch.tensor([[0.9995, 0.0, 0.0], [1.0, 3.0, 2.0]]).reshape(1, 2, 1, 3)
    assert label_disagreements(ref, cand, (1, 3), tolerance=1e-2) == (3, 2, 1)
    # a tolerance below the near-tie's margin (5e-4) counts both flips
    assert label_disagreements(ref, cand, (1, 3), tolerance=1e-4) == (3, 2, 2)
    assert label_disagreements(ref, ref, (1, 3), tolerance=1.0) == (3, 0, 0)
    assert margin_tolerance(True) > margin_tolerance(False) > 0


class _NearTieFlip(Backend):
    """A candidate that swaps the top two logits wherever the reference's margin is below
    ``gap`` (a flip within the numeric error) and otherwise returns the reference's logits."""

    name = "near-tie"

    def __init__(self, inner: Backend, gap: float):
        super().__init__(inner.bundle, inner.device)
        self.inner, self.gap = inner, gap

    def _run(self, x):
        phi, logits = self.inner(x)
        top2, idx = logits.topk(2, dim=1)
        swap = (top2[:, 0] - top2[:, 1]) < self.gap                      # [B, h, w]
        out = logits.clone()
        out.scatter_(1, idx[:, :1], torch.where(swap, top2[:, 1], top2[:, 0])[:, None])
        out.scatter_(1, idx[:, 1:], torch.where(swap, top2[:, 0], top2[:, 1])[:, None])
        return phi, out


def test_parity_forgives_near_tie_flips_and_counts_clear_flips(run):
    ref = TorchBackend(run)
    x = make_inputs([(40, 48)], 1, 1, 0, ref.manifest.preprocess)[0]
    with torch.inference_mode():
        scale = float(ref(x)[1].abs().max())
    gap = 0.5 * MARGIN_TOLERANCE_HALF * scale                   # below the fp16 tolerance
    r = parity(ref, _NearTieFlip(ref, gap), [(40, 48)], batch=1, num_images=1,
               margin_tolerance=MARGIN_TOLERANCE_HALF)
    assert r["near_tie_flips"] > 0 and r["label_agreement"] < 1.0   # some labels really flipped
    assert r["label_agreement_margin"] == 1.0 and r["passed"]
    # the same flips are counted when the tolerance is smaller than their margins
    with pytest.raises(ExportError, match="margin-aware"):
        parity(ref, _NearTieFlip(ref, 1e3 * scale), [(40, 48)], batch=1, num_images=1,
               margin_tolerance=MARGIN_TOLERANCE_HALF)


class _Perturbed(Backend):
    """A candidate that reverses the class order of the logits: embeddings agree, labels do not."""

    name = "perturbed"

    def __init__(self, inner: Backend):
        super().__init__(inner.bundle, inner.device)
        self.inner = inner

    def _run(self, x):
        phi, logits = self.inner(x)
        return phi, logits.flip(1)


def test_parity_failure_raises_with_numbers(run):
    ref = TorchBackend(run)
    with pytest.raises(ExportError, match=r"label agreement \d+\.\d+% \(\d+\.\d+% margin-aware.* at 40x48") as exc:
        parity(ref, _Perturbed(ref), [(40, 48)], batch=1, num_images=1)
    report = exc.value.report
    assert report["mean_cosine"] == pytest.approx(1.0)
    assert report["label_agreement"] == 0.0 and not report["passed"]   # 4 classes: c -> 3 - c
    assert report["label_agreement_margin"] < 0.01                      # clear flips count
    assert exc.value.exit_code == 2


def test_parity_sizes_and_profile_cover_each_other():
    for hw in [(64, 64), (512, 512), (96, 160)]:
        sizes = parity_sizes(hw)
        assert len(sizes) == 2
        for h, w in sizes:
            assert h % 8 == 0 and w % 8 == 0 and h != hw[0] and w != hw[1]
        lo, opt, hi = engine_profile(hw, sizes, 1, 2, 512)
        assert opt == [1, 3, *hw]
        for h, w in [hw, *sizes]:
            assert lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]
        assert hi[0] == 2 and lo[0] == 1


# ------------------------------------------------------------------------------------------
# benchmark


def test_benchmark_reports_and_skips(bundle, run):
    out, _ = bundle
    r = benchmark(out, ["torch", "onnxruntime", "tensorrt"], imgsz=64, batch=2, warmup=1, iters=2)
    gflop = r["model"]["gflop_per_image"]
    assert gflop > 0
    for kind in ("torch", "onnxruntime"):
        b = r["backends"][kind]
        assert b["latency_ms"]["p90"] >= b["latency_ms"]["median"] > 0
        assert b["network_images_per_s"] == pytest.approx(2e3 / b["stages_ms"]["network"])
        assert b["tflops"] == pytest.approx(gflop * b["network_images_per_s"] / 1e3)
        assert set(b["stages_ms"]) == {"preprocess", "network", "postprocess"}
    if not torch.cuda.is_available():
        assert "skipped" in r["backends"]["tensorrt"]
        assert "skipped" in format_table(r)
    json.dumps(r)                                              # JSON-able
    r2 = benchmark(run, ["onnxruntime"], imgsz=32, warmup=0, iters=1)
    assert "no model.onnx" in r2["backends"]["onnxruntime"]["skipped"]


def test_benchmark_defaults_to_the_backends_that_run_here(bundle, run, caplog):
    out, _ = bundle
    with caplog.at_level("WARNING"):
        r = benchmark(out, None, imgsz=32, batch=1, warmup=0, iters=1)
    assert set(r["backends"]) == {"torch", "onnxruntime"}          # CPU: no TensorRT attempt
    assert set(r["unavailable"]) == {"tensorrt"} and "CUDA" in r["unavailable"]["tensorrt"]
    assert not [rec for rec in caplog.records if rec.levelname == "WARNING"]
    table = format_table(r)
    assert table.count("tensorrt") == 1 and "not available here: tensorrt" in table
    r2 = benchmark(run, None, imgsz=32, warmup=0, iters=1)         # a run folder: no model.onnx
    assert set(r2["backends"]) == {"torch"} and "no model.onnx" in r2["unavailable"]["onnxruntime"]
    with pytest.raises(ExportError, match="unknown backend.*tflite"):
        benchmark(out, ["torch", "tflite"], imgsz=32, warmup=0, iters=1)


def test_benchmark_preprocessing_is_the_segment_jobs(bundle, monkeypatch):
    """The timed input path is prepare_batch (uint8 upload, device normalisation), and the
    network gets exactly what stacking pipeline.preprocess of each image gives."""
    from spml_deploy.export import benchmark as bench_mod
    from spml_deploy.engine.preprocess import preprocess

    out, _ = bundle
    seen = []
    real = bench_mod.prepare_batch

    def spy(images, pp, device):
        x, prepped = real(images, pp, device)
        ref = np.stack([preprocess(im, pp)[0] for im in images])
        seen.append(torch.equal(x.cpu(), torch.from_numpy(ref)))
        return x, prepped

    monkeypatch.setattr(bench_mod, "prepare_batch", spy)
    r = benchmark(out, ["torch"], imgsz=32, batch=2, warmup=0, iters=2)
    assert seen == [True] * 5            # 2 staged batches, then 1 + 2 in the pipelined pass
    assert r["backends"]["torch"]["pipelined_images_per_s"] > 0


def test_cli_benchmark_backends_and_torch_options(bundle, tmp_path):
    from click.testing import CliRunner

    from spml_deploy.cli import cli

    out, _ = bundle
    res = CliRunner().invoke(cli, ["benchmark", str(out), "--backends", "torch,foo"])
    assert res.exit_code == 2 and "foo" in res.output
    assert "choose from torch, onnxruntime, tensorrt" in res.output
    js = tmp_path / "b.json"
    res = CliRunner().invoke(cli, ["benchmark", str(out), "--imgsz", "32", "--warmup", "0",
                                   "--iters", "1", "--precision", "bf16", "--channels-last",
                                   "--json", str(js)])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    cfg = r["backends"]["torch"]["config"]
    assert cfg["precision"] == "bf16" and cfg["channels_last"] is True and cfg["compile"] is False
    assert "torch (bf16, channels-last)" in res.output
    assert set(r["backends"]) == {"torch", "onnxruntime"} and "tensorrt" in r["unavailable"]
    res = CliRunner().invoke(cli, ["benchmark", str(out), "--imgsz", "32", "--warmup", "0",
                                   "--iters", "1", "--backends", "torch", "--json", str(js)])
    cfg = json.loads(js.read_text())["backends"]["torch"]["config"]
    assert res.exit_code == 0 and cfg["precision"] == "fp32" and not cfg["channels_last"]


# ------------------------------------------------------------------------------------------
# TensorRT (needs the tensorrt package and a CUDA GPU; neither exists in the dev environment)


@pytest.mark.gpu
def test_tensorrt_engine_build_and_parity(run, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (cannot be installed here)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    report = export_bundle(run, tmp_path / "b", format="all", imgsz=64, device="cuda",
                           timing_cache=tmp_path / "timing.cache")
    engine_entry = next(e for e in report["exports"] if e["format"] == "engine")
    assert engine_entry["parity"]["passed"]
    assert (tmp_path / "timing.cache").is_file()
    backend = load_backend(tmp_path / "b", "tensorrt", "cuda")
    lo, _, hi = backend.profile
    with pytest.raises(SpmlError, match="outside the engine's optimisation profile"):
        backend(torch.zeros(hi[0] + 1, 3, 64, 64, device="cuda"))
    phi, logits = backend(torch.zeros(1, 3, 64, 64, device="cuda"))
    assert phi.is_cuda and phi.dtype == torch.float32
    torch.testing.assert_close(phi.norm(dim=1), torch.ones_like(phi[:, 0]), atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_tensorrt_fp16_engine_parity(run, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (cannot be installed here)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    report = export_bundle(run, tmp_path / "b", format="engine", half=True, imgsz=64,
                           device="cuda")
    entry = next(e for e in report["exports"] if e["format"] == "engine")
    assert entry["precision"].startswith("fp16") and entry["parity"]["passed"]
    assert np.isfinite(entry["parity"]["max_abs_diff_embeddings"])


# ------------------------------------------------------------------------------------------
# TensorRT builder logic against a stand-in module (records the calls; no engine is built).
# It checks our side of the contract - flags per TensorRT major version, which layers are pinned
# to fp32, profile, timing cache round trip, raw engine bytes - not TensorRT itself.


class _FakeTRT:
    float32, float16 = "float32", "float16"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class BuilderFlag:
        FP16 = "FP16"
        OBEY_PRECISION_CONSTRAINTS = "OBEY"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    def __init__(self, version: str):
        self.__version__ = version
        self.calls: dict = {}
        trt = self

        class Tensor:
            def __init__(self, name):
                self.name, self.dtype = name, trt.float32

        class Layer:
            def __init__(self, node):
                self.name = node.name
                self.outputs = [Tensor(o) for o in node.output]
                self.num_outputs = len(self.outputs)
                self.precision, self.out_types = None, {}

            def get_output(self, j):
                return self.outputs[j]

            def set_output_type(self, j, t):
                self.out_types[j] = t

        class Network:
            def __init__(self, flags):
                trt.calls["network_flags"] = flags
                self.layers = []

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, i):
                return self.layers[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.layers = [Layer(n) for n in onnx.load(path).graph.node]
                trt.calls["network"] = self.network
                return True

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+timings"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                trt.calls["profile"] = (name, lo, opt, hi)

        class Config:
            def __init__(self):
                self.flags = set()
                trt.calls["config"] = self

            def set_flag(self, f):
                self.flags.add(f)

            def set_memory_pool_limit(self, kind, n):
                trt.calls["workspace"] = (kind, n)

            def add_optimization_profile(self, p):
                pass

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return memoryview(b"RAW-ENGINE")

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))

    def install(version):
        fake = _FakeTRT(version)
        monkeypatch.setitem(__import__("sys").modules, "tensorrt", fake)
        return fake
    return install


def test_build_engine_logic_tensorrt10_fp16_flag(bundle, tmp_path, fake_gpu):
    from spml_deploy.export.tensorrt_build import build_engine

    trt = fake_gpu("10.3.0")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    info = build_engine(bundle[0] / "model.onnx", tmp_path / "model.engine", (1, 3, 32, 32),
                        (1, 3, 64, 64), (2, 3, 96, 96), fp16=True, workspace_gb=2,
                        timing_cache=cache)
    assert (tmp_path / "model.engine").read_bytes() == b"RAW-ENGINE"       # raw, no header
    assert cache.read_bytes() == b"old+timings"                            # loaded, then saved
    assert trt.calls["network_flags"] == 0                                 # weakly typed
    assert trt.calls["config"].flags == {"FP16", "OBEY"}
    assert trt.calls["workspace"] == ("WORKSPACE", 2 << 30)
    assert trt.calls["profile"] == ("images", (1, 3, 32, 32), (1, 3, 64, 64), (2, 3, 96, 96))
    pinned = sorted(l.name for l in trt.calls["network"].layers if l.precision == "float32")
    assert pinned == ["/Clip", "/Div", "/Mul", "/ReduceSum", "/Sqrt"]      # the L2 norm only
    assert info["fp32_layers"] == 5 and info["precision"].startswith("fp16 (builder flag")
    assert info["gpu"] == "Fake GPU" and info["compute_capability"] == "9.0"


def test_build_engine_logic_tensorrt11_strongly_typed(bundle, run, tmp_path, fake_gpu):
    from spml_deploy.export.tensorrt_build import build_engine

    trt = fake_gpu("11.0.0")
    shapes = ((1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 64, 64))
    with pytest.raises(ExportError, match="no FP16 builder flag"):
        build_engine(bundle[0] / "model.onnx", tmp_path / "a.engine", *shapes, fp16=True)
    assert not (tmp_path / "a.engine").exists()
    export_onnx(run, tmp_path / "half.onnx", imgsz=32, half=True)
    info = build_engine(tmp_path / "half.onnx", tmp_path / "b.engine", *shapes, fp16=True)
    assert trt.calls["config"].flags == set()                  # TensorRT 11: no precision flags
    assert info["strongly_typed"] and info["precision"].startswith("fp16 (strongly typed")
    trt10 = fake_gpu("10.8.0")
    build_engine(tmp_path / "half.onnx", tmp_path / "c.engine", *shapes)
    assert trt10.calls["network_flags"] == 1 << 5              # STRONGLY_TYPED on TensorRT 10
    with pytest.raises(ExportError, match="min <= opt <= max"):
        build_engine(tmp_path / "half.onnx", tmp_path / "d.engine", (1, 3, 64, 64),
                     (1, 3, 32, 32), (1, 3, 64, 64))


def test_fp32_pinning_also_matches_renamed_layers_by_output_tensor(bundle, tmp_path, fake_gpu):
    """TensorRT may rename a layer; the node's output tensor name still identifies it."""
    from spml_deploy.export.tensorrt_build import build_engine

    trt = fake_gpu("10.3.0")
    real_parse = trt.OnnxParser.parse_from_file

    def parse_and_rename(self, path):
        ok = real_parse(self, path)
        for layer in self.network.layers:
            layer.name = "layer" + layer.name.replace("/", "_")
        return ok

    trt.OnnxParser.parse_from_file = parse_and_rename
    info = build_engine(bundle[0] / "model.onnx", tmp_path / "m.engine", (1, 3, 32, 32),
                        (1, 3, 32, 32), (1, 3, 64, 64), fp16=True)
    pinned = [l for l in trt.calls["network"].layers if l.precision == "float32"]
    assert info["fp32_layers"] == len(pinned) == 5
    assert all(l.out_types == {0: "float32"} for l in pinned)


def test_export_reports_fp16_throughput_beside_fp32(run, tmp_path):
    """compare_half (automatic where ONNX Runtime runs on CUDA) adds the images/s of an fp16
    export and its parity to the fp32 export's report; here forced on the CPU provider."""
    report = export_bundle(run, tmp_path / "b", imgsz=EXPORT_HW[0], compare_half=True)
    onnx_info = report["exports"][0]
    c = onnx_info["precisions"]
    assert onnx_info["precision"] == "fp32"
    assert c["fp32_images_per_s"] > 0 and c["fp16_images_per_s"] > 0
    assert c["fp16_speedup"] == pytest.approx(c["fp16_images_per_s"] / c["fp32_images_per_s"])
    p = c["fp16_parity"]
    assert p["candidate"] == "onnxruntime" and 0 < p["max_abs_diff_embeddings"] < 1e-2
    assert p["margin_tolerance"] == margin_tolerance(True)
    assert "fp16 (--half)" in bundle_mod.format_report(report)
    plain = export_bundle(run, tmp_path / "c", imgsz=EXPORT_HW[0])           # CPU: not measured
    assert "precisions" not in plain["exports"][0]
