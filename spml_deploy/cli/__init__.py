"""The ``spml-deploy`` command line.

Each command parses its options, calls one function, and prints that function's report. Stage
packages (training, export, serving) and heavy optional dependencies are imported inside the
command that needs them, so ``spml-deploy --help`` stays fast and never imports TensorRT or FAISS.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import click

from spml_deploy import __version__
from spml_deploy.cli import demo as demo_defaults
from spml_deploy.data.kinds import SUPERVISIONS, WEAK_KINDS
from spml_deploy.errors import SpmlError

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="spml-deploy")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """SPML: weakly supervised semantic segmentation by pixel-to-segment contrastive learning.

    \b
    Typical flow:
      spml-deploy data synth scenes/          # built-in benchmark scenes (or bring your own)
      spml-deploy data check scenes/          # validate a dataset before a long training
      spml-deploy train scenes/ --supervision points --out runs/pts
      spml-deploy segment runs/pts images/ out/
      spml-deploy eval out/labels scenes/ --split val
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------------------------
# data


@cli.group(context_settings=CONTEXT)
def data() -> None:
    """Dataset tools: validate, generate the built-in scenes, derive weak annotations."""


@data.command("check", context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--deep", is_flag=True, help="Fully decode every image (finds truncated files; slower).")
def data_check(dataset: Path, as_json: bool, deep: bool) -> None:
    """Validate DATASET against the dataset contract and print a summary.

    Checks annotations.json (ids, categories, boxes/points/scribbles inside their images), that
    every image, mask and sparse label map is readable and of the right size, and the splits.
    Exit code 2 with a message naming the file, the entry and the fix on the first problem.
    """
    from spml_deploy.data.dataset import load_dataset

    ds = load_dataset(dataset, check_files=True, decode_images=deep)
    summary = ds.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(ds.format_summary())


@data.command("synth", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n-train", default=200, show_default=True, type=click.IntRange(min=0),
              help="Training images.")
@click.option("--n-val", default=50, show_default=True, type=click.IntRange(min=0),
              help="Validation images.")
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Random seed (output is deterministic).")
@click.option("--parts", is_flag=True, help="Figures made of look-alike parts told apart by layout "
              "(modelled on the paper's DensePose setting) instead of object scenes.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds a dataset.")
def data_synth(out: Path, n_train: int, n_val: int, size: int, seed: int, parts: bool,
               overwrite: bool) -> None:
    """Write the built-in benchmark scenes to OUT, in the dataset contract.

    Every image comes with its ground-truth mask and all four weak annotation kinds (tags, boxes,
    points, scribbles), so every supervision setting can be trained and scored offline.
    """
    from spml_deploy.data.synth import synthesize

    report = synthesize(out, n_train=n_train, n_val=n_val, size=size, seed=seed, parts=parts,
                        overwrite=overwrite)
    click.echo(report)


@data.command("weaken", context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--kind", "kinds", multiple=True, required=True,
              type=click.Choice(list(WEAK_KINDS)),
              help="Annotation kind to derive from masks/ (repeatable).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Random seed of the derived points/scribbles.")
@click.option("--replace", "replace_existing", is_flag=True,
              help="Drop existing annotations of the derived kinds first.")
def data_weaken(dataset: Path, kinds: tuple[str, ...], seed: int, replace_existing: bool) -> None:
    """Derive weak annotations of DATASET from its full masks (masks/<stem>.png).

    Uses the paper's protocol: tags = classes present; boxes = per-instance bounding boxes;
    points = one interior point per instance plus background points; scribbles = strokes through
    each instance and the background. Instances are connected components of each class.
    annotations.json is rewritten atomically (a backup is kept as annotations.json.bak).
    """
    from spml_deploy.data.weaken import weaken_dataset

    click.echo(weaken_dataset(dataset, kinds=kinds, seed=seed, replace=replace_existing))


# --------------------------------------------------------------------------------------------
# eval


@cli.command("eval", context_settings=CONTEXT)
@click.argument("pred_dir", type=click.Path(path_type=Path))
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--split", default="val", show_default=True,
              help="Split to score ('all' for every image with a mask).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write JSON here.")
@click.option("--allow-missing", is_flag=True,
              help="Count images without a prediction (as all-wrong) instead of failing.")
