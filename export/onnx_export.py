"""ONNX export of the inference graph: images -> (unit embeddings, class logits).

Exporter: torch 2.13's default (``dynamo=True``, torch.export based) needs the ``onnxscript``
package; the TorchScript-based exporter (``dynamo=False``) needs nothing more, folds the batch
norms into the convolutions, and gives a graph whose batch, height and width are truly dynamic
(the tests run it at sizes other than the export size). We use it and silence its deprecation
warning; the graph is checked with ``onnx.checker`` and by the parity checks of the bundle.

The run's manifest travels inside the file (``metadata_props["spml"]``), so a bare ``model.onnx``
is self-describing. ``metadata_props["spml_fp32_nodes"]`` lists the nodes of the L2
normalisation, which the TensorRT builder keeps in fp32.

``half=True`` stores the network and the classifier in fp16 with float32 inputs and outputs and
the L2 normalisation computed in fp32 (casts around it): meant for GPU runtimes (ONNX Runtime
CUDA, TensorRT strongly typed networks). ONNX Runtime's CPU provider runs it too (its parity is
checked like any export) but is slower than fp32 there.

``simplify=True`` runs onnx-simplifier when installed; when it is not, the export fails with the
pip line (a requested step is never silently skipped).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spml_deploy.artifacts import ONNX_METADATA_KEY, Manifest, provenance
from spml_deploy.engine.backends import FP32_NODES_METADATA_KEY, INPUT_NAME, OUTPUT_NAMES
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import ExportError, require
from spml_deploy.data.imageio import make_temp_file
from spml_deploy.engine.model import INPUT_MULTIPLE, SegmentationModel

log = logging.getLogger(__name__)

MIN_OPSET = 17
MAX_OPSET = 20          # the TorchScript exporter's newest opset in torch 2.13
DEFAULT_IMGSZ = 512


def dynamic_axes(dynamic: bool) -> dict[str, dict[int, str]]:
    """The ``dynamic_axes`` of the export (empty when static)."""
    if not dynamic:
        return {}
    return {INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            OUTPUT_NAMES[0]: {0: "batch", 2: "height_4", 3: "width_4"},
            OUTPUT_NAMES[1]: {0: "batch", 2: "height_4", 3: "width_4"}}


def as_hw(imgsz: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``imgsz`` as (height, width), each a positive multiple of 8."""
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    if h <= 0 or w <= 0 or h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
        raise ExportError(f"--imgsz {h}x{w} is not a positive multiple of {INPUT_MULTIPLE}",
                          fix="use e.g. --imgsz 512")
    return int(h), int(w)


def default_imgsz(manifest: Manifest) -> int:
    """The padded network input side the pipeline uses (``max_side`` rounded up to 8)."""
    side = manifest.preprocess.max_side or DEFAULT_IMGSZ
    m = max(manifest.preprocess.pad_multiple, INPUT_MULTIPLE)
    return -(-side // m) * m


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too low for this model (ReduceSum with axes as an "
                          f"input, Resize with dynamic scales; spml-deploy supports opset "
                          f"{MIN_OPSET}..{MAX_OPSET})", fix=f"use --opset {MIN_OPSET} (default)")
    if opset > MAX_OPSET:
        raise ExportError(f"opset {opset} is newer than torch's TorchScript exporter supports "
                          f"({MAX_OPSET})", fix=f"use --opset {MAX_OPSET} or lower")


def fp32_island(graph: Any) -> list[str]:
    """Names of the nodes between the last Resize and the ``embeddings`` output (the L2 norm)."""
    producer = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    stack = [OUTPUT_NAMES[0]]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen or node.op_type == "Resize":
            continue
        seen.add(node.name)
        if node.op_type not in ("Constant", "Cast"):
            found.append(node.name)
        stack.extend(node.input)
    return sorted(found)


def _torch_export(model: nn.Module, x: Tensor, path: Path, opset: int, dynamic: bool) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        try:
            torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes(dynamic),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})",
                              fix="report this with the model config; try another --opset") from exc


def require_onnxsim() -> Any:
    try:
        import onnxsim  # noqa: PLC0415 - optional
    except ImportError as exc:
        raise ExportError("--simplify needs onnx-simplifier, which is not installed",
                          fix="pip install onnxsim, or export without --simplify (ONNX Runtime "
                              "and TensorRT apply the same folding themselves)") from exc
    return onnxsim


def _simplify(model: Any) -> Any:
    simplified, ok = require_onnxsim().simplify(model)
    if not ok:
        raise ExportError("onnx-simplifier could not validate the simplified model",
                          fix="export without --simplify")
    return simplified


def export_onnx(run_dir: str | Path | Bundle, out_path: str | Path, opset: int = MIN_OPSET,
                dynamic: bool = True, imgsz: int | tuple[int, int] | None = None, batch: int = 1,
                half: bool = False, simplify: bool = False,
                manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export the network + inference classifier of ``run_dir`` (a run folder, bundle or
    opened :class:`Bundle`) to ``out_path`` (written atomically).

    ``imgsz``/``batch`` give the example input of the trace (and the only accepted shape when
    ``dynamic`` is False). ``manifest`` is the dict stored in the metadata (default: the run's
    manifest). Returns the export description: format, opset, input/output names, dynamic axes,
    precision, example shape, fp32 node names, seconds.
    """
    onnx = require("onnx", "onnx", "ONNX export")
    check_opset(opset)
    if batch < 1:
        raise ExportError(f"--batch must be at least 1, got {batch}")
    if simplify:
        require_onnxsim()                  # fail before any work
    t0 = time.perf_counter()
    source = load_bundle(run_dir)
    model, run_manifest = source.segmentation_model(), source.manifest
    h, w = as_hw(imgsz if imgsz is not None else default_imgsz(run_manifest))
    # half precision on copies: the bundle's model (shared, cached) stays fp32
    graph_model: nn.Module = (SegmentationModel(copy.deepcopy(model.net).half(),
                                                copy.deepcopy(model.classifier).half())
                              if half else model)
    graph_model.eval()
    x = torch.randn(batch, 3, h, w)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)                               # (permissions of the user's umask, not 0600)
    try:
        with torch.no_grad():
            _torch_export(graph_model, x, tmp, opset, dynamic)
        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        island = fp32_island(proto.graph)
        meta = manifest if manifest is not None else {**run_manifest.to_dict(),
                                                      "provenance": provenance()}
        del proto.metadata_props[:]
        for key, value in ((ONNX_METADATA_KEY, json.dumps(meta)),
                           (FP32_NODES_METADATA_KEY, json.dumps(island))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "spml-deploy"
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:  # noqa: BLE001 - onnx.checker.ValidationError and shape errors
            raise ExportError(f"onnx.checker rejected the exported graph ({str(exc).splitlines()[0]})",
                              fix="report this with the model config") from exc
        onnx.save(proto, str(tmp))
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info = {
        "format": "onnx",
        "file": out_path.name,
        "opset": opset,
        "exporter": f"torch {torch.__version__} TorchScript (dynamo=False)",
        "input_names": [INPUT_NAME],
        "output_names": list(OUTPUT_NAMES),
        "dynamic": dynamic,
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes(dynamic).items()},
        "example_shape": [batch, 3, h, w],
        "precision": "fp16 (fp32 L2 normalisation, fp32 I/O)" if half else "fp32",
        "half": half,
        "simplified": simplify,
        "classifier": getattr(model, "classifier_key", "f0"),
        "fp32_nodes": island,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("exported %s (opset %d, %s, example %s)", out_path, opset, info["precision"],
             info["example_shape"])
    return info
