"""`eval.metrics: [muse]`: VerbMem on the forget set, KnowMem on forget and retain QA (with
MUSE's in-context examples), and PrivLeak from the Min-K% AUC of forget vs holdout texts; under
an attack's `KnowMemView`, KnowMem on the forget QA alone, with more pairs shown first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kuda_cli.config import bounded
from kuda_cli.data.sources import hub_splits, load_split
from kuda_cli.evaluate import EvalContext, Metric, register_metric
from kuda_cli.evaluate.muse_scoring import knowmem, mia_min_k, privleak, verbmem
from kuda_cli.hub import HubSource
from kuda_cli.run import lookup


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

    @classmethod
    def compute(cls, ctx: EvalContext) -> dict[str, Any]:
        return {"muse": muse_results(ctx)}

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
    results["privleak"] = privleak_of(ctx)
    return results


def verbmem_of(ctx: EvalContext) -> dict[str, Any]:
    cfg, data = ctx.eval.muse, ctx.data
    verb = _cap(load_split(data.verbmem, "data.verbmem", ("prompt", "gt")), cfg.max_items)
    found = verbmem(
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        [r["prompt"] for r in verb],
        [r["gt"] for r in verb],
        max_new_tokens=cfg.verbmem_max_new_tokens,
        batch_size=cfg.batch_size,
    )
    found.pop("per_item", None)
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


def privleak_of(ctx: EvalContext) -> dict[str, Any]:
    cfg, data = ctx.eval.muse, ctx.data
    members = _cap(load_split(data.forget, "data.forget", (data.forget.text_field,)), cfg.max_items)
    holdout = _cap(
        load_split(data.holdout, "data.holdout", (data.holdout.text_field,)), cfg.max_items
    )
    mia = mia_min_k(
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        [r[data.forget.text_field] for r in members],
        [r[data.holdout.text_field] for r in holdout],
        k=cfg.mink_k,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
    )
    return {
        "auc": mia["auc"],
        "retrain_auc": data.retrain_auc,
        "privleak": None if data.retrain_auc is None else privleak(mia["auc"], data.retrain_auc),
        "k": cfg.mink_k,
    }
