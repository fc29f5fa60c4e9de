"""``spml-deploy export``: run folder -> deployment bundle, with parity checks.

A bundle is a folder holding

* ``model.onnx`` (always: the portable format; ``--half`` makes it the mixed-precision graph),
* ``model.engine`` with ``--format engine|all`` or ``--trt`` (raw TensorRT engine for this GPU),
* every file the run's ``spml.json`` lists (``weights.pt`` - so the torch backend and later
  re-exports work from a bundle -, ``config.json``, the prototype index, ...), same paths,
* ``spml.json`` (kind "bundle"): the run's model/preprocess/segmentation settings/classes/palette,
  the files with their sha256, and ``exports``: one entry per format with the opset or TensorRT version/GPU/compute
  capability, input/output names, dynamic axes, precision, the parity numbers and the sizes they
  were measured at, the device.

Parity: ONNX Runtime against torch, TensorRT against ONNX Runtime, each at two input sizes that
differ from the export size (and at another batch size) when the graph is dynamic. A failure
raises :class:`ExportError` with the numbers.

Everything is written to a hidden temporary folder next to ``out`` and renamed at the end: on any
error the temporary folder is removed and nothing half-written is left.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from spml_deploy.artifacts import Manifest, provenance, write_manifest
from spml_deploy.engine.backends import (ENGINE_FILE, INPUT_NAME, ONNX_FILE, OUTPUT_NAMES,
                                  OnnxRuntimeBackend, TensorRTBackend, TorchBackend)
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import ExportError, ManifestError, require
from spml_deploy.data.imageio import make_temp_dir
from spml_deploy.export.onnx_export import (as_hw, check_opset, default_imgsz, dynamic_axes,
                                            export_onnx, require_onnxsim)
from spml_deploy.export.parity import format_parity, margin_tolerance, parity, parity_sizes
from spml_deploy.engine.model import INPUT_MULTIPLE

log = logging.getLogger(__name__)

FORMATS = ("onnx", "engine", "all")
PARITY_IMAGES = 4


def default_bundle_path(run_dir: str | Path | Bundle) -> Path:
    """``<run>_bundle`` next to the run folder."""
    run_dir = (run_dir.folder if isinstance(run_dir, Bundle) else Path(run_dir)).resolve()
    return run_dir.with_name(run_dir.name + "_bundle")


def engine_profile(export_hw: tuple[int, int], sizes: list[tuple[int, int]], batch: int,
                   max_batch: int, max_side: int) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) input shapes covering the export size, the parity sizes and ``max_side``."""
    dims = [d for hw in [export_hw, *sizes] for d in hw]
    lo, hi = min(dims), max(dims + [max_side])
    return [1, 3, lo, lo], [batch, 3, *export_hw], [max_batch, 3, hi, hi]


def _check_engine_prerequisites() -> Any:
    """TensorRT importable and a CUDA GPU present, checked before anything is written."""
    import torch

    trt = require("tensorrt", "gpu", "building a TensorRT engine (--format engine / --trt)")
    if not torch.cuda.is_available():
        raise ExportError("a TensorRT engine is built on (and for) a CUDA GPU, and torch sees none",
                          fix="run the export on the GPU machine that will serve the engine, or "
                              "use --format onnx")
    return trt


def _copy_run_files(src: Path, dst: Path, manifest: Manifest) -> list[str]:
    copied = []
    for role, info in manifest.files.items():
        if role in ("onnx", "engine"):
            continue                          # re-exported, never copied from a source bundle
        rel = info["path"]
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
        copied.append(role)
    return copied


def _bundle_manifest(run: Manifest, run_dir: Path) -> Manifest:
    prov = provenance()
    prov.update({"source": str(run_dir), "source_kind": run.kind,
                 "source_created": run.provenance.get("created")})
    return Manifest(kind="bundle", model=run.model, preprocess=run.preprocess,
                    classes=list(run.classes), palette=[list(c) for c in run.palette],
                    segmentation=run.segmentation, training=dict(run.training), provenance=prov)


