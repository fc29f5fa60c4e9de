"""Keeps the layering rules of ARCHITECTURE.md true by walking every module's imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {"training": "spml_deploy.training", "export": "spml_deploy.export",
          "serving": "spml_deploy.serving"}
# Optional heavy dependencies that `spml-deploy --help` must never import.
HEAVY = ("tensorrt", "faiss", "onnxruntime", "onnx", "fastapi", "uvicorn", "ray")


def _imports(path: Path) -> list[tuple[str, int, int]]:
    """(module, line, level) of every import statement in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.lineno, node.level))
    return out


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_core_imports_no_stage():
    bad = []
    for f in _files("spml_deploy"):
        if f.name in ("cli.py", "demo.py"):
            continue  # the CLI layer imports stages, but only inside commands (checked below)
        for mod, line, _ in _imports(f):
            if any(mod == s or mod.startswith(s + ".") for s in STAGES.values()):
                bad.append(f"{f.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "core must not import stage packages:\n" + "\n".join(bad)


def test_stages_use_absolute_imports_and_not_each_other():
    bad = []
    for folder, pkg in STAGES.items():
        for f in _files(folder):
            for mod, line, level in _imports(f):
                if level > 0:
                    bad.append(f"{f.relative_to(REPO)}:{line} relative import (use '{pkg}.…')")
                top = mod.split(".")[0]
                if top in STAGES:
                    bad.append(f"{f.relative_to(REPO)}:{line} imports '{mod}' (use '{STAGES[top]}')")
                for other_pkg in STAGES.values():
                    if other_pkg != pkg and (mod == other_pkg or mod.startswith(other_pkg + ".")):
                        bad.append(f"{f.relative_to(REPO)}:{line} imports another stage: {mod}")
    assert not bad, "\n".join(bad)


def test_cli_imports_stages_only_inside_commands():
    for name in ("cli.py", "demo.py"):
        _check_top_level(REPO / "spml_deploy" / name)


def _check_top_level(path: Path) -> None:
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
    for name in names:
        assert not any(name.startswith(s) for s in STAGES.values()), name
        assert name.split(".")[0] not in HEAVY, name


def test_help_imports_no_heavy_dependency():
    code = ("import sys\nfrom spml_deploy.cli import cli\n"
            "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print('HEAVY', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
