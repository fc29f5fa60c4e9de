"""The torch backend, the reference: the network from ``weights.pt`` in torch, with the command
line's precision, memory format and ``torch.compile`` options."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spml_deploy.engine.backends.base import Backend, refuse_unknown_options, resolve_device
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import BackendError

_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
#: ``--precision`` choices of the command line (``auto``: see :func:`torch_options`).
CLI_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
        refuse_unknown_options("torch", options)
        dev = resolve_device(device)
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
