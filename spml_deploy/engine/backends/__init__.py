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

Modules: ``base`` (the interface, input/output names, device check), ``torch_backend``,
``onnxruntime_backend``, ``tensorrt_backend``; this package re-exports their public names and
holds :func:`load_backend`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from spml_deploy.engine.backends.base import (ENGINE_FILE, FP32_NODES_METADATA_KEY, INPUT_NAME,
                                              KINDS, ONNX_FILE, OUTPUT_NAMES, Backend)
from spml_deploy.engine.backends.onnxruntime_backend import (OnnxRuntimeBackend,
                                                             create_ort_session, ort_providers)
from spml_deploy.engine.backends.tensorrt_backend import (TensorRTBackend,
                                                          check_engine_compatible,
                                                          current_trt_environment)
from spml_deploy.engine.backends.torch_backend import CLI_PRECISIONS, TorchBackend, torch_options
from spml_deploy.engine.bundle import Bundle
from spml_deploy.errors import BackendError

__all__ = ["Backend", "CLI_PRECISIONS", "ENGINE_FILE", "FP32_NODES_METADATA_KEY", "INPUT_NAME",
           "KINDS", "ONNX_FILE", "OUTPUT_NAMES", "OnnxRuntimeBackend", "TensorRTBackend",
           "TorchBackend", "check_engine_compatible", "create_ort_session",
           "current_trt_environment", "load_backend", "ort_providers", "torch_options"]


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
