"""``spml-deploy benchmark``: latency and throughput of each backend on the same inputs.

Per backend: ``warmup`` untimed batches, then ``iters`` timed batches of ``batch`` synthetic
images of ``imgsz`` x ``imgsz``. Each batch is timed in three stages:

* ``preprocess``: :func:`spml_deploy.engine.preprocess.prepare_batch`, the segment job's own input path:
  the uint8 images are stacked into one (pinned, on CUDA) host buffer and copied to the device,
  where they are normalised (a quarter of the bytes of a float32 upload, no per-image float
  work on the host),
* ``network``: the backend call (embeddings + logits), synchronised on a GPU,
* ``postprocess``: logits upsampled to the input size (bilinear) and argmax
  (:func:`spml_deploy.engine.preprocess.class_argmax`) -> uint8 label maps on the host (the classifier
  read-out; k-means/random walk are the same host code for every backend).

Normalising each image to float32 on the host instead would copy four times the bytes to the
GPU and do per-image float work there (measurements in benchmarks/results/). On the CPU both
paths do the same float work (same values, same time).

``backends=None`` (the command line's default) runs the backends that can run here: torch,
ONNX Runtime when installed and the bundle has ``model.onnx``, TensorRT when installed, on a
GPU, with ``model.engine``; the others are listed once as unavailable, with the reason.

Reported per backend: median and p90 latency per batch (all stages), images/s from the median
end-to-end latency (stages in sequence, each synchronised), pipelined images/s (a second pass
without synchronisation in which the next batch is prepared while the network computes, as in
the segment job; on the CPU the stages cannot overlap and both figures agree) and images/s from
the median network time, per-stage medians, and the achieved TFLOP/s of the network
(``model.count_flops`` with the classifier, per image, times images/s).
A backend asked for by name that cannot be opened (not installed, no GPU, no
model.onnx/model.engine in ``path``, an engine from another GPU) is reported as skipped with the
reason (and a warning).
"""
from __future__ import annotations

import importlib.util
import logging
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from spml_deploy.artifacts import model_folder
from spml_deploy.engine.backends import ENGINE_FILE, KINDS, ONNX_FILE, Backend, load_backend
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import ExportError, SpmlError
from spml_deploy.engine.model import count_flops
from spml_deploy.engine.preprocess import class_argmax, prepare_batch

log = logging.getLogger(__name__)

DEFAULT_BACKENDS = KINDS


def available_backends(path: str | Path | Bundle,
                       device: str) -> tuple[list[str], dict[str, str]]:
    """The backends that can run ``path`` on ``device`` here, and why each other one cannot."""
    folder = path.folder if isinstance(path, Bundle) else model_folder(path)
    cuda = torch.device(device).type == "cuda"
    usable, missing = ["torch"], {}
    if importlib.util.find_spec("onnxruntime") is None:
        missing["onnxruntime"] = "onnxruntime is not installed (pip install 'spml-deploy[onnx]')"
    elif not (folder / ONNX_FILE).is_file():
        missing["onnxruntime"] = f"no {ONNX_FILE} here (spml-deploy export makes a bundle)"
    else:
        usable.append("onnxruntime")
    if not cuda:
        missing["tensorrt"] = "TensorRT runs on a CUDA GPU only (--device cuda)"
    elif importlib.util.find_spec("tensorrt") is None:
        missing["tensorrt"] = "tensorrt is not installed (NVIDIA's pip package or container)"
    elif not (folder / ENGINE_FILE).is_file():
        missing["tensorrt"] = f"no {ENGINE_FILE} here (spml-deploy export --trt builds it)"
    else:
        usable.append("tensorrt")
    return usable, missing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _time_backend(backend: Backend, images: list[np.ndarray], pp: Any, warmup: int,
                  iters: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"preprocess": [], "network": [], "postprocess": [], "total": []}
    dev = backend.device
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        x, _ = prepare_batch(images, pp, dev)
        _sync(dev)
        t1 = time.perf_counter()
        with torch.inference_mode():
            _, logits = backend(x)
        _sync(dev)
        t2 = time.perf_counter()
        labels = _read_out(logits, tuple(x.shape[-2:]))
        t3 = time.perf_counter()
        assert labels.shape[0] == len(images)
        if it >= warmup:
            for key, value in (("preprocess", t1 - t0), ("network", t2 - t1),
                               ("postprocess", t3 - t2), ("total", t3 - t0)):
                times[key].append(value)
    return times


