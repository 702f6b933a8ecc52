"""`eval.metrics: [tofu]`: TOFU's figures on the forget, retain, real-authors and world-facts
splits (answer probability, ROUGE-L recall, truth ratio), forget quality against a retain
model's truth ratios (data.retain_truth_ratios), model utility, and each membership attack of
eval.tofu.mia_attacks on forget vs holdout items (their answers given their questions, for
data.loss_tokens: answer)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kuda_cli.config import bounded, choice
from kuda_cli.data.kinds.tofu import qa_rows
from kuda_cli.data.sources import hub_splits
from kuda_cli.evaluate import EvalContext, Metric, register_metric
from kuda_cli.evaluate.memorization import memorization
from kuda_cli.evaluate.mia_attacks import (
    attack_aucs,
    attack_scores,
    check_attack_names,
    text_nlls,
    without_reference,
)
from kuda_cli.evaluate.tofu_scoring import (
    QaFormat,
    answer_losses,
    forget_quality,
    forget_truth_ratio,
    greedy_answers,
    model_utility,
    normalised_probability,
    probability,
    qa_pair,
    retain_truth_ratio,
    rouge_l_recall,
    truth_ratio,
)
from kuda_cli.hub import HubSource
from kuda_cli.run import lookup

log = logging.getLogger(__name__)


@dataclass
class TofuEvalConfig:
    """TOFU: probability, ROUGE, truth ratio, forget quality, model utility (data=tofu*)."""

    # the tokenizer's chat template where it has one (auto), else "Question: q\nAnswer:" (off)
    chat_template: str = choice("auto", "auto", "off")
    system_prompt: str | None = "You are a helpful assistant."  # open-unlearning's, with chat
    date_string: str | None = "10 Apr 2025"  # Llama 3's chat template prints it (as theirs)
    max_new_tokens: int = bounded(200, ge=1)
    max_items: int | None = bounded(None, ge=1)  # per split
    batch_size: int = bounded(8, ge=1)
    mink_k: float = bounded(0.4, gt=0, le=1)
    max_length: int = bounded(512, ge=16)  # tokens of a membership attack's text
    # attacks on forget (members) vs holdout items, each as tofu.mia.<name>.auc; the reference
    # attack needs a reference model (`kuda unlearn`'s starting one)
    mia_attacks: list[str] = field(
        default_factory=lambda: ["min_k", "loss", "zlib", "min_k_plus_plus", "reference"]
    )


# split key -> (the data split, the correct answer of its truth ratio, truth ratio form)
SPLITS = {
    "forget": ("forget_perturbed", "paraphrased_answer", forget_truth_ratio),
    "retain": ("retain_perturbed", "paraphrased_answer", retain_truth_ratio),
    "real_authors": ("real_authors", "answer", retain_truth_ratio),
    "world_facts": ("world_facts", "answer", retain_truth_ratio),
}
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
MIA_SIDES = {"member": "forget", "nonmember": "holdout"}
UTILITY_FIGURES = ("prob", "rouge", "truth_ratio")
HEADLINE = ("forget_quality", "model_utility", *(f"forget.{f}" for f in UTILITY_FIGURES))


@register_metric("tofu", TofuEvalConfig)
class Tofu(Metric):
    reads_data = True
    report_columns = tuple(("benchmark", f"tofu.{key}") for key in HEADLINE)

    @classmethod
    def compute(cls, ctx: EvalContext) -> dict[str, Any]:
        return {"tofu": tofu_results(ctx)}

    @classmethod
    def check(cls, cfg) -> None:
        check_attack_names("eval.tofu.mia_attacks", cfg.eval.tofu.mia_attacks)

    @classmethod
    def for_starting_model(cls, settings):
        return without_reference(settings)

    @classmethod
    def summarise(cls, before: dict, after: dict, settings) -> dict[str, Any]:
        found = {}
        for key in HEADLINE:
            name = key.replace(".", "_")
            found[name] = lookup(after, f"tofu.{key}")
            found[f"{name}_before"] = lookup(before, f"tofu.{key}")
        for attack, result in (lookup(after, "tofu.mia") or {}).items():
            found[f"mia_{attack}_auc"] = result["auc"]
            found[f"mia_{attack}_auc_before"] = lookup(before, f"tofu.mia.{attack}.auc")
        return found

    @classmethod
    def hub_sources(cls, cfg) -> list[HubSource]:
        return hub_splits(cfg.data, [*(s for s, _, _ in SPLITS.values()), "forget", "holdout"])


def qa_format(ctx: EvalContext) -> QaFormat:
    cfg, tokenizer = ctx.eval.tofu, ctx.loaded.tokenizer
    chat = cfg.chat_template == "auto" and getattr(tokenizer, "chat_template", None) is not None
    return QaFormat(chat, cfg.system_prompt, cfg.date_string)


def tofu_results(ctx: EvalContext) -> dict[str, Any]:
    fmt = qa_format(ctx)
    results: dict[str, Any] = {name: split_figures(ctx, fmt, name) for name in SPLITS}
    retain_ratios = ctx.data.retain_truth_ratios
    results["forget_quality"] = (
        forget_quality(results["forget"]["truth_ratios"], retain_ratios) if retain_ratios else None
    )
    results["model_utility"] = model_utility(
        [results[s][f] for s in UTILITY_SPLITS for f in UTILITY_FIGURES]
    )
    results["mia"] = mia_of(ctx, fmt)
    return results


def _rows(ctx: EvalContext, key: str) -> list[dict[str, Any]]:
    rows = qa_rows(ctx.data, key)
    return rows[: ctx.eval.tofu.max_items] if ctx.eval.tofu.max_items else rows


def split_figures(ctx: EvalContext, fmt: QaFormat, name: str) -> dict[str, Any]:
    """Probability (normalised over the perturbed answers on real authors and world facts),
    ROUGE-L recall and truth ratio of one split; the forget split keeps its items' truth ratios
    (a retain model's are what forget quality compares with) and adds open-unlearning's exact
    memorisation and extraction strength of its answers."""
    key, correct_key, form = SPLITS[name]
    cfg, model, tokenizer = ctx.eval.tofu, ctx.loaded.model, ctx.loaded.tokenizer
    rows = _rows(ctx, key)
    answers = [[r["answer"], r[correct_key], *_listed(r["perturbed_answer"])] for r in rows]
    pairs = [
        qa_pair(tokenizer, fmt, r["question"], a)
        for r, row in zip(rows, answers, strict=True)
        for a in row
    ]
    losses = iter(answer_losses(model, tokenizer, pairs, batch_size=cfg.batch_size))
    per_item = [[next(losses) for _ in row] for row in answers]
    if name in ("forget", "retain"):
        probs = [probability(item[0]) for item in per_item]
    else:
        probs = [normalised_probability(item[0], item[2:]) for item in per_item]
    ratios = [truth_ratio(item[1], item[2:]) for item in per_item]
    answered = [qa_pair(tokenizer, fmt, r["question"], r["answer"]) for r in rows]
    prompts = [prompt for prompt, _ in answered]
    generated = greedy_answers(
        model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    rouges = [rouge_l_recall(g, r["answer"]) for g, r in zip(generated, rows, strict=True)]
    found = {
        "prob": _mean(probs),
        "rouge": _mean(rouges),
        "truth_ratio": form(ratios),
        "n": len(rows),
    }
    if name == "forget":
        found["truth_ratios"] = ratios
        found.update(
            memorization(
                model,
                tokenizer,
                prompts,
                [rest for _, rest in answered],
                max_length=cfg.max_length,
                batch_size=cfg.batch_size,
            )
        )
    return found


def _listed(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mia_texts(ctx: EvalContext, fmt: QaFormat, key: str) -> dict[str, Any]:
    """The texts the attacks score of split `data.<key>`, as `attack_scores`' keywords: each
    answer given its question (`prompts`) for `data.loss_tokens: answer`, else each item's
    question and answer together, as prompted (the end-of-sequence token left out)."""
    tokenizer = ctx.loaded.tokenizer
    pairs = [qa_pair(tokenizer, fmt, r["question"], r["answer"]) for r in _rows(ctx, key)]
    prompts = [prompt for prompt, _ in pairs]
    answers = [rest.removesuffix(tokenizer.eos_token or "") for _, rest in pairs]
    if ctx.data.loss_tokens == "answer":
        return {"texts": answers, "prompts": prompts}
    return {"texts": [p + a for p, a in zip(prompts, answers, strict=True)], "prompts": None}


def mia_of(ctx: EvalContext, fmt: QaFormat) -> dict[str, Any]:
    """Each attack's AUC, forget items as members and holdout items as non-members; the
    reference attack only where a reference model is lent."""
    cfg, tokenizer = ctx.eval.tofu, ctx.loaded.tokenizer
    texts = {side: mia_texts(ctx, fmt, key) for side, key in MIA_SIDES.items()}
    sizes = {"max_length": cfg.max_length, "batch_size": cfg.batch_size}
    reference: dict[str, list[float]] = {}
    if "reference" in cfg.mia_attacks and ctx.judge is None:
        log.info("tofu: no reference model at hand, the reference attack is left out")
    elif "reference" in cfg.mia_attacks:
        with ctx.judge() as (model, judge_tokenizer, _):
            reference = {
                side: text_nlls(model, judge_tokenizer, **found, **sizes)
                for side, found in texts.items()
            }
    scores = {
        side: attack_scores(
            ctx.loaded.model,
            tokenizer,
            attacks=cfg.mia_attacks,
            k=cfg.mink_k,
            reference_nlls=reference.get(side),
            **found,
            **sizes,
        )
        for side, found in texts.items()
    }
    return attack_aucs(scores["member"], scores["nonmember"])
