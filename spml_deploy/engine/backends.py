"""Inference backends: torch (the reference), ONNX Runtime and TensorRT, behind one interface.

Every backend maps a batch of preprocessed images ``x`` [B, 3, H, W] (float32, normalised by
:func:`spml_deploy.engine.preprocess.preprocess`; H and W multiples of 8) to the same two tensors, as
float32 torch tensors on ``backend.device``:

* ``phi``    [B, D, H/4, W/4] unit-length pixel embeddings,
* ``logits`` [B, C, H/4, W/4] class logits of the inference classifier (``f1`` if trained, else ``f0``).

Everything after that (k-means, random walk, kNN, upsampling, argmax) is host code shared by all
backends (``pipeline.py``). The exported graph therefore ends at "embeddings and logits out".

``load_backend(model, kind, device, **options)`` opens a run folder or a bundle (``spml.json``),
or a bare ``model.onnx`` (the manifest is stored in its metadata) / ``model.engine`` in a bundle,
or an opened :class:`~spml_deploy.engine.bundle.Bundle` (not verified or loaded again).
onnxruntime and tensorrt are imported inside the backend that needs them.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spml_deploy.artifacts import Manifest
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.engine.model import INPUT_MULTIPLE
from spml_deploy.errors import BackendError, ManifestError, require

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("embeddings", "logits")
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
FP32_NODES_METADATA_KEY = "spml_fp32_nodes"
KINDS = ("torch", "onnxruntime", "tensorrt")
_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


# ------------------------------------------------------------------------------------------
# devices


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device '{device}' asked for, but torch sees no CUDA GPU",
                               fix="use --device cpu, or run on a machine with a CUDA GPU and a "
                                   "CUDA build of torch")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise BackendError(f"unsupported device '{device}'", fix="use cpu, cuda or cuda:N")
    return dev


# ------------------------------------------------------------------------------------------
# interface


class Backend:
    """Images [B,3,H,W] float32 -> (phi [B,D,H/4,W/4] unit, logits [B,C,H/4,W/4]) on ``device``."""

    name = "base"

    def __init__(self, bundle: Bundle, device: torch.device):
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.device = device
        self.input_name = INPUT_NAME
        self.output_names = OUTPUT_NAMES

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def embed_dim(self) -> int:
        return self.manifest.model.embed_dim

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise BackendError(f"{self.name} backend expects images [B,3,H,W], got {shape}",
                               fix="stack the outputs of pipeline.preprocess")
        h, w = x.shape[-2:]
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            raise BackendError(f"input size {h}x{w} is not a multiple of {INPUT_MULTIPLE}",
                               fix="pad images with pipeline.preprocess (pad_multiple 8)")

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(x)
        return self._run(x)

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued GPU work (for timing); a no-op on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device)}

    def close(self) -> None:
        """Release sessions/engines; the backend is unusable afterwards."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# torch


class TorchBackend(Backend):
    """The reference: the torch modules from ``weights.pt``.

    Options: ``precision`` fp32 | tf32 | fp16 | bf16 (fp16/bf16 = autocast; tf32 and fp16 need
    CUDA, bf16 also runs on the CPU; the L2 normalisation always runs in fp32),
    ``channels_last``, ``compile`` (``torch.compile``). :func:`torch_options` resolves the
    command line's ``auto`` defaults (bf16 + channels-last on CUDA, fp32 on the CPU).
    """

    name = "torch"

    def __init__(self, model: str | Path | Bundle, device: str = "cpu", precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False, **options: Any):
        _no_unknown_options("torch", options)
        dev = _device(device)
        bundle = load_bundle(model)
        super().__init__(bundle, dev)
        model = bundle.segmentation_model()
        if dev.type != "cpu" or channels_last:
            model = copy.deepcopy(model)     # the bundle's CPU model stays as it is
        if precision not in _PRECISIONS:
            raise BackendError(f"unknown precision '{precision}'", fix=f"one of {_PRECISIONS}")
        if precision in ("fp16", "tf32") and dev.type != "cuda":
            raise BackendError(f"precision {precision} needs a CUDA device (got {dev})",
                               fix="use precision fp32 (or bf16) on the CPU")
        self.precision = precision
        self.channels_last = channels_last
        self.classifier_key = model.classifier_key  # type: ignore[attr-defined]
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(dev, memory_format=memory_format).eval()
        self._model_fn = torch.compile(self.model) if compile else self.model
        self.compiled = compile

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tf32 = self.precision == "tf32"
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            with torch.inference_mode(), self._autocast():
                phi, logits = self._model_fn(x)     # L2 normalisation in fp32, fp32 outputs
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        return phi.contiguous(), logits.contiguous()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision,
                "channels_last": self.channels_last, "compile": self.compiled,
                "classifier": self.classifier_key}

    def close(self) -> None:
        self.model = self._model_fn = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------
