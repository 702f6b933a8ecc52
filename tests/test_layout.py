"""The layout's rules, checked on the tree: the library imports without Hydra, stages never import
each other, no source file grows past 400 lines, no function past 80, no stage past 150, Hydra's
private API is borrowed in one module, and no method or data kind is named outside its own
module."""

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


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_over_80_lines():
    long = {
        f"{p.relative_to(SRC)}:{f.name}": n
        for p in SRC.rglob("*.py")
        for f in _functions(p)
        if (n := f.end_lineno - f.lineno + 1) > 80
    }
    assert not long, long


def test_no_stage_is_over_150_lines():
    long = {
        p.name: n
        for p in (SRC / "stages").glob("*.py")
        if (n := len(p.read_text().splitlines())) > 150
    }
    assert not long, long


def test_hydra_private_api_is_borrowed_by_one_module_only():
    borrowing = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if any(name.startswith("hydra._internal") for name in _imported(p))
    )
    assert borrowing == ["hydra_private.py"], borrowing


# string constants equal to a plug-in's name that do not name the plug-in: the program's own name
# (a method is called kuda too), and a metric's own name in its module (metrics named like a kind)
NOT_PLUGIN_NAMES = {
    ("cli.py", "kuda"),
    ("compose.py", "kuda"),
    ("run.py", "kuda"),
    ("trackers/wandb.py", "kuda"),  # the default W&B project
    ("trackers/mlflow.py", "kuda"),  # the default MLflow experiment
    ("evaluate/metrics/facts.py", "facts"),
    ("evaluate/metrics/muse.py", "muse"),
    ("evaluate/metrics/tofu.py", "tofu"),
}


def test_no_method_or_data_kind_is_named_outside_its_own_module():
    from kuda_cli.data.kinds import REGISTRY as KINDS
    from kuda_cli.unlearn.methods import method_modules

    own = {name: f"unlearn/methods/{name}.py" for name in method_modules()}
    own |= {name: f"data/kinds/{name}.py" for name in KINDS.modules()}
    named = set()
    for path in SRC.rglob("*.py"):
        where = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text())):
            value = getattr(node, "value", None) if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and own.get(value, where) != where:
                named.add((where, value))
    assert not named - NOT_PLUGIN_NAMES, sorted(named - NOT_PLUGIN_NAMES)