def eval_cmd(pred_dir: Path, dataset: Path, split: str, json_out: Path | None,
             allow_missing: bool) -> None:
    """Score label maps in PRED_DIR (<stem>.png, class ids) against DATASET's masks.

    Prints mIoU, per-class IoU, pixel accuracy and the confusion matrix. 255 in the ground truth
    is ignored.
    """
    from spml_deploy.evaluation.metrics import evaluate_folder

    result = evaluate_folder(pred_dir, dataset, split=split, allow_missing=allow_missing)
    click.echo(result.format_table())
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        click.echo(f"wrote {json_out}")


# --------------------------------------------------------------------------------------------
# train


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--device``: cpu, cuda or cuda:N, checked when the command line is parsed."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"'{value}' is not a device: use cpu, cuda or cuda:N",
                                 ctx=ctx, param=param)
    return value


def _parse_set(values: tuple[str, ...]) -> dict:
    """``--set section.key=value`` pairs -> nested dict (values parsed as YAML scalars/lists)."""
    import yaml

    out: dict = {}
    for item in values:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise click.BadParameter(f"'{item}' is not SECTION.KEY=VALUE (e.g. train.lr=0.01)",
                                     param_hint="--set")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


@cli.command("train", context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--supervision", type=click.Choice(list(SUPERVISIONS)),
              default="points", show_default=True, help="Which annotation trains the model.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to write.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML/JSON file overriding any config value (sections: model, preprocess, "
                   "loss, segmentation, train, compat).")
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              type=click.Choice(["tiny", "resnet18", "resnet50", "resnet101"]),
              help="Network size; tiny trains on a CPU in minutes. The resnets start from "
                   "ImageNet weights with --set train.pretrained=imagenet (downloaded once into "
                   "the torch hub cache) or =/path/to/resnet50.pth (a torchvision state dict).")
@click.option("--iters", type=click.IntRange(min=1),
              help="Embedding training iterations (preset: tiny 1200, resnets 30000). The final "
                   "classifier then trains for train.classifier_iters more (SPML runs only).")
@click.option("--batch", type=click.IntRange(min=1),
              help="Images per iteration (preset per supervision, spec §8; tiny: 8).")
@click.option("--crop", type=click.IntRange(min=8), help="Training crop size, multiple of 8.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Base learning rate (preset: tiny 0.03 from scratch, resnets 3e-3).")
@click.option("--device", default="cpu", show_default=True, callback=_check_device,
              help="cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue the run in --out (same step, same schedule).")
@click.option("--seed", type=click.IntRange(min=0), help="Random seed.")
@click.option("--val-every", type=click.IntRange(min=0),
              help="Score f0 on the val split every N steps (needs masks; 0 = only at the end).")
@click.option("--baseline", type=click.Choice(["pce", "ce"]),
              help="Train a baseline instead of SPML: pce = cross-entropy on the labelled pixels "
                   "of the weak labels; ce = cross-entropy on full masks.")
@click.option("--workers", type=click.IntRange(min=0),
              help="Data-loading worker processes (0 = in the training process).")
@click.option("--threads", type=click.IntRange(min=1),
              help="torch CPU threads (default: torch's, one per core). Idle threads wait "
                   "passively (OMP_WAIT_POLICY=PASSIVE unless set), so a busy shared machine "
                   "slows training less; on 2 cores --threads 1 may still be faster.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value, e.g. --set loss.lambda_c=0.5 (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(dataset: Path, supervision: str, out: Path, config_file: Path | None,
              preset_name: str, iters, batch, crop, lr, device, resume, seed, val_every, baseline,
              workers, threads, sets, quiet) -> None:
    """Learn SPML pixel embeddings (and the classifier f0) from DATASET's weak annotations.

    Values come from the preset for the supervision kind and network size (spec §8), then
    --config, then --set, then the explicit options. The resolved config is saved in the run
    folder together with weights, a resumable checkpoint and train_log.jsonl.
    """
    from spml_deploy.training.train import train

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    overrides = _parse_set(sets)
    tr = overrides.setdefault("train", {})
    for key, value in dict(iters=iters, batch=batch, crop=crop, lr=lr, seed=seed,
                           val_every=val_every, workers=workers, baseline=baseline).items():
        if value is not None:
            tr[key] = value
    result = train(dataset, supervision, out, preset_name=preset_name, config_file=config_file,
                   overrides=overrides, device=device, resume=resume, progress=not quiet,
                   echo=click.echo)
    click.echo(f"run written to {result['run']} ({result['steps']} steps)")
    if (result.get("f0_val") or {}).get("miou") is not None:     # None: a split without masks
        click.echo(f"val mIoU of f0 at step {result['f0_val']['step']}: "
                   f"{100 * result['f0_val']['miou']:.2f}")
    if result.get("val") and "classifier" in result["val"] and result["val"]["miou"] is not None:
        click.echo(f"val mIoU of the final classifier ({result['val']['classifier']}): "
                   f"{100 * result['val']['miou']:.2f}")


