"""`eval.attacks=[relearn]`: fine-tune the evaluated model on half the forget data (A, split with
the run's seed) and score the run's metrics again after each step count: knowledge that comes
back beyond what was trained on was hidden, not removed. 0 steps is the un-attacked model.

On facts, the halves split the forget facts: the model trains on A's passages and the facts
metric scores B (held apart), A (`relearned`: an unlearned model relearns what it trains on) and
the invented-subject facts of the forget domains (`floor`: relearning that raises it teaches
guessing, not knowledge).
On a corpus (WMDP, MUSE), the halves split the forget texts kuda unlearn trained on, by text:
the model trains on A and the run's metrics (lm-eval's WMDP accuracy, MUSE's VerbMem, KnowMem
and PrivLeak) are scored as un-attacked; their questions name no text, so B is only held apart
(as the WMDP relearning attacks train on part of the forget corpus), and `split` records the
count and a SHA-256 of each half, never the texts."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from kuda_cli.config import bounded, listed
from kuda_cli.data.fact_set import probes
from kuda_cli.data.kinds import kind_of
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate.attack_facts import (
    FactsView,
    halves,
    removed_above_floor,
    removed_beside,
    with_removed,
)
from kuda_cli.evaluate.attacks import Attack, AttackContext, register_attack, rescore, restored
from kuda_cli.evaluate.metrics.facts import Facts, floor_facts
from kuda_cli.evaluate.relearning import fine_tune


@dataclass
class RelearnSettings:
    steps: list[int] = listed(0, 10, 25, 50, distinct=True, min_items=1)  # one trajectory
    lr: float = bounded(1e-5, gt=0)  # AdamW on every weight (Unlearn-Simple's relearning)
    batch_size: int = bounded(4, ge=1)  # texts per step
    max_length: int = bounded(256, ge=8)  # tokens per text
    # 0: every weight trains; > 0: LoRA adapters of this rank on every projection instead
    # (Łucki et al.'s relearning: rank 128, alpha 16, lr 2e-4), removed afterwards
    lora_rank: int = bounded(0, ge=0)
    lora_alpha: float = bounded(16.0, gt=0)


def check_relearning(name: str, cfg) -> None:
    """Step counts, and LoRA relearning only on a model without LoRA adapters of its own."""
    settings = cfg.eval.attack[name]
    check_steps(name, settings)
    unlearn_lora = (cfg.get("unlearn") or {}).get("lora") or {}
    if settings.lora_rank and cfg.get("stage") == "unlearn" and unlearn_lora.get("enabled"):
        raise ConfigError(
            f"eval.attack.{name}.lora_rank={settings.lora_rank} adds adapters to a model that "
            f"trains its own (unlearn.lora.enabled=true); attack the merged checkpoint with kuda "
            f"eval model.path=RUN/checkpoint, or set eval.attack.{name}.lora_rank=0"
        )


def check_steps(name: str, settings) -> None:
    bad = [s for s in settings.steps if s < 0]
    if bad or not settings.steps:
        raise ConfigError(
            f"eval.attack.{name}.steps={list(settings.steps)} must be step counts >= 0; pass "
            f"e.g. eval.attack.{name}.steps=[0,10,25,50]"
        )


def relearn_curve(
    actx: AttackContext,
    texts: list[str],
    view: FactsView | None,
    forget_ids: set[str] | None = None,
    relearned_ids: set[str] | None = None,
) -> dict[str, Any]:
    """`steps_N`: the run's metrics (through `view`) after N steps of fine-tuning on `texts`,
    with `forget_removed` on the forget split (the facts `forget_ids`, None: all) and
    `relearned_removed` on the relearned split (`relearned_ids`) beside the un-attacked
    model's; the model is given back as it was."""
    settings, ctx = actx.settings, actx.ctx
    out: dict[str, Any] = {}
    with restored(actx.model):
        for steps, losses in fine_tune(
            actx.model,
            actx.tokenizer,
            texts,
            list(settings.steps),
            lr=settings.lr,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            seed=actx.seed,
            lora_rank=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
        ):
            found = with_removed(rescore(actx, view=view, under=f"steps_{steps}"), actx, forget_ids)
            found["loss"] = losses[-1] if losses else None
            figures = found.get(Facts.name, {})
            if "floor" in figures and "forget_removed" in found:
                # fine-tuning on facts' passages also teaches their answers' form: the attacked
                # model's own floor says how much of a recovery a model that never knew gets
                found["forget_removed"]["above_attacked_floor"] = removed_above_floor(
                    actx.before_dir, forget_ids, figures["forget"], figures["floor"]
                )
            if relearned_ids is not None and "relearned" in found.get(Facts.name, {}):
                figures = found[Facts.name]["relearned"]
                removed = removed_beside(actx.before_dir, ctx.out_dir, relearned_ids, figures)
                if removed is not None:
                    found["relearned_removed"] = removed
            out[f"steps_{steps}"] = found
    return out


