"""`eval.attacks=[fewshot]`: each forget question preceded by k answered demonstrations: an
in-context cue to answer that can bring back knowledge an unlearned model only stopped
volunteering. Each metric of the run that has forget questions scores them so prefixed; the
starting model's answers to them are scored too where it is at hand (the reference:
demonstrations change what a model that knows answers as well).

- facts: k retain facts ("prompt answer" lines, drawn with the run's seed for each prompt)
  before each forget prompt (multiple choice and greedy answers).
- lm_eval: the WMDP tasks of eval.wmdp.tasks at num_fewshot = k: lm-eval's own few-shot
  prompt, its k demonstrations drawn from the other questions of the task (WMDP has no
  train or dev split), as adversarial WMDP evaluations do. MMLU is left out: it is not what
  the attack asks about, and its few-shot examples need a dev split a local run may not have.
- muse: KnowMem on the forget questions with k retain QA pairs (data.knowmem_retain, drawn
  with the run's seed) shown before MUSE's own in-context examples. Added, not swapped in: the
  prompt then differs from the un-attacked one by the demonstrations alone, and MUSE's examples
  (forget-domain pairs) still end the prompt, so the answer format is unchanged. Retain pairs
  teach no forget answer, as the retain facts do not on facts. KnowMem on the retain QA is not
  scored: its questions would meet their own answers among the demonstrations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from kuda_cli.config import bounded
from kuda_cli.data.fact_set import Fact, Probe, probes
from kuda_cli.data.kinds import kind_of
from kuda_cli.data.sources import load_split
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate.attack_facts import FactsView, PrefixedProbe, with_removed
from kuda_cli.evaluate.attacks import Attack, AttackContext, register_attack, rescore
from kuda_cli.evaluate.lm_eval_data import WMDP_DOMAINS
from kuda_cli.evaluate.metrics.facts import Facts
from kuda_cli.evaluate.metrics.lm_eval import LmEval
from kuda_cli.evaluate.metrics.muse import KnowMemView, Muse

SCORED = (Facts.name, LmEval.name, Muse.name)  # the metrics with forget questions to prefix


@dataclass
class FewshotSettings:
    k: int = bounded(5, ge=1)  # demonstrations before each forget question


def check_k(k: int, available: int, what: str) -> None:
    if available < k:
        raise ConfigError(
            f"eval.attack.fewshot.k={k} exceeds the {available} {what}; it must be at most "
            f"{available}"
        )


def demonstrated(chosen: list[Probe], retain: list[Fact], k: int, seed: int) -> list[Probe]:
    """Each probe with k distinct retain facts answered before it, one line each."""
    check_k(k, len(retain), "retain facts")
    rng = random.Random(seed)
    out = []
    for p in chosen:
        shots = rng.sample(retain, k)
        prefix = "".join(f"{f.prompt(0)} {f.target}\n" for f in shots)
        out.append(PrefixedProbe(p.fact, p.index, prefix=prefix))
    return out


def wmdp_tasks(tasks) -> list[str]:
    return [t for t in tasks if t in WMDP_DOMAINS]


def retain_pairs(data, k: int, seed: int) -> tuple[tuple[str, str], ...]:
    """k (question, answer) pairs of MUSE's retain QA, drawn with `seed`."""
    rows = load_split(data.knowmem_retain, "data.knowmem_retain", ("question", "answer"))
    check_k(k, len(rows), "retain QA pairs of data.knowmem_retain")
    return tuple((r["question"], r["answer"]) for r in random.Random(seed).sample(rows, k))


@register_attack("fewshot", FewshotSettings)
class Fewshot(Attack):
    @classmethod
    def check(cls, cfg) -> None:
        k, metrics = cfg.eval.attack.fewshot.k, list(cfg.eval.metrics)
        if not set(SCORED) & set(metrics):
            raise ConfigError(
                f"eval.attacks has fewshot, which scores the forget questions of the "
                f"{', '.join(SCORED)} metrics; pass eval.metrics=[{Facts.name},...] (or drop "
                "fewshot from eval.attacks)"
            )
        if Facts.name in metrics:
            check_k(k, len(kind_of(cfg.data).fact_sets(cfg.data)[1]), "retain facts")
        if LmEval.name in metrics:
            settings = LmEval.settings(cfg.eval)
            if not wmdp_tasks(settings.tasks):
                raise ConfigError(
                    f"eval.attacks has fewshot, which scores the WMDP tasks of eval.wmdp.tasks="
                    f"{list(settings.tasks)} with k demonstrations; there are none: add "
                    f"{', '.join(WMDP_DOMAINS)} (or drop fewshot from eval.attacks)"
                )
            if k <= settings.num_fewshot:
                raise ConfigError(
                    f"eval.attack.fewshot.k={k} adds nothing to eval.wmdp.num_fewshot="
                    f"{settings.num_fewshot}; pass eval.attack.fewshot.k={settings.num_fewshot + 1}"
                    " or more"
                )

    @classmethod
    def run(cls, actx: AttackContext) -> dict[str, Any]:
        found = with_removed(prefixed_scores(actx), actx)
        if actx.starting_model is not None:  # demonstrations change a model that knows, too
            with actx.starting_model():
                found["starting"] = prefixed_scores(actx, judge=None, under="starting")
        return found


def prefixed_scores(actx: AttackContext, judge: Any = ..., under: str = "") -> dict[str, Any]:
    """The forget questions of each metric of the run that has them, scored after k
    demonstrations."""
    metrics, k, seed = actx.ctx.eval.metrics, actx.settings.k, actx.seed
    found: dict[str, Any] = {}
    if Facts.name in metrics:
        forget, retain = kind_of(actx.ctx.data).fact_sets(actx.ctx.data)
        chosen = probes(forget, actx.ctx.eval.facts.all_prompts)
        view = FactsView(forget=demonstrated(chosen, retain, k, seed), retain=False, fluency=False)
        found.update(rescore(actx, view=view, metrics=[Facts.name], judge=judge, under=under))
    if LmEval.name in metrics:
        settings = LmEval.settings(actx.ctx.eval)
        shots = replace(settings, tasks=wmdp_tasks(settings.tasks), num_fewshot=k)
        eval_cfg = replace(actx.ctx.eval, **{LmEval.section: shots})
        attacked = replace(actx, ctx=replace(actx.ctx, eval=eval_cfg))
        found.update(rescore(attacked, metrics=[LmEval.name], judge=judge, under=under))
    if Muse.name in metrics:
        view = KnowMemView(retain_pairs(actx.ctx.data, k, seed))
        found.update(rescore(actx, view=view, metrics=[Muse.name], judge=judge, under=under))
    return found