# --------------------------------------------------------------------------------------------
# segment


#: --precision choices (spml_deploy.engine.backends.CLI_PRECISIONS; repeated so --help imports no torch).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def torch_backend_options(f):
    """--precision, --channels-last/--no-channels-last and --compile (the torch backend)."""
    f = click.option("--compile", "compile_", is_flag=True,
                     help="torch backend: torch.compile the network (slow first batch; pays "
                          "off on long jobs on a GPU).")(f)
    f = click.option("--channels-last/--no-channels-last", default=None,
                     help="torch backend: channels-last memory format  [default: on with CUDA, "
                          "off on the CPU]")(f)
    return click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                        show_default=True,
                        help="torch backend: network precision; auto = bf16 on CUDA (embeddings "
                             "normalised, logits and everything after the network in fp32), "
                             "fp32 on the CPU; fp16 needs CUDA.")(f)


def _torch_options(backend: str, device: str, precision: str, channels_last: bool | None,
                   compile_: bool) -> dict:
    """The torch backend's keyword options, {} for the other backends (which refuse them)."""
    if backend != "torch":
        if precision != "auto" or channels_last is not None or compile_:
            raise click.UsageError(
                "--precision, --channels-last and --compile apply to the torch backend; an "
                f"exported {backend} model has its precision from 'spml-deploy export' (--half)")
        return {}
    from spml_deploy.engine.backends import torch_options

    return torch_options(device, precision, channels_last, compile_)


def segmentation_options(f):
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


def ray_options(f):
    """--ray [ADDRESS], --ray-workers and --ray-cpus (the job on a Ray cluster)."""
    f = click.option("--ray-cpus", type=click.IntRange(min=1), default=1, show_default=True,
                     help="CPUs (torch threads) per Ray worker.")(f)
    f = click.option("--ray-workers", type=click.IntRange(min=1), default=None,
                     help="Model replicas on Ray (default: the cluster's GPUs with --device "
                          "cuda, else its CPUs / --ray-cpus).")(f)
    return click.option(
        "--ray", "ray_address", is_flag=False, flag_value="local", default=None,
        metavar="[ADDRESS]",
        help="Run on Ray (pip install 'spml-deploy[ray]'): --ray alone starts a local Ray "
             "instance; --ray ADDRESS joins a cluster (host:6379, or 'auto' on one of its "
             "machines; the model and images must be at the same paths on every machine). One "
             "model replica per GPU with --device cuda, else one per --ray-cpus CPUs.")(f)


