"""Backends: the torch reference against the spec's equations, ONNX Runtime provider checks,
TensorRT engine compatibility refusals (the TensorRT runtime itself is skipped here)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runs import make_run
from spml_deploy.artifacts import Manifest, load_weights, read_manifest, write_manifest
from spml_deploy.engine.backends import (TensorRTBackend, TorchBackend, check_engine_compatible,
                                  ort_providers, torch_options,
                                  create_ort_session, current_trt_environment, load_backend)
from spml_deploy.errors import BackendError, ManifestError
from spml_deploy.engine.model import EmbeddingNet, PixelClassifier


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("backends") / "run", with_f1=True)


def _spec_reference(run: Path, x: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """phi = e / ||e|| (spec 2), logits = classifier(phi) (spec 7.1), straight from weights.pt."""
    m = read_manifest(run)
    state = load_weights(run / "weights.pt")
    net = EmbeddingNet(m.model)
    net.load_state_dict(state["net"])
    clf = PixelClassifier(m.model.embed_dim, m.num_classes)
    clf.load_state_dict(state[key])
    net.eval(), clf.eval()
    with torch.no_grad():
        e = net(x.double() if x.dtype == torch.float64 else x)
        phi = F.normalize(e, dim=1, eps=1e-12)
        return phi, clf(phi)


def test_torch_backend_matches_spec_and_uses_f1(run):
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    b = load_backend(run, "torch")
    phi, logits = b(x)
    assert phi.shape == (2, 32, 12, 16) and logits.shape == (2, 4, 12, 16)
    assert phi.dtype == logits.dtype == torch.float32 and phi.device.type == "cpu"
    ref_phi, ref_f1 = _spec_reference(run, x, "f1")
    _, ref_f0 = _spec_reference(run, x, "f0")
    torch.testing.assert_close(phi, ref_phi, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, ref_f1, atol=1e-5, rtol=1e-5)
    assert (logits - ref_f0).abs().max() > 1e-2            # f0 would have given other logits
    torch.testing.assert_close(phi.norm(dim=1), torch.ones(2, 12, 16), atol=1e-5, rtol=0)
    assert b.describe()["classifier"] == "f1"


def test_torch_backend_f0_when_no_f1(tmp_path):
    run = make_run(tmp_path / "run", seed=1)
    x = torch.randn(1, 3, 32, 40)
    _, logits = load_backend(run, "torch")(x)
    torch.testing.assert_close(logits, _spec_reference(run, x, "f0")[1], atol=1e-5, rtol=1e-5)


def test_bad_input_and_options_refused(run):
    b = load_backend(run, "torch")
    with pytest.raises(BackendError, match="multiple of 8"):
        b(torch.zeros(1, 3, 30, 32))
    with pytest.raises(BackendError, match=r"\[B,3,H,W\]"):
        b(torch.zeros(3, 32, 32))
    with pytest.raises(BackendError, match="unknown backend 'tflite'"):
        load_backend(run, "tflite")
    with pytest.raises(BackendError, match="unknown option"):
        load_backend(run, "torch", threads=3)
    with pytest.raises(BackendError, match="needs a CUDA device"):
        load_backend(run, "torch", precision="fp16")
    with pytest.raises(BackendError, match="unknown precision"):
        torch_options("cpu", precision="fp8")


def test_torch_options_defaults_by_device():
    assert torch_options("cpu") == {"precision": "fp32", "channels_last": False, "compile": False}
    assert torch_options("cuda:1") == {"precision": "bf16", "channels_last": True,
                                       "compile": False}
    assert torch_options("cuda", "fp32", False, True) == {"precision": "fp32",
                                                          "channels_last": False, "compile": True}


def test_bf16_on_the_cpu_is_close_to_fp32(run):
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    phi32, log32 = load_backend(run, "torch")(x)
    b16 = load_backend(run, "torch", **torch_options("cpu", "bf16", channels_last=True))
    assert b16.describe()["precision"] == "bf16" and b16.channels_last
    phi16, log16 = b16(x)
    assert phi16.dtype == log16.dtype == torch.float32
    assert not torch.equal(phi16, phi32)                          # really ran in bfloat16
    cos = (phi16 * phi32).sum(1)
    assert float(cos.mean()) > 0.999
    margin = log32.topk(2, dim=1).values
    clear = (margin[:, 0] - margin[:, 1]) > 0.05 * float(log32.abs().max())
    same = log16.argmax(1) == log32.argmax(1)
    assert bool(same[clear].all()) and float(same.float().mean()) > 0.95


def test_weights_that_do_not_fit_the_manifest_refused(tmp_path):
    run = make_run(tmp_path / "run", num_classes=4)
    m = read_manifest(run)
    m.classes = m.classes + ["extra"]                          # 5 classes, weights have 4
    m.palette = m.palette + [[1, 2, 3]]
    write_manifest(run, m)
    with pytest.raises(ManifestError, match="4 classes but spml.json lists 5"):
        load_backend(run, "torch")


def test_onnxruntime_needs_an_onnx_file(run):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ManifestError, match="no model.onnx") as exc:
        load_backend(run, "onnxruntime")
    assert "spml-deploy export" in str(exc.value)


# ------------------------------------------------------------------------------------------
# ONNX Runtime provider checks


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from spml_deploy.export.onnx_export import export_onnx

    run = make_run(tmp_path_factory.mktemp("ort") / "run")
    out = run.parent / "m.onnx"
    export_onnx(run, out, imgsz=32)
    return out


def test_cpu_session_really_on_cpu(tiny_onnx):
    s = create_ort_session(tiny_onnx, ["CPUExecutionProvider"])
    assert s.get_providers()[0] == "CPUExecutionProvider"


def test_cuda_provider_missing_is_refused(tiny_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(BackendError, match="CUDAExecutionProvider is not available"):
        create_ort_session(tiny_onnx, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if not torch.cuda.is_available():
        with pytest.raises(BackendError):
            load_backend(tiny_onnx, "onnxruntime", device="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_silent_cpu_fallback_is_caught(tiny_onnx, monkeypatch):
    """ONNX Runtime falls back to the CPU when CUDA cannot be created; the session check sees it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA: no fallback to provoke")
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", *real()])   # pretend it is there
    with pytest.raises(BackendError, match="silent fallback"):
        create_ort_session(tiny_onnx, ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_provider_device_mismatch_refused(tiny_onnx):
    with pytest.raises(BackendError, match="does not run on device cpu"):
        load_backend(tiny_onnx, "onnxruntime", device="cpu", provider="cuda")


# ------------------------------------------------------------------------------------------
# TensorRT: compatibility refusals run everywhere; the runtime needs TensorRT + a GPU


H100 = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_engine_compatibility_check():
    check_engine_compatible(H100, dict(H100), "model.engine")             # same machine: fine
    with pytest.raises(BackendError, match="GPU: engine built with NVIDIA H100") as exc:
        check_engine_compatible(H100, {**H100, "gpu": "NVIDIA A100-SXM4-40GB",
                                       "compute_capability": "8.0"}, "model.engine")
    assert "compute capability: engine built with 9.0, this machine has 8.0" in str(exc.value)
    assert exc.value.exit_code == 2
    with pytest.raises(BackendError, match="TensorRT version: engine built with 10.3.0, this "
                                           "machine has 11.0.0"):
        check_engine_compatible(H100, {**H100, "tensorrt": "11.0.0"}, "model.engine")
    with pytest.raises(BackendError, match="does not record"):
        check_engine_compatible({"gpu": "x"}, H100, "model.engine")


def _fake_engine_bundle(run: Path, folder: Path) -> Path:
    m = read_manifest(run)
    folder.mkdir()
    (folder / "model.engine").write_bytes(b"\x00" * 64)
    bundle = Manifest(kind="bundle", model=m.model, preprocess=m.preprocess, classes=m.classes,
                      palette=m.palette, exports=[{"format": "engine", **H100}])
    bundle.add_file(folder, "engine", "model.engine")
    write_manifest(folder, bundle)
    return folder


def test_engine_from_another_gpu_refused(run, tmp_path):
    here = current_trt_environment(torch.device("cuda") if torch.cuda.is_available() else None)
    if here == H100:
        pytest.skip("this machine is the one the fake engine claims")
    folder = _fake_engine_bundle(run, tmp_path / "bundle")
    with pytest.raises(BackendError, match="does not fit this machine") as exc:
        load_backend(folder, "tensorrt", device="cuda")
    assert "rebuild the engine here" in str(exc.value) and exc.value.exit_code == 2
    with pytest.raises(BackendError):
        TensorRTBackend(folder / "model.engine")


@pytest.mark.gpu
def test_cuda_torch_backend_precisions(run):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(2, 3, 64, 64)
    ref_phi, ref_logits = TorchBackend(run)(x)
    for precision, tol in (("fp32", 1e-4), ("tf32", 5e-3), ("bf16", 5e-2), ("fp16", 1e-2)):
        phi, logits = TorchBackend(run, "cuda", precision=precision, channels_last=True)(x)
        assert phi.is_cuda and phi.dtype == torch.float32
        cos = (phi.cpu() * ref_phi).sum(1)
        assert float(cos.mean()) > 1 - tol, precision


def test_io_binding_path_matches_plain_run(tiny_onnx):
    """The IO-binding code (used on GPUs) run on the CPU: same outputs as session.run."""
    plain = load_backend(tiny_onnx, "onnxruntime")
    bound = load_backend(tiny_onnx, "onnxruntime", io_binding=True)
    assert bound.describe()["io_binding"] and not plain.describe()["io_binding"]
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(2))
    for a, b in zip(plain(x), bound(x)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_ort_providers_pass_device_id_only_off_the_first_gpu():
    """ORT >= 1.26 logs a plugin-EP lookup warning whenever device_id is passed; cuda:0 needs
    none (ORT's default), other GPUs still get theirs."""
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert ort_providers("cpu", cpu, {"arena_extend_strategy": "kSameAsRequested"}) == [
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    assert ort_providers("cuda", gpu0) == [("CUDAExecutionProvider", {})]
    assert ort_providers("cuda", gpu1) == [("CUDAExecutionProvider", {"device_id": 1})]
    assert ort_providers("tensorrt", gpu1, {"trt_fp16_enable": True}) == [
        ("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": True}),
        ("CUDAExecutionProvider", {"device_id": 1})]
    assert ort_providers("cuda", gpu0, {"device_id": 0}) == [("CUDAExecutionProvider",
                                                              {"device_id": 0})]   # user's own


def test_cli_segment_torch_options_reach_the_backend(run, tmp_path, monkeypatch, capsys):
    """segment --precision/--channels-last reach TorchBackend; bf16 labels stay close to fp32;
    the options are refused (exit 2) for the exported backends."""
    import numpy as np
    from PIL import Image

    from spml_deploy.engine.backends import torch_backend as backends_mod
    from spml_deploy.cli import main

    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((64, 48), Image.BICUBIC).save(src / f"{i}.png")
    seen = []
    real_init = backends_mod.TorchBackend.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((self.precision, self.channels_last))

    monkeypatch.setattr(backends_mod.TorchBackend, "__init__", spy)
    main(["segment", str(run), str(src), str(tmp_path / "fp32"), "--quiet"])
    main(["segment", str(run), str(src), str(tmp_path / "bf16"), "--quiet", "--precision", "bf16",
          "--channels-last"])
    assert seen == [("fp32", False), ("bf16", True)]
    same = total = 0
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "fp32" / "labels" / f"{i}.png"))
        b = np.asarray(Image.open(tmp_path / "bf16" / "labels" / f"{i}.png"))
        same, total = same + int((a == b).sum()), total + a.size
    assert same / total > 0.95
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(run), str(src), str(tmp_path / "o"), "--backend", "onnxruntime",
              "--precision", "bf16"])
    assert exc.value.code == 2
    assert "apply to the torch backend" in capsys.readouterr().err


def test_cli_precision_choices_match_the_backend():
    from spml_deploy.engine.backends import CLI_PRECISIONS
    from spml_deploy.cli import PRECISIONS

    assert PRECISIONS == CLI_PRECISIONS


def test_backends_package_reexports_what_its_modules_define():
    """``spml_deploy.engine.backends`` names the objects of its modules (one definition each)."""
    import importlib

    import spml_deploy.engine.backends as pkg

    modules = [importlib.import_module(f"spml_deploy.engine.backends.{m}")
               for m in ("base", "torch_backend", "onnxruntime_backend", "tensorrt_backend")]
    for name in pkg.__all__:
        if name == "load_backend":
            continue
        owners = [m for m in modules if name in vars(m) and getattr(m, name) is getattr(pkg, name)]
        assert owners, f"{name} is not one of the backend modules' names"
    assert pkg.load_backend.__module__ == pkg.__name__
    assert {TorchBackend.__module__, TensorRTBackend.__module__} == {
        "spml_deploy.engine.backends.torch_backend", "spml_deploy.engine.backends.tensorrt_backend"}
