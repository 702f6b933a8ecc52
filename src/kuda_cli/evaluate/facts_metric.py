"""`eval.metrics: [facts]`: the knowledge evaluation on the data's forget and retain domains,
with the fluency of forget answers; writes facts_answers.jsonl and samples.jsonl."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kuda_cli.config import ModelConfig
from kuda_cli.data.facts import load_facts, probes, split_facts
from kuda_cli.evaluate import EvalContext, register_metric
from kuda_cli.evaluate.facts import (
    ANSWERS_FILE,
    evaluate_facts,
    fluency,
    read_reference_answers,
)
from kuda_cli.evaluate.scoring import greedy_continuations


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextmanager
def _judge(ctx: EvalContext):
    """The model (and its tokenizer) that scores the fluency of the answers: eval.facts.judge
    when set, else the one the caller lends (ctx.judge), else the evaluated model itself."""
    if ctx.eval.facts.judge:
        yield _load_judge(ctx)
    elif ctx.judge is not None:
        with ctx.judge() as lent:
            yield lent
    else:
        yield ctx.loaded.model, ctx.loaded.tokenizer, "self"


def _load_judge(ctx: EvalContext):
    from kuda_cli.models.loading import load_model

    spec = ModelConfig(
        name="judge", source="local", path=ctx.eval.facts.judge, device=str(ctx.loaded.device.type)
    )
    judge = load_model(spec, ctx.cache_dir)
    return judge.model, judge.tokenizer, ctx.eval.facts.judge


@register_metric("facts")
def facts_metric(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.eval.facts
    model, tokenizer = ctx.loaded.model, ctx.loaded.tokenizer
    forget, retain = split_facts(
        load_facts(ctx.data.path), list(ctx.data.forget_domains), list(ctx.data.retain_domains)
    )
    reference = read_reference_answers(cfg.reference) if cfg.reference else None
    metrics, rows = evaluate_facts(
        model,
        tokenizer,
        {"forget": probes(forget, cfg.all_prompts), "retain": probes(retain, cfg.all_prompts)},
        gen_max_new_tokens=cfg.gen_max_new_tokens,
        batch_size=cfg.batch_size,
        reference=reference,
    )
    prompts = [p.text for p in probes(forget, all_prompts=False)]
    answers = greedy_continuations(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.fluency_max_new_tokens,
        batch_size=cfg.batch_size,
        desc="fluency answers",
    )
    with _judge(ctx) as (judge, judge_tokenizer, judge_name):
        scores = fluency(judge, judge_tokenizer, prompts, answers, batch_size=cfg.batch_size)
    flu = {**scores, "judge": judge_name, "max_new_tokens": cfg.fluency_max_new_tokens}
    if ctx.out_dir is not None:
        write_jsonl(ctx.out_dir / ANSWERS_FILE, rows)
        retain_rows = [r for r in rows if r["split"] == "retain"][: cfg.samples]
        samples = [
            {"split": "forget", "prompt": p, "answer": a}
            for p, a in list(zip(prompts, answers, strict=True))[: cfg.samples]
        ]
        samples += [
            {"split": "retain", "prompt": r["prompt"], "answer": r["answer"]} for r in retain_rows
        ]
        write_jsonl(ctx.out_dir / "samples.jsonl", samples)
    return {"facts": metrics, "fluency": {"forget": flu}}
