"""Attacks, registered by name: `eval.attacks` lists the ones a run applies to its evaluated model.

An attack asks whether knowledge is gone from the weights or only hidden: it changes the model
(relearning, quantization) or how it is read (logit lens, few-shot prompts) and scores the result
on the run's own metrics again, under `attacks.<name>` in metrics.json with the keys of the
un-attacked figures. An attack is one module of `evaluate/attacks/` (or, outside kuda, a module
named by an entry point of the group `kuda_cli.attacks`) defining an `Attack` subclass with
`@register_attack(name, Settings)`; its settings are `eval.attack.<name>`. Every attack leaves
the evaluated model as it found it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, make_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from kuda_cli.errors import ConfigError
from kuda_cli.evaluate import EvalContext, compute_metrics
from kuda_cli.plugins import Registry

ATTACKS_DIR = "attacks"  # in a run directory: each attack's answers, by name
REGISTRY = Registry("attack", __name__, "kuda_cli.attacks", "eval.attacks")
log = logging.getLogger(__name__)


@dataclass
class AttackContext:
    """What an attack may use: the evaluation it attacks, its settings, the starting model."""

    ctx: EvalContext  # the evaluated model, the run's eval and data configs
    settings: Any  # eval.attack.<name>
    # the starting model's evaluation (metrics.json, facts_answers.jsonl): `kuda unlearn`'s
    # before/, or the before/ of the run whose checkpoint `kuda eval` loaded; None otherwise
    before_dir: Path | None
    seed: int
    name: str = ""  # the attack's name: its answers go to the run's attacks/<name>/

    @property
    def model(self):
        return self.ctx.loaded.model

    @property
    def tokenizer(self):
        return self.ctx.loaded.tokenizer

    @property
    def starting_model(self):
        """A context manager lending the model with its starting weights, yielding (model,
        tokenizer, name) (`kuda unlearn` lends it as the fluency judge), or None where they are
        not at hand (`kuda eval`)."""
        return self.ctx.judge


class Attack:
    """Base class: an attack without settings."""

    name = ""
    schema: type | None = None  # its settings, eval.attack.<name>; set by register_attack
    needs_facts = False  # reads the data's facts: the data kind must provide them

    @classmethod
    def run(cls, actx: AttackContext) -> dict[str, Any]:
        """Its results (metrics.json's `attacks.<name>`)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg) -> None:
        """Checks before any model loads (`cfg`: the whole config), a ConfigError of one line."""


def register_attack(name: str, schema: type | None = None):
    """Register an Attack subclass as `name`, with the dataclass of its settings."""
    return REGISTRY.register(name, schema)


def get_attack(name: str) -> type[Attack]:
    return REGISTRY.get(name)


@cache
def attack_schema() -> type:
    """`eval.attack`: one section per attack with settings."""
    return make_dataclass(
        "AttackSettings",
        [
            (name, attack.schema, field(default_factory=attack.schema))
            for name, attack in REGISTRY.all().items()
            if attack.schema is not None
        ],
    )


def check_attacks(cfg) -> None:
    """Registered attacks, each on data it can read, each with its own checks (before any
    model loads)."""
    from kuda_cli.data.kinds import kind_of

    names = list(cfg.eval.get("attacks") or [])
    if names and not cfg.eval.metrics:
        raise ConfigError(
            f"eval.attacks={names} needs metrics to score the attacked model; "
            "pass eval.metrics=[...] (or eval.attacks=[])"
        )
    for name in names:
        attack = get_attack(name)  # one line naming the registered attacks when it is none
        if attack.needs_facts and not kind_of(cfg.data).provides_facts:
            raise ConfigError(
                f"eval.attacks has {name}, which reads facts; data={cfg.data.name} has none: "
                "pass data=facts (or drop it from eval.attacks)"
            )
        attack.check(cfg)


def run_attacks(
    ctx: EvalContext, before_dir: Path | None, seed: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, results) of each attack of `ctx.eval.attacks`, in order, as it finishes; each
    result carries the seconds it took."""
    for name in ctx.eval.attacks:
        attack = get_attack(name)
        settings = getattr(ctx.eval.attack, name) if attack.schema is not None else None
        log.info("attack %s", name)
        started = time.perf_counter()
        results = attack.run(AttackContext(ctx, settings, before_dir, seed, name))
        results["seconds"] = round(time.perf_counter() - started, 3)
        yield name, results


def rescore(
    actx: AttackContext,
    *,
    view: Any = None,
    metrics: list[str] | None = None,
    judge: Any = ...,
    under: str = "",
) -> dict[str, Any]:
    """The run's metrics (or `metrics` of them) on the model as it is now, through `view`; the
    answers it writes (facts_answers.jsonl, ...) go to the run's attacks/<name>/<under>/ (the
    run's own files are never touched); `judge` replaces the lent fluency judge."""
    eval_cfg = actx.ctx.eval
    if metrics is not None:
        eval_cfg = replace(eval_cfg, metrics=[m for m in eval_cfg.metrics if m in metrics])
    if eval_cfg.attack_figures == "forget":
        eval_cfg = replace(eval_cfg, metrics=[m for m in eval_cfg.metrics if m != "perplexity"])
        view = forget_figures(actx, view)
    out_dir = None
    if actx.ctx.out_dir is not None and actx.name:
        out_dir = actx.ctx.out_dir / ATTACKS_DIR / actx.name / under
        out_dir.mkdir(parents=True, exist_ok=True)
    ctx = replace(
        actx.ctx,
        eval=eval_cfg,
        out_dir=out_dir,
        view=view,
        judge=actx.ctx.judge if judge is ... else judge,
    )
    results: dict[str, Any] = {}
    for _, found in compute_metrics(ctx):
        results.update(found)
    return results


def forget_figures(actx: AttackContext, view: Any):
    """`view` (None: the configured sets) narrowed to the forget figures, for facts data."""
    from kuda_cli.data.fact_set import probes
    from kuda_cli.data.kinds import kind_of
    from kuda_cli.evaluate.attack_facts import FactsView

    if view is None:
        if not kind_of(actx.ctx.data).provides_facts:
            return None
        forget, _ = kind_of(actx.ctx.data).fact_sets(actx.ctx.data)
        view = FactsView(forget=probes(forget, actx.ctx.eval.facts.all_prompts))
    if not isinstance(view, FactsView):  # another metric's view (MUSE's KnowMemView)
        return view
    return replace(view, retain=False, fluency=False)


@contextmanager
def restored(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The model's state as it is now, on the host, put back after the block (an attack
    changes the evaluated model in place and no second copy sits on its device)."""
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    try:
        yield saved
    finally:
        with torch.no_grad():
            model.load_state_dict(saved)
