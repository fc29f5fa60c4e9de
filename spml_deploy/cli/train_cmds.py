"""``spml-deploy train`` and ``spml-deploy demo``: learn a model, or run the whole flow on the
built-in scenes."""
from __future__ import annotations

from pathlib import Path

import click

from spml_deploy.cli import CONTEXT, check_device, cli
from spml_deploy.cli import demo as demo_defaults
from spml_deploy.data.kinds import SUPERVISIONS


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
@click.option("--device", default="cpu", show_default=True, callback=check_device,
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
