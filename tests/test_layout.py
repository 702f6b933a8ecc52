"""The layout's rules, checked on the tree: the library imports without Hydra, stages never import
each other, and no source file grows past 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kuda_cli"
LIBRARY = ("models", "data", "locate", "unlearn", "evaluate")
# modules of stages/ that are not stages: the registry and the helpers stages share
NOT_STAGES = {"__init__", "common"}


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_imports_without_hydra(package):
    """Every module of the package, imported in a fresh interpreter, leaves Hydra unimported."""
    modules = sorted(
        "kuda_cli." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for p in (SRC / package).rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'hydra' or m.startswith('hydra.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{package} imports Hydra: {done.stdout}"


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_stage_imports_another_stage():
    stages = {p.stem for p in (SRC / "stages").glob("*.py")} - NOT_STAGES
    assert {"trace", "unlearn", "eval", "report", "pick"} <= stages
    for stage in stages:
        imported = _imported(SRC / "stages" / f"{stage}.py")
        others = {f"kuda_cli.stages.{s}" for s in stages - {stage}}
        assert not imported & others, f"stages/{stage}.py imports {imported & others}"


def test_no_source_file_is_over_400_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
