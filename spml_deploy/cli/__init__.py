"""The ``spml-deploy`` command line.

Each command parses its options, calls one function, and prints that function's report. Stage
packages (training, export, serving) and heavy optional dependencies are imported inside the
command that needs them, so ``spml-deploy --help`` stays fast and never imports TensorRT or FAISS.

This module holds the command group, :func:`main` and the options shared by several commands;
the commands live in one module per role (``data_cmds``: data tools and eval; ``train_cmds``:
train and demo; ``deploy_cmds``: segment, export, benchmark; ``retrieval_cmds``: index, query,
serve), imported at the end so that they register on :data:`cli`.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable

import click

from spml_deploy import __version__
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
# options shared by several commands


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--device``: cpu, cuda or cuda:N, checked when the command line is parsed."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"'{value}' is not a device: use cpu, cuda or cuda:N",
                                 ctx=ctx, param=param)
    return value


#: --precision choices (spml_deploy.engine.backends.CLI_PRECISIONS; repeated so --help imports no torch).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def torch_backend_options(f: Callable) -> Callable:
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


def torch_kwargs(backend: str, device: str, precision: str, channels_last: bool | None,
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


def ray_options(f: Callable) -> Callable:
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


def ray_kwargs(ray_address: str, ray_workers: int | None, ray_cpus: int) -> dict:
    """The Ray job's keyword options from --ray, --ray-workers and --ray-cpus."""
    return dict(address=None if ray_address == "local" else ray_address, workers=ray_workers,
                cpus_per_worker=ray_cpus)


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


# the command modules register their commands on `cli` when imported
from spml_deploy.cli import (data_cmds, deploy_cmds, retrieval_cmds,  # noqa: E402,F401
                             train_cmds)
