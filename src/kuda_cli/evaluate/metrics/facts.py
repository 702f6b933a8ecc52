"""`eval.metrics: [facts]`: the knowledge evaluation on the data's forget and retain domains
(the retain domains also split into facts about other subjects and about forgotten ones), the
never-learned floor of the forget domains, and the fluency of long answers to forget prompts;
writes facts_answers.jsonl, fluency_answers.jsonl and samples.jsonl."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kuda_cli.config import ModelConfig
from kuda_cli.data.facts import load_facts, probes, split_facts, subject_subsets
from kuda_cli.evaluate import STARTING_JUDGE, EvalContext, register_metric
from kuda_cli.evaluate.facts import (
    ANSWERS_FILE,
    FLUENCY_FILE,
    evaluate_facts,
    fluency,
    read_reference_answers,
    read_reference_fluency,
    rotate_within_domain,
)
from kuda_cli.evaluate.floors import builtin_floor_path, chance, surface_floor
from kuda_cli.evaluate.scoring import greedy_continuations

log = logging.getLogger(__name__)


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


def _floors(ctx: EvalContext, forget: list, all_prompts: bool) -> dict[str, Any] | None:
    """The never-learned floor of the forget domains: the evaluated model's MC and greedy
    accuracy on the matched fictitious facts, with chance and the string scorer's floor beside
    (on the real facts and on the fictitious ones)."""
    if ctx.data.floor_path:
        path = ctx.data.floor_path
    elif ctx.data.path:
        log.info("no floors: data.path replaces the built-in facts; set data.floor_path")
        return None
    else:
        path = builtin_floor_path()
    domains = sorted({f.domain for f in forget})
    invented = [f for f in load_facts(path) if f.domain in domains]
    if not invented:
        log.info("no floors: %s has no fictitious facts of %s", path, ", ".join(domains))
        return None
    cfg = ctx.eval.facts
    found, _ = evaluate_facts(
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        {"floor": probes(invented, all_prompts)},
        gen_max_new_tokens=cfg.gen_max_new_tokens,
        batch_size=cfg.batch_size,
        gen_batch_size=cfg.gen_batch_size,
    )
    floor = found["floor"]
    floor["chance"] = chance(forget)
    floor["surface"] = surface_floor(forget)
    floor["surface_fictitious"] = surface_floor(invented)
    for d, values in floor["domains"].items():
        real = [f for f in forget if f.domain == d]
        values.update(
            chance=chance(real),
            surface=surface_floor(real),
            surface_fictitious=surface_floor([f for f in invented if f.domain == d]),
        )
    return floor


def _fluent_wrong(cfg, chosen, answers, judge_name):
    """Fluent wrong answers for the fluency reference, where they come from, and their scores
    when already known: the reference run's own answers to other facts' prompts of the same
    domain (scored in that run by the same judge when it judged itself and this run lends the
    starting model: `kuda unlearn`), or the evaluated model's where no reference has them."""
    given = read_reference_fluency(cfg.reference) if cfg.reference else None
    if given is None or not all(p.text in given for p in chosen):
        return rotate_within_domain(chosen, answers), "self", None
    rows = [given[p.text] for p in chosen]
    scores = None
    if judge_name == STARTING_JUDGE and all(r.get("judge") == "self" for r in rows):
        if all("fluent_wrong_score" in r for r in rows):
            scores = [
                tuple(r["fluent_wrong_score"]) if r["fluent_wrong_score"] else None for r in rows
            ]
    return rotate_within_domain(chosen, [r["answer"] for r in rows]), "reference", scores


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
        gen_batch_size=cfg.gen_batch_size,
        reference=reference,
        subsets={"retain": subject_subsets(retain, forget)},
        no_answers=() if cfg.retain_greedy else ("retain",),
    )
    if cfg.floors and forget:
        floor = _floors(ctx, forget, cfg.all_prompts)
        if floor is not None:
            metrics["floor"] = floor
    chosen = probes(forget, all_prompts=False)
    prompts = [p.text for p in chosen]
    answers = greedy_continuations(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.fluency_max_new_tokens,
        batch_size=cfg.gen_batch_size,
        desc="fluency answers",
    )
    with _judge(ctx) as (judge, judge_tokenizer, judge_name):
        wrong, wrong_source, known = _fluent_wrong(cfg, chosen, answers, judge_name)
        scores = fluency(
            judge,
            judge_tokenizer,
            prompts,
            answers,
            batch_size=cfg.batch_size,
            fluent_wrong=wrong,
            fluent_wrong_scores=known,
        )
    wrong_scores = scores.pop("fluent_wrong_scores")
    flu = {
        **scores,
        "judge": judge_name,
        "fluent_wrong": wrong_source,
        "max_new_tokens": cfg.fluency_max_new_tokens,
    }
    if ctx.out_dir is not None:
        write_jsonl(ctx.out_dir / ANSWERS_FILE, rows)
        write_jsonl(
            ctx.out_dir / FLUENCY_FILE,
            [
                {
                    "fact": p.fact.id,
                    "domain": p.fact.domain,
                    "prompt": p.text,
                    "answer": a,
                    "judge": judge_name,
                    "fluent_wrong_score": score,
                }
                for p, a, score in zip(chosen, answers, wrong_scores, strict=True)
            ],
        )
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
