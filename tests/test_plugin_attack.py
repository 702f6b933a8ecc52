"""A new attack is one Python module: a throw-away attack written into a temporary directory (its
module and an entry point naming it; no YAML) gets its settings under eval.attack.<name>,
validated by its own schema, and runs in `kuda eval`, with nothing in kuda changed."""

from __future__ import annotations

import textwrap

from conftest import install_plugin, read_json

MODULE = '''
"""A throw-away attack: Gaussian noise on every weight."""
from dataclasses import dataclass

import torch

from kuda_cli.config import bounded
from kuda_cli.evaluate.attacks import Attack, register_attack, rescore, restored


@dataclass
class NoiseSettings:
    scale: float = bounded(1e-3, gt=0)


@register_attack("noise", NoiseSettings)
class Noise(Attack):
    @classmethod
    def run(cls, actx):
        with restored(actx.model), torch.no_grad():  # the model is given back afterwards
            for p in actx.model.parameters():
                p.add_(torch.randn_like(p) * actx.settings.scale)
            return rescore(actx)  # the run's metrics, nothing written to the run directory
'''
TINY = ["model=tiny-random", "eval.metrics=[perplexity]", "eval.perplexity.max_texts=2"]


def test_an_attack_from_one_module_scores_the_run_metrics_again(kuda, tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "kuda_cli.attacks", "noise", textwrap.dedent(MODULE), {})
    done = kuda("eval", *TINY, "eval.attacks=[noise]", "eval.attack.noise.scale=0")
    assert done.returncode == 2 and "eval.attack.noise.scale" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "outputs").exists()
    kuda("eval", *TINY, "eval.attacks=[noise]", "hydra.run.dir=ev", check=True)
    metrics = read_json(tmp_path / "ev" / "metrics.json")
    attacked = metrics["attacks"]["noise"]["perplexity"]
    assert set(attacked) == set(metrics["perplexity"])
    assert attacked["perplexity"] != metrics["perplexity"]["perplexity"]