# ONNX Runtime

_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}
_ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def create_ort_session(onnx_path: str | Path, providers: list, session_options: Any = None) -> Any:
    """An ``onnxruntime.InferenceSession`` whose first active provider is the one asked for.

    ``providers`` is ORT's list (names or ``(name, options)`` pairs), the requested one first.
    ONNX Runtime silently falls back to the CPU when a provider cannot be created; this refuses
    before (provider not in this build) and after (provider not active) with :class:`BackendError`.
    """
    ort = require("onnxruntime", "onnx", "the onnxruntime backend")
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise BackendError(f"ONNX Runtime provider {wanted} is not available in this onnxruntime "
                           f"build (available: {', '.join(available)})",
                           fix="install onnxruntime-gpu (pip install 'spml-deploy[gpu]') with "
                               "matching CUDA/cuDNN libraries, or use --device cpu")
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=session_options,
                                       providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception hierarchy
        raise BackendError(f"ONNX Runtime cannot load the model ({str(exc).splitlines()[0]})",
                           path=onnx_path, fix="re-export the bundle with this spml-deploy") from exc
    active = session.get_providers()
    if not active or active[0] != wanted:
        raise BackendError(f"ONNX Runtime was asked for {wanted} but the session runs on "
                           f"{active[0] if active else 'nothing'} (active providers: {active}); "
                           "refusing the silent fallback",
                           fix="check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs "
                               "(its log names the missing one), or use --device cpu")
    return session


def ort_providers(provider: str, device: torch.device,
                  provider_options: dict[str, Any] | None = None) -> list:
    """ONNX Runtime's provider list for ``provider`` (cpu | cuda | tensorrt) on ``device``.

    ``device_id`` is passed only for a GPU other than the first (ORT's default is 0). Since ONNX
    Runtime 1.26, a ``device_id`` option makes ORT first look for a registered *plugin* EP
    device of that name and, finding none (the wheels register none for CUDA), log "No
    registered plugin EP device found for 'CUDAExecutionProvider'" before it uses its built-in
    CUDA provider as always: harmless (``create_ort_session`` checks that the provider really
    runs), but alarming on every session, so it is not triggered on ``cuda:0``.
    """
    popts = dict(provider_options or {})
    if device.type != "cuda":
        return [(_ORT_PROVIDERS[provider], popts)]
    index = device.index or 0
    ids = {"device_id": index} if index else {}
    popts = {**ids, **popts}
    providers: list = [(_ORT_PROVIDERS[provider], popts)]
    if provider == "tensorrt":
        providers.append(("CUDAExecutionProvider", dict(ids)))
    return providers


