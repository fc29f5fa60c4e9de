"""``spml-deploy data check|synth|weaken`` and ``spml-deploy eval``: dataset tools and scoring."""
from __future__ import annotations

import json
from pathlib import Path

import click

from spml_deploy.cli import CONTEXT, cli
from spml_deploy.data.kinds import WEAK_KINDS


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
