"""`eval.metrics: [muse]`: VerbMem on the forget set, KnowMem on forget and retain QA (with
MUSE's in-context examples), and PrivLeak from the Min-K% AUC of forget vs holdout texts."""

from __future__ import annotations

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


def muse_results(ctx: EvalContext) -> dict[str, Any]:
    cfg, data = ctx.eval.muse, ctx.data
    model, tokenizer = ctx.loaded.model, ctx.loaded.tokenizer
    verb = _cap(load_split(data.verbmem, "data.verbmem", ("prompt", "gt")), cfg.max_items)
    results: dict[str, Any] = {
        "verbmem_forget": verbmem(
            model,
            tokenizer,
            [r["prompt"] for r in verb],
            [r["gt"] for r in verb],
            max_new_tokens=cfg.verbmem_max_new_tokens,
            batch_size=cfg.batch_size,
        )
    }
    for role in ("forget", "retain"):
        qa = _cap(
            load_split(
                getattr(data, f"knowmem_{role}"), f"data.knowmem_{role}", ("question", "answer")
            ),
            cfg.max_items,
        )
        icl = load_split(
            getattr(data, f"knowmem_{role}_icl"), f"data.knowmem_{role}_icl", ("question", "answer")
        )[: cfg.icl_examples]
        results[f"knowmem_{role}"] = knowmem(
            model,
            tokenizer,
            [r["question"] for r in qa],
            [r["answer"] for r in qa],
            icl_questions=[r["question"] for r in icl],
            icl_answers=[r["answer"] for r in icl],
            max_new_tokens=cfg.knowmem_max_new_tokens,
            batch_size=cfg.batch_size,
        )
    members = _cap(load_split(data.forget, "data.forget", (data.forget.text_field,)), cfg.max_items)
    holdout = _cap(
        load_split(data.holdout, "data.holdout", (data.holdout.text_field,)), cfg.max_items
    )
    mia = mia_min_k(
        model,
        tokenizer,
        [r[data.forget.text_field] for r in members],
        [r[data.holdout.text_field] for r in holdout],
        k=cfg.mink_k,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
    )
    results["privleak"] = {
        "auc": mia["auc"],
        "retrain_auc": data.retrain_auc,
        "privleak": None if data.retrain_auc is None else privleak(mia["auc"], data.retrain_auc),
        "k": cfg.mink_k,
    }
    for value in results.values():
        value.pop("per_item", None)
    return results
