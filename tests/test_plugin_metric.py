"""A new metric is one Python module and one YAML: a throw-away metric written into a temporary
directory (its module, an entry point naming it, an eval option using it) gets its own settings
under eval.<name>, validated by its own schema, runs in `kuda eval` and `kuda unlearn`, and adds
its own figure to the run's summary, with nothing in kuda changed."""

from __future__ import annotations

import textwrap

from conftest import install_plugin, read_json

MODULE = '''
"""A throw-away metric: how many tokens the model writes before its first full stop."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kuda_cli.config import bounded
from kuda_cli.evaluate import Metric, ratio, register_metric


@dataclass
class ReplyLengthSettings:
    prompt: str = "The capital of France is"
    max_new_tokens: int = bounded(6, ge=1)


@register_metric("reply_length", ReplyLengthSettings)
class ReplyLength(Metric):
    @classmethod
    def compute(cls, ctx):
        settings, model = ctx.eval.reply_length, ctx.loaded.model
        ids = ctx.loaded.tokenizer(settings.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids.to(model.device), max_new_tokens=settings.max_new_tokens, do_sample=False
            )
        return {"reply_length": {"tokens": int(out.shape[1] - ids.shape[1])}}

    @classmethod
    def summarise(cls, before, after, settings):
        return {"reply_length_ratio": ratio(before, after, "reply_length.tokens")}
'''

YAML = """
defaults:
  - /schema/eval/eval@_here_
  - _self_
name: replies
metrics: [reply_length]
reply_length:
  max_new_tokens: 3
"""
TINY = ["model=tiny-random", "eval=replies"]


def _plugin(tmp_path, monkeypatch):
    return install_plugin(
        tmp_path,
        monkeypatch,
        "kuda_cli.metrics",
        "reply_length",
        textwrap.dedent(MODULE),
        {"eval/replies.yaml": YAML},
    )


def test_a_metric_from_one_module_and_one_yaml_evaluates_and_summarises(
    kuda, tmp_path, monkeypatch
):
    searchpath = _plugin(tmp_path, monkeypatch)
    kuda("eval", *TINY, searchpath, "hydra.run.dir=ev", check=True)
    assert 1 <= read_json(tmp_path / "ev" / "metrics.json")["reply_length"]["tokens"] <= 3
    args = ["unlearn", *TINY, searchpath, "locate=fixed", "locate.layers=[1]"]
    args += ["unlearn.steps=2", "unlearn.batch_size=2", "unlearn.max_length=64"]
    kuda(*args, "hydra.run.dir=run", check=True)
    metrics = read_json(tmp_path / "run" / "metrics.json")
    before, after = metrics["before"]["reply_length"], metrics["reply_length"]
    assert metrics["summary"] == {"reply_length_ratio": after["tokens"] / before["tokens"]}


def test_the_plugin_metric_is_validated_by_its_own_schema(kuda, tmp_path, monkeypatch):
    searchpath = _plugin(tmp_path, monkeypatch)
    done = kuda("eval", *TINY, searchpath, "eval.reply_length.max_new_tokens=0")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.reply_length.max_new_tokens" in lines[0], done.stderr
    done = kuda("eval", "model=tiny-random", searchpath, "eval.metrics=[nope]")
    assert done.returncode == 2 and "reply_length" in done.stderr  # listed beside kuda's own
    assert not (tmp_path / "outputs").exists()
