"""`eval.metrics: [muse]`: VerbMem on the forget set (with exact memorisation and extraction
strength), KnowMem on forget and retain QA (with MUSE's in-context examples), the AUC of each
membership-inference attack of eval.muse.mia_attacks on forget vs holdout texts, and PrivLeak
from the Min-K% one; under an attack's `KnowMemView`, KnowMem on the forget QA alone, with more
pairs shown first."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kuda_cli.config import bounded
from kuda_cli.data.sources import hub_splits, load_split
from kuda_cli.evaluate import EvalContext, Metric, register_metric
from kuda_cli.evaluate.memorization import memorization
from kuda_cli.evaluate.mia_attacks import (
    attack_aucs,
    attack_scores,
    check_attack_names,
    text_nlls,
    without_reference,
)
from kuda_cli.evaluate.muse_scoring import knowmem, privleak, verbmem
from kuda_cli.hub import HubSource
from kuda_cli.run import lookup

log = logging.getLogger(__name__)


def _cap(records: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    return records[:n] if n else records


@dataclass
class MuseEvalConfig:
    """MUSE: VerbMem, KnowMem (forget, retain), PrivLeak (needs a data=muse_* option)."""

    verbmem_max_new_tokens: int = bounded(128, ge=1)
    knowmem_max_new_tokens: int = bounded(32, ge=1)
    icl_examples: int = bounded(3, ge=0)  # in-context QA pairs before each KnowMem question
    mink_k: float = bounded(0.4, gt=0, le=1)
    max_items: int | None = bounded(None, ge=1)
    max_length: int = bounded(2048, ge=16)
    batch_size: int = bounded(4, ge=1)
    # membership-inference attacks on forget vs holdout, each reported as muse.mia.<name>.auc;
    # min_k always runs (PrivLeak). gradnorm (a backward pass per text) is off by default for
    # its cost on a 7B model; reference needs a reference model (`kuda unlearn`'s starting one)
    mia_attacks: list[str] = field(
        default_factory=lambda: ["min_k", "loss", "zlib", "min_k_plus_plus", "reference"]
    )


# the data splits it reads
SPLITS = (
    "verbmem",
    "knowmem_forget",
    "knowmem_retain",
    "knowmem_forget_icl",
    "knowmem_retain_icl",
    "forget",
    "holdout",
)


@register_metric("muse", MuseEvalConfig)
class Muse(Metric):
    reads_data = True
    report_columns = tuple(
        ("benchmark", f"muse.{key}")
        for key in (
            "verbmem_forget.rougeL_f1",
            "knowmem_forget.rougeL_f1",
            "knowmem_retain.rougeL_f1",
            "privleak.privleak",
        )
    )

    @classmethod
    def compute(cls, ctx: EvalContext) -> dict[str, Any]:
        return {"muse": muse_results(ctx)}

    @classmethod
    def check(cls, cfg) -> None:
        check_attack_names("eval.muse.mia_attacks", cfg.eval.muse.mia_attacks)

    @classmethod
    def for_starting_model(cls, settings):
        return without_reference(settings)

    @classmethod
    def summarise(cls, before: dict, after: dict, settings) -> dict[str, Any]:
        found = {}
        for name, value in (after.get("muse") or {}).items():
            key = "auc" if name == "privleak" else "rougeL_f1"
            if isinstance(value, dict) and key in value:
                found[f"{name}_{key}"] = value[key]
                found[f"{name}_{key}_before"] = lookup(before, f"muse.{name}.{key}")
            if name == "privleak" and isinstance(value, dict):
                found["privleak"] = value.get("privleak")
            if name == "mia":
                for attack, result in value.items():
                    found[f"mia_{attack}_auc"] = result["auc"]
                    found[f"mia_{attack}_auc_before"] = lookup(before, f"muse.mia.{attack}.auc")
        return found

    @classmethod
    def hub_sources(cls, cfg) -> list[HubSource]:
        return hub_splits(cfg.data, SPLITS)


@dataclass(frozen=True)
class KnowMemView:
    """An attack's view of MUSE's sets: KnowMem on the forget questions alone, with these
    (question, answer) pairs shown before MUSE's in-context examples."""

    demonstrations: tuple[tuple[str, str], ...]


