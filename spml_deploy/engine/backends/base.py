"""The backend interface: the input and output names every backend shares, the device check
and :class:`Backend`, which maps images [B, 3, H, W] to embeddings and logits at a quarter of
the input size."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spml_deploy.artifacts import Manifest
from spml_deploy.engine.bundle import Bundle
from spml_deploy.engine.model import INPUT_MULTIPLE
from spml_deploy.errors import BackendError

INPUT_NAME = "images"
OUTPUT_NAMES = ("embeddings", "logits")
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
FP32_NODES_METADATA_KEY = "spml_fp32_nodes"
KINDS = ("torch", "onnxruntime", "tensorrt")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device (``cuda`` = the current GPU); refuses a GPU torch cannot see."""
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


def refuse_unknown_options(kind: str, options: dict[str, Any]) -> None:
    """Refuse keyword options a backend's constructor does not know."""
    if options:
        raise BackendError(f"unknown option(s) for the {kind} backend: {', '.join(sorted(options))}")


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