def _ray_kwargs(ray_address: str, ray_workers: int | None, ray_cpus: int) -> dict:
    return dict(address=None if ray_address == "local" else ray_address, workers=ray_workers,
                cpus_per_worker=ray_cpus)


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
@click.option("--device", default="cpu", show_default=True, callback=_check_device,
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
    backend_options = _torch_options(backend, device, **torch_opts)
    if ray_address is not None:
        from spml_deploy.serving.ray_job import run_segment_job_ray

        try:
            report = run_segment_job_ray(
                model, input, output, **_ray_kwargs(ray_address, ray_workers, ray_cpus),
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
@click.option("--device", default="cpu", show_default=True, callback=_check_device,
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
                       options={"torch": _torch_options("torch", device, **torch_opts)})
    click.echo(format_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# demo


@cli.command("demo", context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=Path("spml-demo"), show_default=True,
              help="Folder for the scenes, runs, label maps and overlays (re-running resumes).")
@click.option("--n-train", default=demo_defaults.DEMO_TRAIN, show_default=True,
              type=click.IntRange(min=1), help="Training scenes to generate.")
@click.option("--n-val", default=demo_defaults.DEMO_VAL, show_default=True,
              type=click.IntRange(min=1), help="Validation scenes (scored with their masks).")
@click.option("--iters", default=demo_defaults.DEMO_ITERS, show_default=True,
              type=click.IntRange(min=1), help="Embedding training iterations (every run).")
@click.option("--lr", default=demo_defaults.DEMO_LR, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Base learning rate (every run).")
@click.option("--classifier-iters", default=demo_defaults.DEMO_CLASSIFIER_ITERS, show_default=True,
              type=click.IntRange(min=1),
              help="Iterations of the final classifier f1 (SPML and partial CE).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the scenes and every run.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(out: Path, n_train: int, n_val: int, iters: int, lr: float, classifier_iters: int,
             seed: int, device: str, quiet: bool) -> None:
    """The main job end to end on the built-in scenes (minutes on 2 CPU cores).

    Generates scenes and trains three runs of the tiny network with the same recipe and budget:
    SPML from point labels, the partial cross-entropy baseline on the same points, and
    cross-entropy on the full masks as a reference. SPML and the partial baseline then go
    through the same stages (pseudo labels, final classifier f1, prototype memory). Every run
    segments the validation images; the demo prints each run's mIoU with the location of the
    label maps and overlays. Re-running with the same --out continues.
    """
    from spml_deploy.cli.demo import run_demo

    run_demo(out, n_train=n_train, n_val=n_val, iters=iters, lr=lr,
             classifier_iters=classifier_iters, seed=seed, device=device, echo=click.echo,
             progress=not quiet)


# --------------------------------------------------------------------------------------------
# retrieval


class _Coords(click.ParamType):
    """``X,Y`` or ``X,Y,W,H`` in whole pixels (fractions are refused, not rounded)."""

    def __init__(self, n: int, what: str):
        self.n, self.what = n, what
        self.name = "X,Y" if n == 2 else "X,Y,W,H"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from spml_deploy.serving.segments import QueryError, parse_coords

        try:
            return parse_coords(value, self.n, self.what)
        except QueryError as exc:
            self.fail(f"{exc.message} ({exc.fix})", param, ctx)


def _index_options(nlist: int | None, nprobe: int | None, ef_search: int | None) -> dict:
    return {k: v for k, v in (("nlist", nlist), ("nprobe", nprobe), ("ef_search", ef_search))
            if v is not None}


def _index_segmenter(model: Path | str, ray_address: str | None, ray_workers: int | None,
                     ray_cpus: int, batch: int, backend: str, device: str):
    """None (the build segments in this process) or the Ray segmenter of --ray."""
    if ray_address is None:
        return None
    from spml_deploy.serving.ray_job import ray_segmenter

    return ray_segmenter(model, **_ray_kwargs(ray_address, ray_workers, ray_cpus), batch=batch,
                         backend=backend, device=device)


@cli.group("index", context_settings=CONTEXT)
def index_group() -> None:
    """Segment index of an image collection, for 'spml-deploy query' and 'serve --index'."""


@index_group.command("build", context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", type=str)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Index folder to create (segments.sqlite + prototypes.npz).")
@click.option("--index-type", type=click.Choice(["flat", "ivf", "ivfpq", "hnsw"]), default="flat",
              show_default=True, help="flat: exact search; ivf/ivfpq/hnsw: approximate, for "
                                      "millions of segments (ivf/ivfpq are trained on this build).")
@click.option("--nlist", type=click.IntRange(min=1),
              help="ivf/ivfpq: inverted lists (default min(4 sqrt(n), n/39)).")
@click.option("--nprobe", type=click.IntRange(min=1),
              help="ivf/ivfpq: lists visited per query (default max(16, nlist/32)).")
@click.option("--ef-search", type=click.IntRange(min=1), help="hnsw: search breadth (default 64).")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Average each image's embeddings with those of its mirror image before "
                   "segmenting (two network passes per image; better retrieval). Kept by the "
                   "index: 'index add' and every query embed the same way.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images per network call.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the FAISS index into this many shards by segment id (files "
                   "prototypes.shard-S-of-N.npz; on several GPUs with faiss-gpu); queries merge "
                   "their results, the same hits as one index for flat.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@ray_options
def index_build(model: Path, images: str, out: Path, index_type: str, nlist: int | None,
                nprobe: int | None, ef_search: int | None, flip: bool, backend: str, device: str,
                batch: int, shards: int, as_json: bool, quiet: bool, ray_address: str | None,
                ray_workers: int | None, ray_cpus: int) -> None:
    """Index every image of IMAGES with MODEL (a run folder or bundle) into --out.

    \b
    IMAGES: a folder (searched recursively), a glob ('photos/**/*.jpg') or a .txt list.
    Each image is cut into k-means segments of the learned embedding (averaged with
    its mirror image's unless --no-flip; the model's test grid, 12x12 by default);
    every segment is stored with its unit prototype, predicted class, box, area and mask, and
    every image with its path relative to IMAGES (what 'serve' shows) and a hash of its pixels
    (so a query with an indexed image can leave that image out).
    Unreadable images are reported (failed.txt) and skipped; exit code 1 then.
    An interrupted build keeps the finished batches: finish it with 'spml-deploy index add'.
    """
    from spml_deploy.serving.ingest import build_index

    options = _index_options(nlist, nprobe, ef_search)
    if shards > 1:
        options["shards"] = shards
    try:
        report = build_index(model, images, out, index_type=index_type, backend=backend,
                             device=device, batch=batch, progress=not quiet,
                             index_options=options, flip=flip,
                             segmenter=_index_segmenter(model, ray_address, ray_workers, ray_cpus,
                                                        batch, backend, device))
    except KeyboardInterrupt:
        click.echo("interrupted: finished batches are stored; complete the index with "
                   f"'spml-deploy index add {out} {images}'", err=True)
        sys.exit(130)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if report.failed:
        sys.exit(1)


@index_group.command("add", context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("images", type=str)
@click.option("--model", type=click.Path(path_type=Path),
              help="Run folder or bundle (default: the one the index was built with; it must "
                   "hold the same weights).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images per network call.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@ray_options
def index_add(index_dir: Path, images: str, model: Path | None, backend: str, device: str,
              batch: int, as_json: bool, quiet: bool, ray_address: str | None,
              ray_workers: int | None, ray_cpus: int) -> None:
    """Add the images of IMAGES that INDEX_DIR does not hold yet (same path = already indexed).

    Rerunning an interrupted 'index build' or 'index add' with the same IMAGES resumes it.
    Images below the folder given to 'index build' are named relative to it, others relative
    to IMAGES.
    """
    from spml_deploy.serving.ingest import add_to_index, index_model

    try:
        segmenter = _index_segmenter(model or index_model(index_dir), ray_address, ray_workers,
                                     ray_cpus, batch, backend, device)
        report = add_to_index(index_dir, images, model_path=model, backend=backend,
                              device=device, batch=batch, progress=not quiet, segmenter=segmenter)
    except KeyboardInterrupt:
        click.echo("interrupted: finished batches are stored; rerun the same command to resume",
                   err=True)
        sys.exit(130)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if report.failed:
        sys.exit(1)


@cli.command("query", context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--point", type=_Coords(2, "point"),
              help="Query with the segment under this pixel (whole pixels).")
@click.option("--box", type=_Coords(4, "box"),
              help="Query with the pooled embedding inside this box (whole pixels).")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="M.png", help="Query with the pooled embedding inside this mask (image "
                                    "size; non-black = inside).")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Number of segments to return.")
@click.option("--class", "class_name", metavar="NAME",
              help="Only segments predicted as this class.")
@click.option("--exclude-self/--include-self", default=True, show_default=True,
              help="Leave out the segments of IMAGE itself when it is in the index (same "
                   "decoded pixels; otherwise its own neighbouring segments fill the top hits).")
@click.option("--model", type=click.Path(exists=True, path_type=Path),
              help="Run folder or bundle (default: the one the index was built with).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the hits as JSON (image: path relative to the indexed folder, path: "
                   "the full local path).")
@click.option("--show", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
              help="Also draw the query and the retrieved segments, highlighted in their images.")
def query_cmd(index_dir: Path, image: Path, point: tuple | None, box: tuple | None,
              mask: Path | None, k: int, class_name: str | None, exclude_self: bool,
              model: Path | None, backend: str, device: str, as_json: bool,
              show: Path | None) -> None:
    """Find the indexed segments most similar to a point, box or mask on IMAGE.

    Coordinates are whole pixels of IMAGE as a viewer shows it (EXIF orientation applied).
    Give exactly one of --point, --box, --mask. Hits are listed with the full path of their
    image on this machine (the HTTP service shows paths relative to the indexed folder).
    """
    from spml_deploy.data.imageio import read_image
    from spml_deploy.serving.retrieval import Retriever, render_hits
    from spml_deploy.serving.segments import query_region, read_mask

    if sum(v is not None for v in (point, box, mask)) != 1:
        raise click.UsageError("give exactly one of --point X,Y, --box X,Y,W,H or --mask M.png")
    if show is not None and show.parent.exists() and not show.parent.is_dir():
        raise click.BadParameter(f"{show.parent} is a file, not a folder", param_hint="--show")
    img = read_image(image)
    mask_arr = read_mask(mask) if mask is not None else None
    with Retriever(index_dir, model, backend=backend, device=device) as r:
        r.class_id(class_name)                          # unknown class: error before any work
        seg = r.segment(img)
        hits, desc = r.query(img, point=point, box=box, mask=mask_arr, k=k,
                             class_name=class_name, exclude_self=exclude_self, seg=seg)
        if show is not None:
            render_hits(hits, show, query_image=img,
                        query_mask=query_region(seg, point=point, box=box, mask=mask_arr))
    if as_json:
        click.echo(json.dumps({"query": desc, "hits": [h.to_dict(local_paths=True)
                                                       for h in hits]}, indent=2))
    else:
        click.echo(f"query: {desc}")
        if desc.get("excluded_images"):
            click.echo("IMAGE is in the index: its own segments are left out (--include-self "
                       "keeps them)")
        for rank, h in enumerate(hits, 1):
            x, y, w, h_ = h.box
            click.echo(f"{rank:3d}  {h.score:.4f}  {h.class_name:<14} {h.image}  "
                       f"box {x},{y},{w},{h_}  segment {h.segment_id}")
        if not hits:
            click.echo("no hits" + (f" of class {class_name}" if class_name else ""))
    if show is not None:
        click.echo(f"drawing: {show}")


def _finite(ctx, param, value):
    """Refuse nan/inf (click's FloatRange lets nan through)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


@cli.command("serve", context_settings=CONTEXT)
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Segment index folder (enables POST /v1/query).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the service has no authentication: keep loopback "
                   "unless a proxy in front of it handles access).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="TCP port.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--max-upload-mb", default=16.0, show_default=True, callback=_finite,
              type=click.FloatRange(min=0, min_open=True, max=1024 * 1024),
              help="Largest request body accepted (413 above).")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(min=1),
              help="Largest image accepted, from its header, before decoding (413 above).")
@click.option("--max-k", default=100, show_default=True, type=click.IntRange(min=1),
              help="Largest k for /v1/query.")
@click.option("--max-concurrent", default=2, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded and run at once (each may take the memory stated above).")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for a slot (at most 1 MiB of memory per uploaded file, "
                   "the rest in a temporary file); more get 503 with Retry-After.")
@click.option("--threads", type=click.IntRange(min=1),
              help="torch intra-op threads for the model (default: one per CPU; 1 is often "
                   "faster on a small shared CPU).")
def serve_cmd(model: Path, index_dir: Path | None, host: str, port: int, backend: str,
              device: str, max_upload_mb: float, max_pixels: int, max_k: int,
              max_concurrent: int, max_queue: int, threads: int | None) -> None:
    """HTTP service: POST /v1/segment, POST /v1/query (with --index), GET /healthz, docs at /docs.

    \b
    curl -F image=@photo.jpg http://127.0.0.1:8000/v1/segment
    curl -F image=@photo.jpg -F point=120,80 -F k=5 http://127.0.0.1:8000/v1/query

    Memory: one request can take up to about 50 bytes per pixel of --max-pixels (an RGBA
    upload with an RGBA mask; 6-10 for RGB or grey images) plus twice --max-upload-mb, 2.0 GB
    at the defaults (0.4 GB for RGB). At most --max-concurrent requests take it at once; the
    --max-queue waiting ones hold at most 1 MiB per uploaded file; more get 503 with
    Retry-After.
    """
    from spml_deploy.serving.http import serve

    def announce(url: str, memory: int) -> None:
        click.echo(f"serving {model}" + (f" with index {index_dir}" if index_dir else "")
                   + f" on {url} (docs: /docs); requests take at most about "
                   f"{memory / 1e9:.1f} GB at once", err=True)

    serve(model, index_dir, host=host, port=port, backend=backend, device=device,
          max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels, max_k=max_k,
          max_concurrent=max_concurrent, max_queue=max_queue, threads=threads,
          announce=announce)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into a message and exit code 2."""
    # Idle OpenMP threads sleep instead of spinning (read when torch loads its OpenMP runtime,
    # so before any command imports torch): on a busy or small shared CPU, spinning threads
    # steal the cores the working ones need. An explicit setting of the user's wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        cli.main(args=argv, prog_name="spml-deploy", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SpmlError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
