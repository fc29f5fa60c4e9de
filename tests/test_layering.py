"""Keeps the layering rules of ARCHITECTURE.md true by walking every module's imports.

Layers, bottom to top (a layer imports only the layers below it):

* foundation: ``spml_deploy.errors``, ``config``, ``artifacts``, ``sysinfo``, and ``spml_deploy.data``
  (dataset contract, image IO, built-in scenes);
* ``spml_deploy.engine``: the network, backends, preprocessing, k-means, random walk,
  prototype index, the inference pipeline;
* ``spml_deploy.evaluation``: metrics;
* the stages ``spml_deploy.training``, ``spml_deploy.export``, ``spml_deploy.serving``: each
  imports the core (the three packages above), never another stage;
* the application ``spml_deploy.cli`` (command line, demo): imports stages inside the commands
  that need them, so ``spml-deploy --help`` imports no stage and no heavy optional dependency.

Inside the core every import of the package's own modules is at module level (no import
hidden in a function body). ``spml_deploy/__init__.py`` is the public API: a table of names
resolved on first use (so importing the package loads nothing heavy), checked below.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {"training": "spml_deploy.training", "export": "spml_deploy.export",
          "serving": "spml_deploy.serving"}
APP = "spml_deploy.cli"
# core sub-package -> the core sub-packages it must not import
CORE_RULES = {"data": ("spml_deploy.engine", "spml_deploy.evaluation"),
              "engine": ("spml_deploy.evaluation",),
              "evaluation": ()}
FOUNDATION = ("errors.py", "config.py", "artifacts.py", "sysinfo.py", "__init__.py")
# Optional heavy dependencies that `spml-deploy --help` must never import.
HEAVY = ("tensorrt", "faiss", "onnxruntime", "onnx", "fastapi", "uvicorn", "ray")


def _imports(path: Path, top_only: bool = False) -> list[tuple[str, int, int, bool]]:
    """(module, line, level, at module level) of every import statement in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # `if TYPE_CHECKING:` blocks are for type checkers only (the public API's name table)
    typing_only = {id(c) for n in tree.body if isinstance(n, ast.If)
                   and getattr(n.test, "id", "") == "TYPE_CHECKING" for c in ast.walk(n)}
    top = {id(n) for n in tree.body}
    # imports under a module-level `if TYPE_CHECKING:` / `try:` count as module level
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, 0, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.lineno, node.level, id(node) in top))
    return [o for o in out if o[3]] if top_only else out


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _core_files() -> list[Path]:
    return [f for f in _files("spml_deploy") if "cli" not in f.relative_to(REPO / "spml_deploy").parts]


def _is(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_core_imports_no_stage_and_no_application():
    bad = []
    for f in _core_files():
        for mod, line, _, _ in _imports(f):
            if any(_is(mod, s) for s in (*STAGES.values(), APP)):
                bad.append(f"{f.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "core must not import stage packages or the CLI:\n" + "\n".join(bad)


def test_core_layers_import_only_downwards():
    bad = []
    for f in _core_files():
        rel = f.relative_to(REPO / "spml_deploy").parts
        if len(rel) == 1:
            assert rel[0] in FOUNDATION, f"{f}: a new top-level core module; put it in a sub-package"
            banned = ("spml_deploy.engine", "spml_deploy.evaluation")
        else:
            banned = CORE_RULES[rel[0]]
        for mod, line, _, _ in _imports(f):
            if any(_is(mod, b) for b in banned):
                bad.append(f"{f.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "a core layer imports a layer above it:\n" + "\n".join(bad)


def test_core_imports_its_own_modules_at_module_level():
    bad = [f"{f.relative_to(REPO)}:{line} imports {mod} inside a function"
           for f in _core_files() for mod, line, level, top in _imports(f)
           if not top and (level > 0 or _is(mod, "spml_deploy"))]
    assert not bad, "\n".join(bad)


def test_stages_use_absolute_imports_and_not_each_other():
    bad = []
    for folder, pkg in STAGES.items():
        for f in _files(folder):
            for mod, line, level, _ in _imports(f):
                if level > 0:
                    bad.append(f"{f.relative_to(REPO)}:{line} relative import (use '{pkg}.…')")
                top = mod.split(".")[0]
                if top in STAGES:
                    bad.append(f"{f.relative_to(REPO)}:{line} imports '{mod}' (use '{STAGES[top]}')")
                for other in (*STAGES.values(), APP):
                    if other != pkg and _is(mod, other):
                        bad.append(f"{f.relative_to(REPO)}:{line} imports another stage: {mod}")
    assert not bad, "\n".join(bad)


def test_cli_imports_stages_only_inside_commands():
    files = _files("spml_deploy/cli")
    assert files, "the application package spml_deploy/cli is missing"
    for path in files:
        for name, line, _, _ in _imports(path, top_only=True):
            assert not any(_is(name, s) for s in STAGES.values()), f"{path}:{line} {name}"
            assert name.split(".")[0] not in HEAVY, f"{path}:{line} {name}"


def test_help_imports_no_heavy_dependency():
    code = ("import sys\nfrom spml_deploy.cli import cli\n"
            "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "stages = [m for m in sys.modules if m.startswith(('spml_deploy.training', "
            "'spml_deploy.export', 'spml_deploy.serving'))]\n"
            "print('HEAVY', bad, 'STAGES', stages)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY [] STAGES []" in out.stdout, out.stdout + out.stderr


def test_public_api_is_lazy_and_complete():
    """``import spml_deploy`` loads neither torch nor a stage; every public name resolves to the
    object of the module the API table names."""
    code = ("import sys, spml_deploy\n"
            "print('LOADED', sorted(m for m in sys.modules if m == 'torch' or "
            "m.startswith('spml_deploy.')))\n"
            "import importlib\n"
            "for name, mod in spml_deploy._API.items():\n"
            "    assert getattr(spml_deploy, name) is getattr(importlib.import_module(mod), name), name\n"
            "print('OK', len(spml_deploy._API))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout
    assert "OK" in out.stdout
