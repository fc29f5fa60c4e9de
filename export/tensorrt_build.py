"""TensorRT engine build from the exported ONNX file (TensorRT Python API, versions 10 and 11).

* Parse the ONNX file (``OnnxParser.parse_from_file``), one optimisation profile
  (min/opt/max input shapes), workspace limit (``set_memory_pool_limit``), timing cache loaded
  from and saved back to a file (``create_timing_cache`` / ``set_timing_cache`` /
  ``get_timing_cache().serialize()``), ``build_serialized_network`` -> raw engine bytes written
  to ``model.engine`` (no header; what the engine needs to be loaded again is in ``spml.json``).
* Precision. The exported graph contains no softmax (it ends at logits; the pipeline's softmax is
  host code in fp32), so the layers to keep in fp32 are the L2 normalisation (listed by the
  exporter in the ONNX metadata ``spml_fp32_nodes``).

  - TensorRT 10 with an fp32 ONNX and ``fp16=True``: weak typing, ``BuilderFlag.FP16`` plus
    ``OBEY_PRECISION_CONSTRAINTS`` and fp32 precision/output types on the normalisation layers.
  - TensorRT 11 removed the weak-typing flags (FP16, OBEY_PRECISION_CONSTRAINTS, ...): networks
    are strongly typed, so fp16 must be in the ONNX itself. The exporter's ``half=True`` graph is
    exactly that (fp16 network and classifier, casts around an fp32 normalisation, fp32 I/O).
    An fp32 ONNX with ``fp16=True`` on TensorRT 11 is refused with that instruction.
  - A mixed-precision ONNX (fp16 initializers) is always built strongly typed (TensorRT 10:
    ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11: always on).

TensorRT is imported inside the functions; its absence is a MissingDependencyError.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from spml_deploy.artifacts import atomic_write_bytes
from spml_deploy.engine.backends import FP32_NODES_METADATA_KEY, INPUT_NAME
from spml_deploy.errors import ExportError, require

log = logging.getLogger(__name__)

Shape = Sequence[int]


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _onnx_facts(onnx_path: Path) -> tuple[bool, list[str]]:
    """(graph holds fp16 weights, names to keep in fp32) from the ONNX file.

    The names are those of the nodes the exporter listed in ``spml_fp32_nodes`` and of their
    output tensors (TensorRT's parser names layers after nodes and keeps tensor names).
    """
    onnx = require("onnx", "onnx", "reading the ONNX model before the TensorRT build")
    model = onnx.load(str(onnx_path), load_external_data=False)
    mixed = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    meta = {m.key: m.value for m in model.metadata_props}
    nodes = set(json.loads(meta.get(FP32_NODES_METADATA_KEY, "[]")))
    outputs = {o for n in model.graph.node if n.name in nodes for o in n.output}
    return mixed, sorted(nodes | outputs)


def check_profile(min_shape: Shape, opt_shape: Shape, max_shape: Shape) -> None:
    """min <= opt <= max element-wise, 4-D NCHW with 3 channels."""
    shapes = [tuple(int(v) for v in s) for s in (min_shape, opt_shape, max_shape)]
    if any(len(s) != 4 or s[1] != 3 for s in shapes):
        raise ExportError(f"profile shapes must be [batch, 3, height, width], got {shapes}")
    lo, opt, hi = shapes
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)) or min(lo) < 1:
        raise ExportError(f"optimisation profile needs 1 <= min <= opt <= max, got min {list(lo)}, "
                          f"opt {list(opt)}, max {list(hi)}", fix="check --imgsz and --batch")


def _constrain_fp32(trt: Any, network: Any, nodes: list[str]) -> int:
    """Pin the layers of the given ONNX nodes to fp32 (TensorRT 10 weak typing). Returns count."""
    if not nodes:
        return 0
    wanted = set(nodes)
    floats = {trt.float32, trt.float16}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        # the ONNX parser names a layer after its node, and keeps the node's output tensor names
        hit = layer.name in wanted or any(o.name in wanted for o in outs)
        if not hit or any(o.dtype not in floats for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        count += 1
    return count


def build_engine(onnx_path: str | Path, engine_path: str | Path, min_shape: Shape,
                 opt_shape: Shape, max_shape: Shape, fp16: bool = False, workspace_gb: float = 4,
                 timing_cache: str | Path | None = None) -> dict[str, Any]:
    """Build a TensorRT engine for ``onnx_path`` on the current CUDA device.

    Shapes are [batch, 3, height, width] of input ``images``. Returns the description stored in
    ``spml.json``: tensorrt version, gpu, compute capability, precision, profile, seconds.
    """
    import torch

    trt = require("tensorrt", "gpu", "building a TensorRT engine")
    if not torch.cuda.is_available():
        raise ExportError("building a TensorRT engine needs a CUDA GPU, and torch sees none",
                          fix="run the export on the GPU machine that will serve the engine")
    check_profile(min_shape, opt_shape, max_shape)
    if workspace_gb <= 0:
        raise ExportError(f"--workspace must be positive (GiB), got {workspace_gb}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    major = trt_major(trt)
    mixed, fp32_nodes = _onnx_facts(onnx_path)
    strongly_typed = mixed or major >= 11
    if fp16 and major >= 11 and not mixed:
        raise ExportError(f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed "
                          "networks only) and this ONNX file is fp32",
                          fix="export with --half: the exporter writes the mixed-precision graph "
                              "(fp16 network, fp32 L2 normalisation) that TensorRT 11 builds as is")
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError("TensorRT's ONNX parser rejected the model: " + "; ".join(errors[:5]),
                          path=onnx_path, fix="re-export with the default --opset 17")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, tuple(min_shape), tuple(opt_shape), tuple(max_shape))
    config.add_optimization_profile(profile)
    constrained = 0
    if fp16 and not strongly_typed:           # TensorRT 10, weak typing
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        constrained = _constrain_fp32(trt, network, fp32_nodes)
        if fp32_nodes and not constrained:
            raise ExportError("could not find the L2 normalisation layers to keep in fp32 "
                              f"(ONNX nodes/tensors {fp32_nodes})", path=onnx_path,
                              fix="re-export the ONNX with this spml-deploy version")
    cache_path = Path(timing_cache) if timing_cache else None
    cache_data = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_data)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT could not build the engine (see its log above)",
                          path=onnx_path, fix="try a larger --workspace or a smaller profile")
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    dev = torch.cuda.current_device()
    cc = torch.cuda.get_device_capability(dev)
    precision = ("fp16 (strongly typed from the mixed-precision ONNX; fp32 L2 normalisation)"
                 if mixed else "fp16 (builder flag; fp32 L2 normalisation)" if fp16 else "fp32")
    info = {
        "format": "engine",
        "file": engine_path.name,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(dev),
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "precision": precision,
        "strongly_typed": strongly_typed,
        "fp32_layers": constrained,
        "profile": {"min": list(min_shape), "opt": list(opt_shape), "max": list(max_shape)},
        "workspace_gb": workspace_gb,
        "timing_cache": str(cache_path) if cache_path else None,
        "source_onnx": onnx_path.name,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("built TensorRT %s engine %s in %.1f s", trt.__version__, engine_path, info["seconds"])
    return info
