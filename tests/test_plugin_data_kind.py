"""A new kind of data is one Python module and one YAML: a throw-away kind written into a
temporary directory (its module, an entry point naming it, a data option of that kind) gives
kuda trace its probes and kuda unlearn its texts, picks the evaluation that fits it, and is
validated by its own schema, with nothing in kuda changed."""

from __future__ import annotations

import textwrap

from conftest import install_plugin, read_json

MODULE = '''
"""A throw-away kind of data: two plain-text files, one forgotten, one kept, a line a text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from kuda_cli.config import bounded
from kuda_cli.data.kinds import DataKind, UnlearnTexts, register_kind, split_heldout
from kuda_cli.data.probes import from_questions


@dataclass
class LinesData:
    name: str = MISSING
    kind: str = "lines"
    forget_file: str = MISSING
    retain_file: str = MISSING
    min_words: int = bounded(3, ge=1)


def lines(path, min_words):
    return [t for t in Path(path).read_text().splitlines() if len(t.split()) >= min_words]


@register_kind("lines", LinesData)
class Lines(DataKind):
    eval_option = "none"

    @classmethod
    def unlearn_texts(cls, data):
        forget, forget_heldout = split_heldout(lines(data.forget_file, data.min_words))
        retain, retain_heldout = split_heldout(lines(data.retain_file, data.min_words))
        return UnlearnTexts(forget, retain, forget_heldout, retain_heldout)

    @classmethod
    def probes(cls, data, span, max_probes):
        rows = []
        for text in lines(data.forget_file, data.min_words):
            words = text.split()
            rows.append({"question": " ".join(words[:-1]), "answer": words[-1]})
        return from_questions(rows, "data.forget_file")

    @classmethod
    def probe_origin(cls, data):
        return f"lines: every forget line but its last word ({data.forget_file})"
'''

YAML = """
defaults:
  - /schema/data/lines@_here_
  - _self_
name: my_lines
forget_file: forget.txt
retain_file: retain.txt
"""
FORGET = [f"The secret ingredient number {i} is saffron" for i in range(12)]
RETAIN = [f"Paris is the capital of France, said person {i}" for i in range(12)]
TINY = ["model=tiny-random", "data=my_lines"]


def _plugin(tmp_path, monkeypatch):
    (tmp_path / "forget.txt").write_text("\n".join(FORGET))
    (tmp_path / "retain.txt").write_text("\n".join(RETAIN))
    return install_plugin(
        tmp_path,
        monkeypatch,
        "kuda_cli.data_kinds",
        "lines",
        textwrap.dedent(MODULE),
        {"data/my_lines.yaml": YAML},
    )


def test_a_data_kind_from_one_module_and_one_yaml_is_traced_and_unlearned(
    kuda, tmp_path, monkeypatch
):
    searchpath = _plugin(tmp_path, monkeypatch)
    trace = ["trace", *TINY, searchpath, "locate.samples=1", "locate.max_probes=2"]
    kuda(*trace, "hydra.run.dir=tr", check=True)
    layers = read_json(tmp_path / "tr" / "trace" / "layers.json")
    assert layers["probe_source"].startswith("lines: every forget line")
    args = ["unlearn", *TINY, searchpath, "locate.from_run=tr", "unlearn=ga"]
    args += ["unlearn.steps=2", "unlearn.batch_size=2", "unlearn.max_length=64"]
    kuda(*args, "hydra.run.dir=run", check=True)
    run = tmp_path / "run"
    config = (run / "config.yaml").read_text()
    assert "name: none" in config  # data=my_lines alone picked the eval its kind names
    rows = [line for line in (run / "train_log.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2 and read_json(run / "meta.json")["status"] == "completed"


def test_the_plugin_data_kind_is_validated_by_its_own_schema(kuda, tmp_path, monkeypatch):
    searchpath = _plugin(tmp_path, monkeypatch)
    done = kuda("unlearn", *TINY, searchpath, "data.min_words=0")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.min_words" in lines[0], done.stderr
    done = kuda("unlearn", *TINY, searchpath, "unlearn.target=unknown")  # KUDA needs subjects
    assert done.returncode == 2 and "names subjects" in done.stderr, done.stderr
    assert not (tmp_path / "outputs").exists()
