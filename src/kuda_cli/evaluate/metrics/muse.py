"""`eval.metrics: [muse]`: VerbMem on the forget set, KnowMem on forget and retain QA (with
MUSE's in-context examples), and PrivLeak from the Min-K% AUC of forget vs holdout texts."""

from __future__ import annotations

from typing import Any

from kuda_cli.data.sources import load_split
from kuda_cli.evaluate import EvalContext, register_metric
from kuda_cli.evaluate.muse import knowmem, mia_min_k, privleak, verbmem


def _cap(records: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    return records[:n] if n else records


@register_metric("muse")
def muse_metric(ctx: EvalContext) -> dict[str, Any]:
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
    return {"muse": results}