def export_bundle(run_dir: str | Path | Bundle, out: str | Path | None = None, format: str = "onnx",
                  trt: bool = False, half: bool = False, dynamic: bool = True,
                  imgsz: int | tuple[int, int] | None = None, opset: int = 17, batch: int = 1,
                  workspace: float = 4, simplify: bool = False, device: str = "cpu",
                  overwrite: bool = False, timing_cache: str | Path | None = None,
                  parity_images: int = PARITY_IMAGES, seed: int = 0,
                  max_side: int | None = None,
                  compare_half: bool | None = None) -> dict[str, Any]:
    """Export ``run_dir`` (a run folder, a bundle, or an opened :class:`Bundle`) to the bundle
    folder ``out``. The source is verified once and its weights are read once.

    ``compare_half``: also measure ONNX Runtime's images/s of an fp16 export beside the fp32
    one, with its parity (:func:`spml_deploy.export.benchmark.onnx_precisions`; the ONNX
    export's ``precisions`` entry). Default: for an fp32 export where ONNX Runtime runs on CUDA.

    ``max_side``: the deployed input size (images resized so their longest side is this before
    the network; it goes into the bundle's spml.json, which inference reads); default the
    run's. The copied config.json stays the training record.

    ``format``: onnx | engine | all (``trt=True`` adds the engine). ``device`` runs the torch
    reference and ONNX Runtime for the parity checks (the engine is built on the current CUDA
    device). ``overwrite`` replaces an existing ``out``. Returns the report: bundle path,
    exports (with parity), files, seconds. Errors are :class:`SpmlError` subclasses (exit 2).
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ExportError(f"unknown format '{format}'", fix=f"choose one of {', '.join(FORMATS)}")
    want_engine = trt or format in ("engine", "all")
    check_opset(opset)
    if batch < 1:
        raise ExportError(f"--batch must be at least 1, got {batch}")
    source = load_bundle(run_dir)      # missing / corrupt (sha256) files refuse here
    run_dir, run = source.folder, source.manifest
    if not source.has("weights"):
        raise ManifestError("spml.json lists no 'weights' file", path=run_dir,
                            fix="pass a run folder written by 'spml-deploy train'")
    out = Path(out) if out is not None else default_bundle_path(run_dir)
    if out.resolve() == run_dir.resolve():
        raise ExportError("the bundle cannot be written over its source folder", path=out,
                          fix="choose another --out")
    if out.exists() and not overwrite:
        raise ExportError("output folder already exists", path=out,
                          fix="choose another --out, or pass --overwrite to replace it")
    if max_side is not None:
        if max_side < INPUT_MULTIPLE:
            raise ExportError(f"--max-side must be at least {INPUT_MULTIPLE}, got {max_side}",
                              fix="e.g. --max-side 512")
        run = replace(run, preprocess=replace(run.preprocess, max_side=max_side))
    if simplify:
        require_onnxsim()
    trt_mod = _check_engine_prerequisites() if want_engine else None
    hw = as_hw(imgsz if imgsz is not None else default_imgsz(run))
    reference = TorchBackend(source, device)       # loads (and so validates) the weights
    sizes = parity_sizes(hw) if dynamic else [hw]
    pbatch = batch + 1 if dynamic else batch       # another batch size: batch is dynamic too
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.", suffix=".partial")   # umask mode
    try:
        bundle = _bundle_manifest(run, run_dir)
        copied = _copy_run_files(run_dir, tmp, run)
        onnx_info = export_onnx(source, tmp / ONNX_FILE, opset=opset, dynamic=dynamic, imgsz=hw,
                                batch=batch, half=half, simplify=simplify,
                                manifest=bundle.to_dict())
        ort = OnnxRuntimeBackend(tmp / ONNX_FILE, device)
        onnx_parity = parity(reference, ort, sizes, batch=pbatch, num_images=parity_images,
                             seed=seed, margin_tolerance=margin_tolerance(half))
        onnx_info.update(parity=onnx_parity, parity_reference=reference.describe(),
                         device=ort.describe()["device"], providers=ort.describe()["providers"])
        onnx_info.pop("fp32_nodes", None)
        if compare_half if compare_half is not None else (
                not half and ort.describe()["providers"][0] == "CUDAExecutionProvider"):
            from spml_deploy.export.benchmark import onnx_precisions

            onnx_info["precisions"] = onnx_precisions(source, tmp / ONNX_FILE, device, hw,
                                                      batch=max(batch, 8), opset=opset,
                                                      manifest=bundle.to_dict())
        bundle.exports.append(onnx_info)
        bundle.add_file(tmp, "onnx", ONNX_FILE)
        for role in copied:
            bundle.add_file(tmp, role, run.files[role]["path"])
        if want_engine:
            engine_info = _build_and_check_engine(
                trt_mod, source, tmp, bundle, ort, hw, sizes, batch, pbatch, half, opset,
                dynamic, workspace, timing_cache, parity_images, seed, run)
            bundle.exports.append(engine_info)
            bundle.add_file(tmp, "engine", ENGINE_FILE)
        ort.close()
        write_manifest(tmp, bundle)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = {"bundle": str(out), "formats": [e["format"] for e in bundle.exports],
              "exports": bundle.exports, "files": bundle.files,
              "seconds": round(time.perf_counter() - t0, 2)}
    log.info("bundle written to %s", out)
    return report


def _build_and_check_engine(trt: Any, source: Bundle, tmp: Path, bundle: Manifest,
                            ort: OnnxRuntimeBackend, hw: tuple[int, int],
                            sizes: list[tuple[int, int]], batch: int, pbatch: int, half: bool,
                            opset: int, dynamic: bool, workspace: float,
                            timing_cache: str | Path | None,
                            parity_images: int, seed: int, run: Manifest) -> dict[str, Any]:
    """Build model.engine in ``tmp``, then check it against ONNX Runtime."""
    from spml_deploy.export.tensorrt_build import build_engine, trt_major

    source = tmp / ONNX_FILE
    scratch = None
    if half and trt_major(trt) < 11:
        # TensorRT 10: fp16 through the builder flag on the fp32 graph (normalisation pinned fp32)
        scratch = tmp / ".model_fp32.onnx"
        export_onnx(source, scratch, opset=opset, dynamic=dynamic, imgsz=hw, batch=batch)
        source = scratch
    if dynamic:
        lo, opt, hi = engine_profile(hw, sizes, batch, max(batch, pbatch), default_imgsz(run))
    else:                                     # static graph: the profile is its one shape
        lo = opt = hi = [batch, 3, *hw]
    try:
        info = build_engine(source, tmp / ENGINE_FILE, lo, opt, hi, fp16=half,
                            workspace_gb=workspace, timing_cache=timing_cache)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    info["source_onnx"] = ONNX_FILE if scratch is None else "fp32 graph of model.onnx (not kept)"
    info.update(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic=dynamic,
                dynamic_axes={k: {str(a): n for a, n in v.items()}
                              for k, v in dynamic_axes(dynamic).items()})
    # the backend reads the engine's entry from the manifest: hand it the manifest to be
    provisional = Manifest(**{**bundle.__dict__, "exports": [*bundle.exports, info]})
    engine = TensorRTBackend(Bundle(tmp, provisional, verified=True), "cuda")
    try:
        result = parity(ort, engine, sizes, batch=pbatch, num_images=parity_images, seed=seed,
                        margin_tolerance=margin_tolerance(half))
    finally:
        engine.close()
    info.update(parity=result, parity_reference=ort.describe(), device=str(engine.device))
    log.info("TensorRT parity: %s", format_parity(result))
    return info


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished bundle into place (replacing ``out`` only with ``overwrite``)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise ExportError("output folder appeared during the export", path=out,
                          fix="choose another --out, or pass --overwrite")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / "bundle")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`export_bundle`'s report."""
    lines = [f"bundle: {report['bundle']} ({report['seconds']} s)"]
    for e in report["exports"]:
        if e["format"] == "onnx":
            head = f"  onnx   opset {e['opset']}, {e['precision']}, dynamic={e['dynamic']}"
        else:
            head = (f"  engine TensorRT {e['tensorrt']} on {e['gpu']} (sm {e['compute_capability']}),"
                    f" {e['precision']}, profile {e['profile']['min']}..{e['profile']['max']}")
        lines.append(head)
        lines.append(f"         parity vs {e['parity']['reference']}: {format_parity(e['parity'])}")
        if "precisions" in e:
            c = e["precisions"]
            lines.append(f"         ONNX Runtime at {c['input']}: fp32 {c['fp32_images_per_s']:.1f} "
                         f"images/s, fp16 (--half) {c['fp16_images_per_s']:.1f} images/s "
                         f"(x{c['fp16_speedup']:.2f}); fp16 parity: "
                         f"{format_parity(c['fp16_parity'])}")
    lines.append("  files: " + ", ".join(f"{v['path']}" for v in report["files"].values()))
    return "\n".join(lines)
