"""A new method is one Python module and one YAML: a throw-away method written into a temporary
directory (its module, an entry point naming it, its YAML in a config directory Hydra searches)
is validated by its own schema and unlearns the tiny model end to end, with nothing in kuda
changed."""

from __future__ import annotations

import textwrap

from conftest import install_plugin, read_json

MODULE = '''
"""A throw-away method: lower the forget tokens' log-probability, scaled."""
from __future__ import annotations

from dataclasses import dataclass, field

from kuda_cli.config import UnlearnConfig, bounded
from kuda_cli.unlearn.methods import Method, register_method, sequence_logprob


@dataclass
class ToyMethod(UnlearnConfig):
    trainable: list[str] = field(default_factory=lambda: ["down_proj"])
    scale: float = bounded(1.0, gt=0)


@register_method("toy", ToyMethod)
class Toy(Method):
    def loss(self, forget, retain):
        logp, lengths = sequence_logprob(self.ctx.model, forget)
        loss = self.cfg.scale * logp.sum() / lengths.sum()
        return loss, {"toy": float(loss.detach())}
'''

YAML = """
defaults:
  - /schema/unlearn/toy@_here_
  - _self_
method: toy
lr: 1.0e-3
steps: 2
batch_size: 2
max_length: 64
scale: 2.0
"""


def _plugin(tmp_path, monkeypatch):
    return install_plugin(
        tmp_path,
        monkeypatch,
        "kuda_cli.methods",
        "toy",
        textwrap.dedent(MODULE),
        {"unlearn/toy.yaml": YAML},
    )


def test_a_method_from_one_module_and_one_yaml_unlearns_the_tiny_model(kuda, tmp_path, monkeypatch):
    searchpath = _plugin(tmp_path, monkeypatch)
    args = ["unlearn", "model=tiny-random", "unlearn=toy", searchpath, "eval=none"]
    args += ["locate=fixed", "locate.layers=[1]", "hydra.run.dir=run"]
    kuda(*args, check=True)
    run = tmp_path / "run"
    metrics = read_json(run / "metrics.json")
    assert read_json(run / "meta.json")["status"] == "completed"
    assert metrics["train"]["method"] == "toy"
    assert metrics["train"]["trainable_parameters"] == 64 * 128  # layer 1's down_proj alone
    rows = [line for line in (run / "train_log.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2 and '"toy"' in rows[0]
    assert (run / "checkpoint" / "model.safetensors").exists()


def test_the_plugin_method_is_validated_by_its_own_schema(kuda, tmp_path, monkeypatch):
    searchpath = _plugin(tmp_path, monkeypatch)
    done = kuda("unlearn", "model=tiny-random", "unlearn=toy", searchpath, "unlearn.scale=-1")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unlearn.scale" in lines[0], done.stderr
    assert not (tmp_path / "outputs").exists()
    done = kuda("unlearn", "model=tiny-random", "unlearn.method=nope")
    assert done.returncode == 2
    assert "toy" in done.stderr and "kuda" in done.stderr  # the plugin is listed beside kuda's