def text_halves(texts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """The texts split by text into two halves (A the first, one more where odd), shuffled with
    `seed`, each in the texts' order."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    first = set(order[: (len(texts) + 1) // 2])
    return (
        [t for i, t in enumerate(texts) if i in first],
        [t for i, t in enumerate(texts) if i not in first],
    )


def digest(texts: list[str]) -> str:
    """A SHA-256 naming a list of texts (in order) without holding them."""
    found = hashlib.sha256()
    for text in texts:
        found.update(hashlib.sha256(text.encode()).digest())
    return found.hexdigest()


def check_forget_passages(count: int) -> None:
    if count < 2:
        raise ConfigError(
            f"eval.attacks has relearn, which trains on half the forget texts and holds the other "
            f"half apart; data.forget gives {count} text(s) kuda unlearn trains on: pass a forget "
            "corpus of more texts (or drop relearn from eval.attacks)"
        )


@register_attack("relearn", RelearnSettings)
class Relearn(Attack):
    @classmethod
    def check(cls, cfg) -> None:
        check_relearning("relearn", cfg)
        kind = kind_of(cfg.data)
        if not kind.provides_facts and kind.forget_passages_at_hand(cfg.data):
            check_forget_passages(len(kind.forget_passages(cfg.data)))

    @classmethod
    def run(cls, actx: AttackContext) -> dict[str, Any]:
        if kind_of(actx.ctx.data).provides_facts:
            return relearn_facts(actx)
        return relearn_texts(actx)


def relearn_facts(actx: AttackContext) -> dict[str, Any]:
    """Trained on half the forget facts' passages, scored on the other half and on it."""
    forget, _ = kind_of(actx.ctx.data).fact_sets(actx.ctx.data)
    trained, held = halves(forget, actx.seed)
    all_prompts = actx.ctx.eval.facts.all_prompts
    extra = {"relearned": probes(trained, all_prompts)}
    invented = floor_facts(actx.ctx.data, forget)
    if invented:  # relearning must not teach guessing: the never-learned floor, relearned
        extra["floor"] = probes(invented, all_prompts)
    view = FactsView(forget=probes(held, all_prompts), extra=extra)
    curve = relearn_curve(
        actx,
        [f.passage for f in trained],
        view,
        forget_ids={f.id for f in held},
        relearned_ids={f.id for f in trained},
    )
    split = {
        "seed": actx.seed,
        "relearned": [f.id for f in trained],
        "scored": [f.id for f in held],
    }
    return {"split": split, **curve}


def relearn_texts(actx: AttackContext) -> dict[str, Any]:
    """Trained on half the forget corpus's texts, the run's metrics scored as un-attacked."""
    texts = kind_of(actx.ctx.data).forget_passages(actx.ctx.data)
    check_forget_passages(len(texts))
    trained, held = text_halves(texts, actx.seed)
    split = {
        "seed": actx.seed,
        "relearned": {"texts": len(trained), "sha256": digest(trained)},
        "held_apart": {"texts": len(held), "sha256": digest(held)},
    }
    return {"split": split, **relearn_curve(actx, trained, None)}