class OnnxRuntimeBackend(Backend):
    """``model.onnx`` through ONNX Runtime.

    Options: ``provider`` cpu | cuda | tensorrt (default: cpu on the CPU, cuda on a GPU),
    ``threads`` (intra-op threads, default: CPUs available to this process), ``optimization``
    disable | basic | extended | all (graph optimisation level, default all), ``provider_options``
    (dict passed to the provider), ``io_binding`` (default: on for GPUs, where inputs and outputs
    are bound to torch CUDA tensors with no host copies; off on the CPU, where a plain
    ``session.run`` on numpy views is as fast).
    """

    name = "onnxruntime"

    def __init__(self, model: str | Path | Bundle, device: str = "cpu", provider: str | None = None,
                 threads: int | None = None, optimization: str = "all",
                 provider_options: dict[str, Any] | None = None, io_binding: bool | None = None,
                 **options: Any):
        _no_unknown_options("onnxruntime", options)
        ort = require("onnxruntime", "onnx", "the onnxruntime backend")
        dev = _device(device)
        bundle = load_bundle(model)
        onnx_path = bundle.model_file("onnx", ONNX_FILE)
        super().__init__(bundle, dev)
        provider = provider or ("cuda" if dev.type == "cuda" else "cpu")
        if provider not in _ORT_PROVIDERS:
            raise BackendError(f"unknown ONNX Runtime provider '{provider}'",
                               fix=f"one of {', '.join(_ORT_PROVIDERS)}")
        if (provider == "cpu") != (dev.type == "cpu"):
            raise BackendError(f"provider '{provider}' does not run on device {dev}",
                               fix="cpu provider with --device cpu; cuda/tensorrt with --device cuda")
        if optimization not in _ORT_OPT_LEVELS:
            raise BackendError(f"unknown optimization level '{optimization}'",
                               fix=f"one of {', '.join(_ORT_OPT_LEVELS)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.threads = int(threads) if threads else _default_threads()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = ort_providers(provider, dev, provider_options)
        self.onnx_path = onnx_path
        self.provider = _ORT_PROVIDERS[provider]
        self.io_binding = dev.type == "cuda" if io_binding is None else bool(io_binding)
        self.session = create_ort_session(onnx_path, providers, so)
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != [INPUT_NAME] or names_out != list(OUTPUT_NAMES):
            raise BackendError(f"ONNX model has inputs {names_in} and outputs {names_out}, expected "
                               f"['{INPUT_NAME}'] and {list(OUTPUT_NAMES)}", path=onnx_path,
                               fix="export it with 'spml-deploy export'")

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.io_binding:
            return self._run_bound(x)
        xn = x.detach().to("cpu", torch.float32).contiguous().numpy()
        phi, logits = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: xn})
        return torch.from_numpy(phi), torch.from_numpy(logits)

    def _run_bound(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Bind torch tensors on ``self.device`` as input and outputs (no host round trip)."""
        x = x.detach().to(self.device, torch.float32).contiguous()
        b, _, h, w = x.shape
        phi = torch.empty((b, self.embed_dim, h // 4, w // 4), device=self.device)
        logits = torch.empty((b, self.num_classes, h // 4, w // 4), device=self.device)
        binding = self.session.io_binding()
        kind, idx = self.device.type, self.device.index or 0
        binding.bind_input(INPUT_NAME, kind, idx, np.float32, tuple(x.shape), x.data_ptr())
        for name, t in zip(OUTPUT_NAMES, (phi, logits)):
            binding.bind_output(name, kind, idx, np.float32, tuple(t.shape), t.data_ptr())
        if kind == "cuda":
            # ORT runs on its own stream: the input must be ready before it starts;
            # run_with_iobinding synchronises that stream before returning, so the outputs are
            # complete afterwards.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return phi, logits

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.session.get_providers(),
                "threads": self.threads, "io_binding": self.io_binding,
                "model": str(self.onnx_path)}

    def close(self) -> None:
        self.session = None


# ------------------------------------------------------------------------------------------
# TensorRT


def current_trt_environment(device: torch.device | None) -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine (None where absent)."""
    env: dict[str, Any] = {"tensorrt": None, "gpu": None, "compute_capability": None}
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional dependency

        env["tensorrt"] = trt.__version__
    except ImportError:
        pass
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{major}.{minor}"
    return env


def check_engine_compatible(recorded: dict[str, Any], current: dict[str, Any],
                            engine_path: str | Path) -> None:
    """Refuse an engine built with another TensorRT version or on another GPU.

    ``recorded`` is the bundle's ``exports`` entry of the engine (keys ``tensorrt``, ``gpu``,
    ``compute_capability``); ``current`` is :func:`current_trt_environment`.
    """
    problems = []
    for key, label in (("tensorrt", "TensorRT version"), ("gpu", "GPU"),
                       ("compute_capability", "compute capability")):
        want = recorded.get(key)
        have = current.get(key)
        if want is None:
            problems.append(f"the bundle does not record the engine's {label}")
        elif str(want) != str(have):
            problems.append(f"{label}: engine built with {want}, this machine has "
                            f"{have if have is not None else 'none'}")
    if problems:
        raise BackendError("TensorRT engine does not fit this machine: " + "; ".join(problems),
                           path=engine_path,
                           fix="rebuild the engine here: spml-deploy export RUN_DIR --format engine "
                               "--device cuda (or use the onnxruntime backend with model.onnx)")


def _trt_torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise BackendError(f"unsupported TensorRT tensor type {dtype}",
                           fix="export the engine with float32/float16 inputs and outputs")
    return table[dtype]


class TensorRTBackend(Backend):
    """``model.engine`` (raw serialized TensorRT engine) with torch CUDA tensors as bindings.

    The bundle's ``exports`` entry records the TensorRT version, GPU and compute capability the
    engine was built with; any difference refuses with a clear :class:`BackendError` before the
    engine is deserialised. Input shapes must lie inside the optimisation profile (0).
    Works with the TensorRT 10 and 11 runtime APIs (name-based I/O tensors, execute_async_v3).
    """

    name = "tensorrt"

    def __init__(self, model: str | Path | Bundle, device: str = "cuda", **options: Any):
        _no_unknown_options("tensorrt", options)
        bundle = load_bundle(model)
        engine_path, manifest = bundle.model_file("engine", ENGINE_FILE), bundle.manifest
        entry = next((e for e in manifest.exports if e.get("format") == "engine"), None)
        if entry is None:
            raise ManifestError("spml.json has no 'engine' entry in 'exports'",
                                path=engine_path.parent,
                                fix="build the engine with spml-deploy export --format engine")
        dev = torch.device(device)
        check_engine_compatible(entry, current_trt_environment(
            dev if dev.type == "cuda" and torch.cuda.is_available() else None), engine_path)
        dev = _device(device)
        if dev.type != "cuda":
            raise BackendError("the tensorrt backend runs on a CUDA device", fix="use --device cuda")
        super().__init__(bundle, dev)
        trt = require("tensorrt", "gpu", "the tensorrt backend")
        self._trt = trt
        self.engine_path = engine_path
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(dev):
            self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self.engine is None:
                raise BackendError("TensorRT could not deserialise the engine (see its log above)",
                                   path=engine_path, fix="rebuild it with spml-deploy export")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names
                  if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [INPUT_NAME] or sorted(outputs) != sorted(OUTPUT_NAMES):
            raise BackendError(f"engine has inputs {inputs} and outputs {outputs}",
                               path=engine_path, fix="rebuild it with spml-deploy export")
        self.profile = [tuple(int(v) for v in s)
                        for s in self.engine.get_tensor_profile_shape(INPUT_NAME, 0)]
        self._dtypes = {n: _trt_torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def _check_profile(self, shape: tuple[int, ...]) -> None:
        lo, _, hi = self.profile
        if any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            raise BackendError(f"input shape {list(shape)} is outside the engine's optimisation "
                               f"profile: min {list(lo)}, max {list(hi)} (batch, 3, height, width)",
                               path=self.engine_path,
                               fix="resize/split the batch to fit, or rebuild the engine with a "
                                   "larger profile (--imgsz/--batch)")

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = tuple(int(s) for s in x.shape)
        self._check_profile(shape)
        x = x.to(self.device, self._dtypes[INPUT_NAME]).contiguous()
        ctx = self.context
        if not ctx.set_input_shape(INPUT_NAME, shape):
            raise BackendError(f"TensorRT rejected input shape {list(shape)}", path=self.engine_path)
        ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
        outs = {}
        for name in OUTPUT_NAMES:
            oshape = tuple(int(s) for s in ctx.get_tensor_shape(name))
            outs[name] = torch.empty(oshape, dtype=self._dtypes[name], device=self.device)
            ctx.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execution failed (see its log above)", path=self.engine_path)
        # everything ran on torch's current stream: the caching allocator keeps x alive until the
        # stream has consumed it, and callers reading the outputs on that stream see them complete
        return outs[OUTPUT_NAMES[0]].float(), outs[OUTPUT_NAMES[1]].float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tensorrt": self._trt.__version__,
                "profile": [list(s) for s in self.profile], "engine": str(self.engine_path)}

    def close(self) -> None:
        self.context = None
        self.engine = None


# ------------------------------------------------------------------------------------------
# factory


def _no_unknown_options(kind: str, options: dict[str, Any]) -> None:
    if options:
        raise BackendError(f"unknown option(s) for the {kind} backend: {', '.join(sorted(options))}")


#: ``--precision`` choices of the command line (``auto``: see :func:`torch_options`).
CLI_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def torch_options(device: str | torch.device, precision: str = "auto",
                  channels_last: bool | None = None, compile: bool = False) -> dict[str, Any]:
    """The torch backend's options from the command line's ``--precision``, ``--channels-last``
    and ``--compile``: ``auto`` precision is bf16 on CUDA (the network under bfloat16 autocast;
    embeddings normalised and logits returned in fp32) and fp32 on the CPU; channels-last
    (None = not given) is on with CUDA, off on the CPU, where it does not pay."""
    if precision not in CLI_PRECISIONS:
        raise BackendError(f"unknown precision '{precision}'",
                           fix=f"use one of {', '.join(CLI_PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    return {"precision": precision, "channels_last": cuda if channels_last is None
            else bool(channels_last), "compile": bool(compile)}


def load_backend(model: str | Path | Bundle, kind: str = "torch", device: str = "cpu",
                 **options: Any) -> Backend:
    """Open ``model`` (run folder, bundle, model file, or an opened :class:`Bundle`) with
    backend ``kind``.

    ``kind``: torch (run folder or bundle with weights.pt), onnxruntime (bundle or model.onnx),
    tensorrt (bundle with model.engine). ``options`` go to the backend's constructor.
    """
    if kind == "torch":
        return TorchBackend(model, device, **options)
    if kind in ("onnxruntime", "ort", "onnx"):
        return OnnxRuntimeBackend(model, device, **options)
    if kind in ("tensorrt", "trt"):
        return TensorRTBackend(model, device, **options)
    raise BackendError(f"unknown backend '{kind}'", fix=f"choose one of {', '.join(KINDS)}")
