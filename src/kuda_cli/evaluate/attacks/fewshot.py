"""`eval.attacks=[fewshot]`: each forget prompt preceded by k demonstrations, answered retain
facts ("prompt answer" lines, drawn with the run's seed for each prompt): an in-context cue to
answer that can bring back knowledge an unlearned model only stopped volunteering. The facts
metric scores the forget prompts so prefixed (multiple choice and greedy answers), and the
starting model's answers to them where it is at hand (the reference: demonstrations of other
domains change what a model that knows the facts answers too)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kuda_cli.config import bounded
from kuda_cli.data.fact_set import Fact, Probe, probes
from kuda_cli.data.kinds import kind_of
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate.attack_facts import FactsView, PrefixedProbe, with_removed
from kuda_cli.evaluate.attacks import Attack, AttackContext, register_attack, rescore
from kuda_cli.evaluate.metrics.facts import Facts


@dataclass
class FewshotSettings:
    k: int = bounded(5, ge=1)  # demonstrations before each forget prompt


def check_k(k: int, retain: list[Fact]) -> None:
    if len(retain) < k:
        raise ConfigError(
            f"eval.attack.fewshot.k={k} exceeds the {len(retain)} retain facts; it must be at "
            f"most {len(retain)}"
        )


def demonstrated(chosen: list[Probe], retain: list[Fact], k: int, seed: int) -> list[Probe]:
    """Each probe with k distinct retain facts answered before it, one line each."""
    check_k(k, retain)
    rng = random.Random(seed)
    out = []
    for p in chosen:
        shots = rng.sample(retain, k)
        prefix = "".join(f"{f.prompt(0)} {f.target}\n" for f in shots)
        out.append(PrefixedProbe(p.fact, p.index, prefix=prefix))
    return out


@register_attack("fewshot", FewshotSettings)
class Fewshot(Attack):
    needs_facts = True

    @classmethod
    def check(cls, cfg) -> None:
        if Facts.name not in cfg.eval.metrics:
            raise ConfigError(
                f"eval.attacks has fewshot, which scores the {Facts.name} metric; pass "
                f"eval.metrics=[{Facts.name},...] (or drop fewshot from eval.attacks)"
            )
        check_k(cfg.eval.attack.fewshot.k, kind_of(cfg.data).fact_sets(cfg.data)[1])

    @classmethod
    def run(cls, actx: AttackContext) -> dict[str, Any]:
        forget, retain = kind_of(actx.ctx.data).fact_sets(actx.ctx.data)
        chosen = probes(forget, actx.ctx.eval.facts.all_prompts)
        view = FactsView(
            forget=demonstrated(chosen, retain, actx.settings.k, actx.seed),
            retain=False,
            fluency=False,
        )
        found = with_removed(rescore(actx, view=view, metrics=[Facts.name]), actx)
        if actx.starting_model is not None:  # demonstrations change a model that knows, too
            with actx.starting_model():
                found["starting"] = rescore(
                    actx, view=view, metrics=[Facts.name], judge=None, under="starting"
                )
        return found