def muse_results(ctx: EvalContext) -> dict[str, Any]:
    if isinstance(ctx.view, KnowMemView):
        return {"knowmem_forget": knowmem_of(ctx, "forget", ctx.view.demonstrations)}
    results = {"verbmem_forget": verbmem_of(ctx)}
    for role in ("forget", "retain"):
        results[f"knowmem_{role}"] = knowmem_of(ctx, role)
    results["mia"] = mia_of(ctx)
    results["privleak"] = privleak_of(ctx, results["mia"]["min_k"]["auc"])
    return results


def verbmem_of(ctx: EvalContext) -> dict[str, Any]:
    cfg, data = ctx.eval.muse, ctx.data
    verb = _cap(load_split(data.verbmem, "data.verbmem", ("prompt", "gt")), cfg.max_items)
    model, tokenizer = ctx.loaded.model, ctx.loaded.tokenizer
    prompts, truths = [r["prompt"] for r in verb], [r["gt"] for r in verb]
    found = verbmem(
        model,
        tokenizer,
        prompts,
        truths,
        max_new_tokens=cfg.verbmem_max_new_tokens,
        batch_size=cfg.batch_size,
    )
    found.pop("per_item", None)
    found.update(
        memorization(
            model, tokenizer, prompts, truths, max_length=cfg.max_length, batch_size=cfg.batch_size
        )
    )
    return found


def knowmem_of(
    ctx: EvalContext, role: str, shown_first: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """KnowMem on the `role` QA, each question after `shown_first` and MUSE's ICL pairs."""
    cfg, data = ctx.eval.muse, ctx.data
    qa = _cap(
        load_split(
            getattr(data, f"knowmem_{role}"), f"data.knowmem_{role}", ("question", "answer")
        ),
        cfg.max_items,
    )
    icl = load_split(
        getattr(data, f"knowmem_{role}_icl"), f"data.knowmem_{role}_icl", ("question", "answer")
    )[: cfg.icl_examples]
    pairs = [*shown_first, *((r["question"], r["answer"]) for r in icl)]
    found = knowmem(
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        [r["question"] for r in qa],
        [r["answer"] for r in qa],
        icl_questions=[q for q, _ in pairs],
        icl_answers=[a for _, a in pairs],
        max_new_tokens=cfg.knowmem_max_new_tokens,
        batch_size=cfg.batch_size,
    )
    found.pop("per_item", None)
    return found


def mia_of(ctx: EvalContext) -> dict[str, Any]:
    """Each attack's AUC, forget texts as members and holdout texts as non-members; the
    reference attack only where a reference model is at hand (ctx.judge)."""
    cfg, data = ctx.eval.muse, ctx.data
    texts = {
        "member": _texts(ctx, data.forget, "data.forget"),
        "nonmember": _texts(ctx, data.holdout, "data.holdout"),
    }
    sizes = {"max_length": cfg.max_length, "batch_size": cfg.batch_size}
    reference: dict[str, list[float]] = {}
    if "reference" in cfg.mia_attacks and ctx.judge is None:
        log.info("muse: no reference model at hand, the reference attack is left out")
    elif "reference" in cfg.mia_attacks:
        # the judge may be the evaluated model with other weights swapped in: score it apart
        with ctx.judge() as (model, tokenizer, _):
            reference = {side: text_nlls(model, tokenizer, t, **sizes) for side, t in texts.items()}
    scores = {
        side: attack_scores(
            ctx.loaded.model,
            ctx.loaded.tokenizer,
            t,
            cfg.mia_attacks,
            k=cfg.mink_k,
            reference_nlls=reference.get(side),
            **sizes,
        )
        for side, t in texts.items()
    }
    return attack_aucs(scores["member"], scores["nonmember"])


def _texts(ctx: EvalContext, split, key: str) -> list[str]:
    rows = _cap(load_split(split, key, (split.text_field,)), ctx.eval.muse.max_items)
    return [r[split.text_field] for r in rows]


def privleak_of(ctx: EvalContext, min_k_auc: float) -> dict[str, Any]:
    """MUSE PrivLeak from the Min-K% AUC, against the retrained model's (data.retrain_auc)."""
    retrain_auc = ctx.data.retrain_auc
    return {
        "auc": min_k_auc,
        "retrain_auc": retrain_auc,
        "privleak": None if retrain_auc is None else privleak(min_k_auc, retrain_auc),
        "k": ctx.eval.muse.mink_k,
    }