def _read_out(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Logits [B, C, h, w] -> uint8 label maps [B, H, W] on the host (bilinear, argmax)."""
    with torch.inference_mode():
        up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear",
                                             align_corners=False)
        return class_argmax(up)


def _time_pipelined(backend: Backend, images: list[np.ndarray], pp: Any, iters: int) -> float:
    """Seconds per batch when the next batch is prepared while the network computes (as the
    segment job does): no synchronisation between the stages; the read-out of batch i waits
    for its network after batch i+1 is prepared. The median over ``iters`` batches."""
    dev = backend.device
    x, _ = prepare_batch(images, pp, dev)
    size = tuple(x.shape[-2:])
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        with torch.inference_mode():
            _, logits = backend(x)
        x, _ = prepare_batch(images, pp, dev)
        labels = _read_out(logits, size)
        times.append(time.perf_counter() - t0)
    assert labels.shape[0] == len(images)
    return float(np.median(times))


def _summary(times: dict[str, list[float]], batch: int, gflop_per_image: float,
             pipelined: float) -> dict[str, Any]:
    med = {k: float(np.median(v)) for k, v in times.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in times.items()}
    net_ips = batch / med["network"]
    return {
        "latency_ms": {"median": 1e3 * med["total"], "p90": 1e3 * p90["total"]},
        "stages_ms": {k: 1e3 * med[k] for k in ("preprocess", "network", "postprocess")},
        "network_ms_p90": 1e3 * p90["network"],
        "images_per_s": batch / med["total"],
        "pipelined_images_per_s": batch / pipelined,
        "network_images_per_s": net_ips,
        "tflops": gflop_per_image * net_ips / 1e3,
    }


def benchmark(path: str | Path | Bundle, backends: Sequence[str] | None = DEFAULT_BACKENDS,
              imgsz: int = 256, batch: int = 1, warmup: int = 5, iters: int = 30,
              device: str = "cpu", options: dict[str, dict[str, Any]] | None = None,
              seed: int = 0) -> dict[str, Any]:
    """Benchmark ``backends`` on the run folder or bundle ``path`` (verified once); returns a
    JSON-able dict.

    ``backends=None``: those that can run here (:func:`available_backends`); the result's
    ``unavailable`` maps the others to the reason. ``options`` maps a backend kind to keyword
    options for :func:`load_backend` (e.g. ``{"onnxruntime": {"threads": 2}, "torch":
    {"precision": "bf16"}}``).
    """
    if imgsz <= 0 or imgsz % 8:
        raise ExportError(f"--imgsz {imgsz} must be a positive multiple of 8")
    if batch < 1 or iters < 1 or warmup < 0:
        raise ExportError(f"invalid batch/iters/warmup: {batch}/{iters}/{warmup}")
    unknown = sorted(set(backends or ()) - set(KINDS))
    if unknown:
        raise ExportError(f"unknown backend(s) {', '.join(unknown)}",
                          fix=f"choose from {', '.join(KINDS)}")
    unavailable: dict[str, str] = {}
    bundle = load_bundle(path)
    if backends is None:
        backends, unavailable = available_backends(bundle, device)
        if unavailable:
            log.info("benchmark: not run here: %s",
                     "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    manifest = bundle.manifest
    pp = replace(manifest.preprocess, max_side=imgsz)
    gflop = count_flops(manifest.model, (imgsz, imgsz), with_classifier=True)
    images = _images(batch, imgsz, seed)
    results: dict[str, Any] = {}
    for kind in backends:
        try:
            backend = load_backend(bundle, kind, device, **(options or {}).get(kind, {}))
        except SpmlError as exc:          # not installed, no GPU, no model file, wrong GPU
            results[kind] = {"skipped": str(exc)}
            log.warning("benchmark: %s skipped: %s", kind, results[kind]["skipped"])
            continue
        try:
            times = _time_backend(backend, images, pp, warmup, iters)
            pipelined = _time_pipelined(backend, images, pp, iters)
            results[kind] = {**_summary(times, batch, gflop, pipelined),
                             "config": backend.describe()}
        finally:
            backend.close()
    return {
        "path": str(bundle.folder if isinstance(path, Bundle) else path),
        "model": {"backbone": manifest.model.backbone, "embed_dim": manifest.model.embed_dim,
                  "num_classes": manifest.num_classes, "gflop_per_image": gflop},
        "imgsz": imgsz, "batch": batch, "warmup": warmup, "iters": iters, "device": device,
        "machine": _machine(device),
        "backends": results,
        "unavailable": unavailable,
    }


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        import os

        info["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_table(result: dict[str, Any]) -> str:
    """The benchmark result as a Markdown table (one row per backend)."""
    m = result["model"]
    head = (f"{m['backbone']} (D={m['embed_dim']}, {m['gflop_per_image']:.2f} GFLOP/image), "
            f"{result['imgsz']}x{result['imgsz']}, batch {result['batch']}, device "
            f"{result['device']}, {result['iters']} iters after {result['warmup']} warm-up")
    rows = ["| backend | median ms | p90 ms | images/s | pipelined images/s | network ms | "
            "network images/s | TFLOP/s | preprocess ms | postprocess ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, r in result["backends"].items():
        if "skipped" in r:
            rows.append(f"| {kind} | skipped: {r['skipped'].splitlines()[0]} ||||||||| ")
            continue
        cfg = r.get("config", {})
        if "precision" in cfg:
            kind = (f"{kind} ({cfg['precision']}{', channels-last' if cfg.get('channels_last') else ''}"
                    f"{', compiled' if cfg.get('compile') else ''})")
        s = r["stages_ms"]
        rows.append(f"| {kind} | {r['latency_ms']['median']:.2f} | {r['latency_ms']['p90']:.2f} | "
                    f"{r['images_per_s']:.1f} | {r['pipelined_images_per_s']:.1f} | "
                    f"{s['network']:.2f} | "
                    f"{r['network_images_per_s']:.1f} | {r['tflops']:.4f} | "
                    f"{s['preprocess']:.2f} | {s['postprocess']:.2f} |")
    text = head + "\n\n" + "\n".join(rows)
    if result.get("unavailable"):
        text += "\n\nnot available here: " + "; ".join(
            f"{k} ({v})" for k, v in result["unavailable"].items())
    return text


def onnx_precisions(run_dir: str | Path | Bundle, fp32_onnx: str | Path, device: str,
                    hw: tuple[int, int], batch: int = 8, iters: int = 20, opset: int = 17,
                    manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """ONNX Runtime images/s of an fp32 ``model.onnx`` and of an fp16 export of the same run
    (``export --half``, written to a temporary file) on ``device``, at ``hw`` and ``batch``
    (median of ``iters`` synchronised calls after 3 warm-up calls), with the fp16 model's
    parity against the fp32 one. :func:`spml_deploy.export.bundle.export_bundle` reports it
    beside an fp32 export where ONNX Runtime runs on CUDA, so the fp16 gain is known before
    choosing ``--half``."""
    import tempfile

    from spml_deploy.engine.backends import OnnxRuntimeBackend
    from spml_deploy.export.onnx_export import export_onnx
    from spml_deploy.export.parity import margin_tolerance, parity, parity_sizes

    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {"input": [batch, 3, *hw], "iters": iters}
    with tempfile.TemporaryDirectory(prefix="spml-fp16-") as tmp:
        half_path = Path(tmp) / ONNX_FILE
        export_onnx(run_dir, half_path, opset=opset, imgsz=hw, batch=batch, half=True,
                    manifest=manifest)
        backends = {"fp32": OnnxRuntimeBackend(fp32_onnx, device),
                    "fp16": OnnxRuntimeBackend(half_path, device)}
        try:
            for name, be in backends.items():
                times = []
                for it in range(3 + iters):
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        be(x)
                    be.synchronize()
                    if it >= 3:
                        times.append(time.perf_counter() - t0)
                out[f"{name}_images_per_s"] = batch / float(np.median(times))
            out["fp16_parity"] = parity(backends["fp32"], backends["fp16"], parity_sizes(hw),
                                        batch=2, num_images=4, check=False,
                                        margin_tolerance=margin_tolerance(True))
        finally:
            for be in backends.values():
                be.close()
    out["fp16_speedup"] = out["fp16_images_per_s"] / out["fp32_images_per_s"]
    return out
