"""The ONNX Runtime backend: ``model.onnx`` of a bundle on the CPU, CUDA or TensorRT execution
provider, refusing ONNX Runtime's silent fall back to the CPU. onnxruntime is imported when a
session is created."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spml_deploy.engine.backends.base import (INPUT_NAME, ONNX_FILE, OUTPUT_NAMES, Backend,
                                              refuse_unknown_options, resolve_device)
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import BackendError, require

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
        refuse_unknown_options("onnxruntime", options)
        ort = require("onnxruntime", "onnx", "the onnxruntime backend")
        dev = resolve_device(device)
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
