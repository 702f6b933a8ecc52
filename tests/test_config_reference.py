"""docs/config.md is generated from the schemas and conf/ by scripts/config_reference.py: it is
never out of date, `--check` says so in one line, and a schema the generator has not seen (a new
method) gets its section, keys, bounds and comments without the generator naming it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kuda_cli.config import UnlearnConfig, bounded, choice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import config_reference  # noqa: E402


def test_docs_config_md_is_the_generated_page():
    page = config_reference.render()
    written = config_reference.PAGE.read_text()
    assert written == page, (
        f"docs/config.md is out of date ({config_reference.difference(written, page)}); "
        "run make docs-config"
    )


def test_check_exits_1_with_one_line_when_the_page_is_stale(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config.md"
    stale.write_text(config_reference.render().replace("`unlearn.steps`", "`unlearn.stepz`"))
    monkeypatch.setattr(config_reference, "PAGE", stale)
    assert config_reference.main(["--check"]) == 1
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "2 lines differ" in said[0] and "make docs-config" in said[0]
    config_reference.main([])
    assert config_reference.main(["--check"]) == 0


@dataclass
class ToyMethod(UnlearnConfig):
    method: str = "toy"
    # how hard the toy pushes,
    # in toy units
    push: float = bounded(2.5, gt=0, le=10)
    mode: str = choice("soft", "soft", "hard")  # soft: the gentle one


def test_a_new_method_gets_its_own_keys_with_bounds_and_comments(monkeypatch):
    found = config_reference.all_schemas()
    with_toy = {**found, ("schema/unlearn", "toy"): ToyMethod}
    monkeypatch.setattr(config_reference, "all_schemas", lambda: with_toy)
    page = config_reference.render()
    section = page.split("### `unlearn` schema `toy` (`ToyMethod`)")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| `")}
    assert rows["| `unlearn.push`"] == (
        "| `unlearn.push` | float | `2.5` | > 0 and <= 10 | how hard the toy pushes, in toy units |"
    )
    assert rows["| `unlearn.mode`"].endswith("| `soft`, `hard` | soft: the gentle one |")
    assert "| `unlearn.steps`" not in rows  # a shared key the method leaves as it is
