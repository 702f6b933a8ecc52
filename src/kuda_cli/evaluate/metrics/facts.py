"""`eval.metrics: [facts]`: the knowledge evaluation on the data's forget and retain domains
(the retain domains also split into facts about other subjects and about forgotten ones), the
never-learned floor of the forget domains, and the fluency of long answers to forget prompts;
writes facts_answers.jsonl, fluency_answers.jsonl and samples.jsonl."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kuda_cli.config import ModelConfig, bounded
from kuda_cli.data.fact_set import load_facts, probes, retain_of, split_facts, subject_subsets
from kuda_cli.evaluate import (
    COMPLEMENT,
    STARTING_JUDGE,
    EvalContext,
    Metric,
    ratio,
    register_metric,
)
from kuda_cli.evaluate.fact_scoring import (
    ANSWERS_FILE,
    FLUENCY_FILE,
    evaluate_facts,
    fluency,
    read_reference_answers,
    read_reference_fluency,
    rotate_within_domain,
)
from kuda_cli.evaluate.floors import builtin_floor_path, chance, forget_removed, surface_floor
from kuda_cli.evaluate.scoring import greedy_continuations
from kuda_cli.run import lookup

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


def floor_facts(data, forget: list) -> list | None:
    """The fictitious facts matched to the forget domains (data.floor_path, else the built-in
    set unless data.path replaces the built-in facts), or None where there are none."""
    if data.floor_path:
        path = data.floor_path
    elif data.path:
        log.info("no floors: data.path replaces the built-in facts; set data.floor_path")
        return None
    else:
        path = builtin_floor_path()
    domains = sorted({f.domain for f in forget})
    invented = [f for f in load_facts(path) if f.domain in domains]
    if not invented:
        log.info("no floors: %s has no fictitious facts of %s", path, ", ".join(domains))
        return None
    return invented


def _floors(ctx: EvalContext, forget: list, all_prompts: bool):
    """The never-learned floor of the forget domains: the evaluated model's MC and greedy
    accuracy on the matched fictitious facts, with chance and the string scorer's floor beside
    (on the real facts and on the fictitious ones), and its answer rows (split `floor`); None
    where there are no fictitious facts."""
    invented = floor_facts(ctx.data, forget)
    if invented is None:
        return None
    cfg = ctx.eval.facts
    found, rows = evaluate_facts(
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
    return floor, rows


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


@dataclass
class FactsEvalConfig:
    """The built-in knowledge evaluation (needs data=facts)."""

    all_prompts: bool = True  # every paraphrase of every fact, or only the first
    gen_max_new_tokens: int = bounded(16, ge=1)  # greedy answers scored for gen_acc
    # continuations of forget prompts, for fluency (n-gram entropy needs about 100 tokens)
    fluency_max_new_tokens: int = bounded(100, ge=1)
    batch_size: int = bounded(32, ge=1)
    # rows per greedy generation batch: a step costs little more for 128 rows than for 32 on a
    # CPU, and left padding makes the answers the same whatever the batch
    gen_batch_size: int = bounded(128, ge=1)
    samples: int = bounded(5, ge=0)  # sample generations per split written to samples.jsonl
    reference: str | None = None  # run dir (or its facts_answers.jsonl): retain agreement
    judge: str | None = None  # model directory scoring fluency; null: the evaluated model
    # score the fictitious facts of the forget domains (the never-learned floor); kuda unlearn
    # scores them on the starting model only
    floors: bool = True
    # greedy answers to retain prompts (gen_acc, exact-line agreement); false skips them in
    # sweeps (token agreement needs only the reference's answers); the starting model always
    retain_greedy: bool = True


@register_metric("facts", FactsEvalConfig)
class Facts(Metric):
    reads_data = True
    local_paths = ("eval.facts.reference", "eval.facts.judge", "data.path", "data.floor_path")
    # the starting model is scored on all of them whatever they say
    after_only = ("floors", "retain_greedy")
    report_columns = (
        ("removed", "summary.forget_removed"),  # against the never-learned floors
        ("removed", "summary.forget_removed_mc"),
        ("removed", "summary.forget_removed_gen"),
        ("damage", COMPLEMENT + "facts.retain.other_subjects.token_agreement"),
        ("benchmark", "facts.forget.mc_acc"),
        ("benchmark", "facts.retain.mc_acc"),
        ("fluency", "fluency.forget.nll_vs_fluent_wrong"),
        ("fluency", "summary.fluency_entropy_ratio"),
        ("fluency", "fluency.forget.repetition"),
    )

    @classmethod
    def compute(cls, ctx: EvalContext) -> dict[str, Any]:
        return facts_results(ctx)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.eval.facts.reference:  # a facts run's answers, before any model loads
            read_reference_answers(cfg.eval.facts.reference)

    @classmethod
    def for_starting_model(cls, settings):
        """Every figure a comparison needs: the floors, the retain answers (the reference)."""
        return replace(settings, floors=True, retain_greedy=True)

    @classmethod
    def for_unlearned_model(cls, settings, before_dir: Path | None):
        """Without the floors (they belong to the starting model), against the starting model's
        answers unless eval.facts.reference names others."""
        settings = replace(settings, floors=False)
        answers = before_dir / ANSWERS_FILE if before_dir is not None else None
        if answers is not None and answers.exists() and not settings.reference:
            settings = replace(settings, reference=str(answers))
        return settings

    @classmethod
    def summarise(cls, before: dict, after: dict, settings) -> dict[str, Any]:
        return summary_of(before, after)


def facts_results(ctx: EvalContext) -> dict[str, Any]:
    """The knowledge figures and fluency of the evaluated model, on the configured sets or on an
    attack's view of them (`ctx.view`, a FactsView)."""
    cfg = ctx.eval.facts
    model, tokenizer = ctx.loaded.model, ctx.loaded.tokenizer
    forget, retain = split_facts(
        load_facts(ctx.data.path), list(ctx.data.forget_domains), retain_of(ctx.data)
    )
    view = ctx.view
    splits = {"forget": probes(forget, cfg.all_prompts), "retain": probes(retain, cfg.all_prompts)}
    if view is not None:
        splits = {"forget": view.forget, **view.extra}
        splits.update({"retain": probes(retain, cfg.all_prompts)} if view.retain else {})
    reference = read_reference_answers(cfg.reference) if cfg.reference else None
    metrics, rows = evaluate_facts(
        model,
        tokenizer,
        splits,
        gen_max_new_tokens=cfg.gen_max_new_tokens,
        batch_size=cfg.batch_size,
        gen_batch_size=cfg.gen_batch_size,
        reference=reference,
        subsets={"retain": subject_subsets(retain, forget)},
        no_answers=() if cfg.retain_greedy else ("retain",),
    )
    if cfg.floors and forget and view is None:
        floor = _floors(ctx, forget, cfg.all_prompts)
        if floor is not None:
            metrics["floor"], floor_rows = floor
            rows += floor_rows
    results: dict[str, Any] = {"facts": metrics}
    fluency_rows: list[dict[str, Any]] = []
    if view is None or view.fluency:
        viewed = forget if view is None else list({p.fact.id: p.fact for p in view.forget}.values())
        chosen = probes(viewed, all_prompts=False)
        flu, fluency_rows = _fluency(ctx, chosen)
        results["fluency"] = {"forget": flu}
    if ctx.out_dir is not None:
        _write_answers(ctx.out_dir, rows, fluency_rows, cfg.samples)
    return results


