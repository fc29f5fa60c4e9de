"""``spml-deploy segment``, ``export`` and ``benchmark``: run a model on images, export it to a
bundle, time its backends."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import click

from spml_deploy.cli import (CONTEXT, check_device, cli, ray_kwargs, ray_options,
                             torch_backend_options, torch_kwargs)


def segmentation_options(f: Callable) -> Callable:
    """--test-grid, --kmeans-iters, --knn-k, --rw-beta, --rw-alpha, --rw-squarings: overrides of
    the model's segmentation settings (spml.json); not given = the model's setting."""
    inherit = "  [default: the model's setting]"
    f = click.option("--rw-squarings", type=click.IntRange(min=0), default=None,
                     help="--refine: squarings of the walk's transition matrix (2^n steps)."
                          + inherit)(f)
    f = click.option("--rw-alpha", type=click.FloatRange(min=0), default=None,
                     help="--refine: exponent sharpening the affinities (a^alpha)." + inherit)(f)
    f = click.option("--rw-beta", type=click.FloatRange(min=0), default=None,
                     help="--refine: concentration of the affinities "
                          "exp(beta (cos - 1))." + inherit)(f)
    f = click.option("--knn-k", type=click.IntRange(min=1), default=None,
                     help="--classifier knn: neighbours that vote." + inherit)(f)
    f = click.option("--kmeans-iters", type=click.IntRange(min=1), default=None,
                     help="--classifier knn: k-means iterations of the segments." + inherit)(f)
    return click.option("--test-grid", type=click.IntRange(min=1), nargs=2, default=None,
                        metavar="ROWS COLS",
                        help="--classifier knn: k-means grid of the segments." + inherit)(f)


def _segmentation_overrides(**values) -> dict:
    """The --test-grid ... --rw-squarings values given on the command line (None: not given)."""
    return {k: (tuple(v) if k == "test_grid" else v) for k, v in values.items() if v is not None}


@cli.command("segment", context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("input", type=str)
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True, help="Runs the network; everything after it is shared code.")
@click.option("--classifier", type=click.Choice(["softmax", "knn"]), default="softmax",
              show_default=True, help="softmax: the trained classifier; knn: vote of the 20 most "
                                      "similar training segments (prototype memory).")
@click.option("--knn-search", type=click.Choice(["auto", "index", "exact"]), default=None,
              hidden=True, help="Ignored: a flat memory is searched exactly, an approximate "
                                "one through its FAISS index.")
@click.option("--refine/--no-refine", default=False, show_default=True,
              help="Random-walk refinement of the class scores (spec 7.2).")
@click.option("--crf/--no-crf", default=False, show_default=True,
              help="DenseCRF post-processing at the input size (spec 7.5; slow, on the CPU). "
                   "Needs the optional package pydensecrf2: pip install pydensecrf2 (builds "
                   "from source with a C++ compiler, about a minute).")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images per network call.")
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="cpu, cuda or cuda:N.")
@click.option("--overlay", is_flag=True, help="Also write overlays/<path>.png (labels over image).")
@click.option("--skip-existing", is_flag=True,
              help="Resume: skip images whose label map exists (and restore their results.jsonl "
                   "line if an interrupted run lost it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@segmentation_options
@ray_options
@torch_backend_options
def segment_cmd(model: Path, input: str, output: Path, backend: str, classifier: str,
                knn_search: str | None, refine: bool, crf: bool, batch: int, device: str, overlay: bool, skip_existing: bool,
                quiet: bool, test_grid: tuple[int, int] | None, kmeans_iters: int | None,
                knn_k: int | None, rw_beta: float | None, rw_alpha: float | None,
                rw_squarings: int | None, ray_address: str | None, ray_workers: int | None,
                ray_cpus: int, **torch_opts) -> None:
    """Segment every image of INPUT with MODEL (a run folder or an exported bundle).

    \b
    INPUT: a folder (searched recursively), a glob ('photos/**/*.jpg') or a .txt list of paths
    (one a line; relative paths are resolved against the folder holding the list).
    OUTPUT (a folder) receives labels/<path>.png, <path> being the image's path below INPUT
    without its extension (photos/a/b.jpg -> labels/a/b.png; palette PNG of class ids, input
    size), overlays/ with --overlay, results.jsonl (per image: path, label, size, class areas,
    timings) and failed.txt (unreadable images with the reason; the job carries on). Two images
    that would share a label map (a.png and a.jpg of one folder) are refused before any work.
    Exit code 1 if any image failed. Images above 100 Mpixel are refused as decompression
    bombs; the environment variable SPML_MAX_PIXELS changes the limit.
    With --ray the same job runs as a Ray Data pipeline, with the same outputs, resume and
    failed.txt. The k-means, kNN and random-walk settings are the model's (its training
    configuration, kept in spml.json) unless given.
    """
    from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline
    from spml_deploy.serving.segment import run_segment_job

    if knn_search is not None:
        click.echo("warning: --knn-search is ignored: the memory is searched exactly when its "
                   "index is flat, through its FAISS index otherwise", err=True)
    options = PipelineOptions(classifier=classifier, refine=refine, crf=crf,
                              **_segmentation_overrides(
                                  test_grid=test_grid, kmeans_iters=kmeans_iters, knn_k=knn_k,
                                  rw_beta=rw_beta, rw_alpha=rw_alpha, rw_squarings=rw_squarings))
    backend_options = torch_kwargs(backend, device, **torch_opts)
    if ray_address is not None:
        from spml_deploy.serving.ray_job import run_segment_job_ray

        try:
            report = run_segment_job_ray(
                model, input, output, **ray_kwargs(ray_address, ray_workers, ray_cpus),
                batch=batch, overlay=overlay, skip_existing=skip_existing, progress=not quiet,
                backend=backend, device=device, options=options, **backend_options)
        except KeyboardInterrupt:
            click.echo("interrupted: finished images are complete; rerun with --skip-existing",
                       err=True)
            sys.exit(130)
    else:
        pipe = load_pipeline(model, backend=backend, device=device, options=options,
                             **backend_options)
        try:
            report = run_segment_job(pipe, input, output, batch=batch, overlay=overlay,
                                     skip_existing=skip_existing, progress=not quiet)
        except KeyboardInterrupt:
            click.echo("interrupted: finished images are complete; rerun with --skip-existing",
                       err=True)
            sys.exit(130)
        finally:
            pipe.close()
    click.echo(report.format())
    click.echo(f"label maps in {output / 'labels'}" + (f", overlays in {output / 'overlays'}"
                                                       if overlay else ""))
    if report.failed:
        click.echo(f"{report.failed} image(s) failed: see {output / 'failed.txt'}", err=True)
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# export and benchmark


@cli.command("export", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder (default RUN_DIR_bundle).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "engine", "all"]), default="onnx",
              show_default=True, help="engine/all also build a TensorRT engine (needs tensorrt, GPU).")
@click.option("--trt", is_flag=True, help="Short for --format all: ONNX and the TensorRT engine.")
@click.option("--half", is_flag=True, help="fp16 weights (L2 normalisation kept in fp32).")
@click.option("--dynamic/--static", default=True, show_default=True,
              help="Dynamic batch, height and width axes.")
@click.option("--imgsz", type=click.IntRange(min=8),
              help="Export (and engine 'opt') input size; default the run's.")
@click.option("--max-side", type=click.IntRange(min=8),
              help="Deployed input size: every image is resized so its longest side is this "
                   "before the network (default the run's preprocess.max_side). Small objects "
                   "may need more than the training size.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(min=17),
              help="ONNX opset (17 or newer).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Export batch (engine 'opt' batch).")
@click.option("--workspace", default=4.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="TensorRT workspace in GiB.")
@click.option("--simplify", is_flag=True, help="Run onnxsim on the graph (needs onnxsim).")
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="Device for the parity checks (cpu, cuda or cuda:N).")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="TensorRT timing cache file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the report.")
def export_cmd(run_dir: Path, out, fmt, trt, half, dynamic, imgsz, max_side, opset, batch,
               workspace, simplify, device, timing_cache, overwrite, json_out) -> None:
    """Export RUN_DIR to a deployable bundle: model.onnx (+ model.engine), copied run files and
    spml.json with the parity numbers.

    Parity is checked at two input sizes different from the export size (so dynamic axes are
    really dynamic): max abs difference and mean cosine (>= 0.9999) of the embeddings, and label
    agreement (>= 99.9%), margin-aware: a pixel whose two best logits are closer than the
    numeric tolerance (1e-4 of the logit scale, 1e-2 with --half) is a tie either way and not
    counted; the raw agreement is reported beside it. A failed check exits non-zero with the
    numbers; nothing half-written is left behind.
    """
    from spml_deploy.export.bundle import export_bundle, format_report

    report = export_bundle(run_dir, out=out, format="all" if trt else fmt, trt=trt, half=half,
                           dynamic=dynamic, imgsz=imgsz, opset=opset, batch=batch,
                           workspace=workspace, simplify=simplify, device=device,
                           overwrite=overwrite, timing_cache=timing_cache, max_side=max_side)
    click.echo(format_report(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _parse_backends(ctx, param, value: str | None) -> list[str] | None:
    """--backends: a comma-separated list of known backend names (None: not given)."""
    if value is None:
        return None
    names = [b.strip() for b in value.split(",") if b.strip()]
    kinds = ("torch", "onnxruntime", "tensorrt")
    bad = [b for b in names if b not in kinds]
    if bad or not names:
        raise click.BadParameter(f"unknown backend(s) {', '.join(bad) or repr(value)}; choose "
                                 f"from {', '.join(kinds)}")
    return list(dict.fromkeys(names))


@cli.command("benchmark", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--backends", callback=_parse_backends, metavar="LIST",
              help="Comma-separated, from torch, onnxruntime, tensorrt  [default: those that "
                   "can run here; the others are listed once as unavailable]. A backend named "
                   "here that cannot run is reported as skipped, with the reason.")
@click.option("--imgsz", default=256, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--iters", default=30, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write JSON here.")
@torch_backend_options
def benchmark_cmd(path: Path, backends: list[str] | None, imgsz: int, batch: int, warmup: int,
                  iters: int, device: str, json_out: Path | None, **torch_opts) -> None:
    """Latency (median, p90), images/s, per-stage times and TFLOP/s of each backend on PATH
    (a run folder or bundle), after a warm-up. Preprocessing is the segment job's (uint8
    upload, normalisation on the device); --precision/--channels-last/--compile set the torch
    backend (ONNX Runtime and TensorRT run the exported model as it is)."""
    from spml_deploy.export.benchmark import benchmark, format_table

    result = benchmark(path, backends=backends, imgsz=imgsz, batch=batch, warmup=warmup,
                       iters=iters, device=device,
                       options={"torch": torch_kwargs("torch", device, **torch_opts)})
    click.echo(format_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
