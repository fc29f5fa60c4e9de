"""The command line's surface: every command, its arguments and its option names.

Scripts call these names: a command or option that disappears or is renamed breaks them. An
option that is retired stays, hidden (and warns that it is ignored); the table says which.
"""
from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from spml_deploy.cli import cli

# command -> (arguments, option names, hidden option names)
SURFACE = {
    "benchmark": (["path"], ["--backends", "--batch", "--channels-last", "--compile", "--device",
                             "--imgsz", "--iters", "--json", "--no-channels-last", "--precision",
                             "--warmup"], []),
    "data check": (["dataset"], ["--deep", "--json"], []),
    "data synth": (["out"], ["--n-train", "--n-val", "--overwrite", "--parts", "--seed", "--size"],
                   []),
    "data weaken": (["dataset"], ["--kind", "--replace", "--seed"], []),
    "demo": ([], ["--classifier-iters", "--device", "--iters", "--lr", "--n-train", "--n-val",
                  "--out", "--quiet", "--seed"], []),
    "eval": (["pred_dir", "dataset"], ["--allow-missing", "--json", "--split"], []),
    "export": (["run_dir"], ["--batch", "--device", "--dynamic", "--format", "--half", "--imgsz",
                             "--json", "--max-side", "--opset", "--out", "--overwrite",
                             "--simplify", "--static", "--timing-cache", "--trt", "--workspace"],
               []),
    "index add": (["index_dir", "images"], ["--backend", "--batch", "--device", "--json",
                                            "--model", "--quiet", "--ray", "--ray-cpus",
                                            "--ray-workers"], []),
    "index build": (["model", "images"], ["--backend", "--batch", "--device", "--ef-search",
                                          "--flip", "--index-type", "--json", "--nlist",
                                          "--no-flip", "--nprobe", "--out", "--quiet", "--ray",
                                          "--ray-cpus", "--ray-workers", "--shards"], []),
    "query": (["index_dir", "image"], ["--backend", "--box", "--class", "--device",
                                       "--exclude-self", "--include-self", "--json", "--mask",
                                       "--model", "--point", "--show", "-k"], []),
    "segment": (["model", "input", "output"],
                ["--backend", "--batch", "--channels-last", "--classifier", "--compile", "--crf",
                 "--device", "--kmeans-iters", "--knn-k", "--knn-search", "--no-channels-last",
                 "--no-crf", "--no-refine", "--overlay", "--precision", "--quiet", "--ray",
                 "--ray-cpus", "--ray-workers", "--refine", "--rw-alpha", "--rw-beta",
                 "--rw-squarings", "--skip-existing", "--test-grid"], ["--knn-search"]),
    "serve": (["model"], ["--backend", "--device", "--host", "--index", "--max-concurrent",
                          "--max-k", "--max-pixels", "--max-queue", "--max-upload-mb", "--port",
                          "--threads"], []),
    "train": (["dataset"], ["--baseline", "--batch", "--config", "--crop", "--device", "--iters",
                            "--lr", "--out", "--preset", "--quiet", "--resume", "--seed", "--set",
                            "--supervision", "--threads", "--val-every", "--workers"], []),
}


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    """(space-joined command path, command) of every leaf command below ``group``."""
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield " ".join(path + (name,)), cmd


def _surface(cmd: click.Command) -> tuple[list[str], list[str], list[str]]:
    options = [p for p in cmd.params if isinstance(p, click.Option)]
    return ([p.name for p in cmd.params if isinstance(p, click.Argument)],
            sorted(o for p in options for o in p.opts + p.secondary_opts),
            sorted(o for p in options if p.hidden for o in p.opts))


def test_command_tree_matches_the_table():
    found = {name: _surface(cmd) for name, cmd in _commands(cli)}
    assert sorted(found) == sorted(SURFACE), "commands added or removed: update SURFACE"
    for name, expected in SURFACE.items():
        assert found[name] == expected, f"spml-deploy {name}: arguments/options changed"
    root = sorted(o for p in cli.params if isinstance(p, click.Option) for o in p.opts)
    assert root == ["--verbose", "--version", "-v"]


def test_every_command_has_help():
    runner = CliRunner()
    for name, cmd in _commands(cli):
        res = runner.invoke(cli, [*name.split(), "-h"])
        assert res.exit_code == 0, (name, res.output)
        assert res.output.startswith(f"Usage: cli {name} "), (name, res.output)
        assert cmd.help and cmd.help.split()[0] in res.output


def test_module_entry_point_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "spml_deploy.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("Usage: spml-deploy [OPTIONS] COMMAND [ARGS]...")
    listed = out.split("Commands:", 1)[1].split()
    for name in cli.commands:
        assert name in listed, name
