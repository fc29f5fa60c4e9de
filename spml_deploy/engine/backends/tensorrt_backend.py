"""The TensorRT backend: a bundle's ``model.engine`` with torch CUDA tensors as its inputs and
outputs, refused before deserialisation when it was built with another TensorRT or on another
GPU. tensorrt is imported when the backend opens."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spml_deploy.engine.backends.base import (ENGINE_FILE, INPUT_NAME, OUTPUT_NAMES, Backend,
                                              refuse_unknown_options, resolve_device)
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import BackendError, ManifestError, require


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
        refuse_unknown_options("tensorrt", options)
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
        dev = resolve_device(device)
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