def _fluency(ctx: EvalContext, chosen: list) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fluency of long greedy answers to the `chosen` prompts, and one row per answer."""
    cfg = ctx.eval.facts
    prompts = [p.text for p in chosen]
    answers = greedy_continuations(
        ctx.loaded.model,
        ctx.loaded.tokenizer,
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
    rows = [
        {
            "fact": p.fact.id,
            "domain": p.fact.domain,
            "prompt": p.text,
            "answer": a,
            "judge": judge_name,
            "fluent_wrong_score": score,
        }
        for p, a, score in zip(chosen, answers, wrong_scores, strict=True)
    ]
    return flu, rows


def _write_answers(out_dir: Path, rows, fluency_rows, samples: int) -> None:
    """facts_answers.jsonl, fluency_answers.jsonl and the first `samples` answers of each split
    (samples.jsonl)."""
    write_jsonl(out_dir / ANSWERS_FILE, rows)
    write_jsonl(out_dir / FLUENCY_FILE, fluency_rows)
    retain_rows = [r for r in rows if r["split"] == "retain"][:samples]
    picked = [
        {"split": "forget", "prompt": r["prompt"], "answer": r["answer"]} for r in fluency_rows
    ]
    picked = picked[:samples]
    picked += [
        {"split": "retain", "prompt": r["prompt"], "answer": r["answer"]} for r in retain_rows
    ]
    write_jsonl(out_dir / "samples.jsonl", picked)


def summary_of(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Forgetting against the never-learned floor, locality on other subjects, specificity on
    the forgotten subjects, and fluency."""
    floor_mc, floor_gen = (
        lookup(before, "facts.floor.mc_acc"),
        lookup(before, "facts.floor.gen_acc"),
    )
    removed_mc = forget_removed(
        lookup(before, "facts.forget.mc_acc"), lookup(after, "facts.forget.mc_acc"), floor_mc
    )
    removed_gen = forget_removed(
        lookup(before, "facts.forget.gen_acc"), lookup(after, "facts.forget.gen_acc"), floor_gen
    )
    removed = [r for r in (removed_mc, removed_gen) if r is not None]
    found = {
        "forget_mc": lookup(after, "facts.forget.mc_acc"),
        "forget_mc_before": lookup(before, "facts.forget.mc_acc"),
        "forget_gen": lookup(after, "facts.forget.gen_acc"),
        "forget_gen_before": lookup(before, "facts.forget.gen_acc"),
        "floor_mc": floor_mc,
        "floor_gen": floor_gen,
        "chance": lookup(before, "facts.floor.chance"),
        "surface_floor": lookup(before, "facts.floor.surface"),
        "forget_removed_mc": removed_mc,
        "forget_removed_gen": removed_gen,
        "forget_removed": sum(removed) / len(removed) if len(removed) == 2 else None,
        "retain_mc": lookup(after, "facts.retain.mc_acc"),
        "retain_mc_before": lookup(before, "facts.retain.mc_acc"),
        "retain_mc_ratio": ratio(before, after, "facts.retain.mc_acc"),
        "retain_agreement": lookup(after, "facts.retain.agreement"),
        "retain_token_agreement": lookup(after, "facts.retain.token_agreement"),
    }
    for subset in ("other", "same"):
        path = f"facts.retain.{subset}_subjects"
        found[f"retain_{subset}_mc"] = lookup(after, f"{path}.mc_acc")
        found[f"retain_{subset}_mc_before"] = lookup(before, f"{path}.mc_acc")
        found[f"retain_{subset}_gen"] = lookup(after, f"{path}.gen_acc")
        found[f"retain_{subset}_token_agreement"] = lookup(after, f"{path}.token_agreement")
    return {
        **found,
        "fluency_nll_ratio": ratio(before, after, "fluency.forget.nll"),
        "fluency_nll_vs_fluent_wrong": lookup(after, "fluency.forget.nll_vs_fluent_wrong"),
        "fluency_entropy_ratio": ratio(before, after, "fluency.forget.entropy"),
        "fluency_repetition": lookup(after, "fluency.forget.repetition"),
        "fluency_repetition_before": lookup(before, "fluency.forget.repetition"),
    }
