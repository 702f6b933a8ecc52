"""The built-in knowledge evaluation: 4-way multiple choice by log-likelihood of the answer text,
greedy-completion accuracy, agreement of retain answers with a reference run, and the fluency of
answers to forget prompts (a judge model's NLL of them, and their n-gram repetition).

Agreement with a reference run (the starting model's answers) comes in two strengths:
`agreement`, the share of prompts whose greedy first line is exactly the reference's (one
changed token changes every later one), and `token_agreement`, the share of the reference
first line's tokens that the model still ranks first when fed the reference's earlier tokens
(teacher-forced, EasyEdit's locality), averaged over prompts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kuda_cli.data.facts import Probe
from kuda_cli.errors import UserError
from kuda_cli.evaluate.scoring import (
    continuation_logprobs,
    continuation_top1,
    greedy_continuations,
    option_logprobs,
)

ANSWERS_FILE = "facts_answers.jsonl"


def mc_correct(model, tokenizer, probes: list[Probe], *, batch_size: int = 16) -> list[bool]:
    """Whether the target scores the highest summed log-likelihood among the options."""
    groups = [(p.text, [" " + option for option in p.fact.options]) for p in probes]
    scores = option_logprobs(model, tokenizer, groups, batch_size=batch_size, desc="facts mc")
    totals = [[total for total, _ in options] for options in scores]
    return [t.index(max(t)) == 0 for t in totals]  # ties go to the target, listed first


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def raw_first_line(text: str) -> str:
    """The text up to its first line break, leading space kept: what the model generated after
    the prompt, so that it tokenises as generated."""
    return text.split("\n", 1)[0].rstrip()


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_matches(answer: str, target: str) -> bool:
    """The target, as whole words, within the first line of the answer."""
    return f" {normalise(target)} " in f" {normalise(first_line(answer))} "


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0: none)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def fluency(judge, tokenizer, prompts: list[str], generations: list[str], *, batch_size: int = 16):
    """Mean token NLL of the generations under the judge model (given their prompts), and their
    mean trigram repetition rate. Empty generations are skipped for the NLL."""
    pairs = [(p, g) for p, g in zip(prompts, generations, strict=True) if g.strip()]
    scored = continuation_logprobs(judge, tokenizer, pairs, batch_size=batch_size, desc="fluency")
    tokens = sum(n for _, n in scored)
    nll = -sum(total for total, _ in scored) / tokens if tokens else None
    reps = [repetition_rate(g) for g in generations]
    return {
        "nll": nll,
        "repetition": sum(reps) / len(reps) if reps else None,
        "empty": len(generations) - len(pairs),
        "n": len(generations),
    }


def read_reference_answers(path: str | Path) -> dict[str, str]:
    """Answers of a previous facts evaluation: a run directory or its facts_answers.jsonl."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ANSWERS_FILE
    if not path.is_file():
        raise UserError(
            f"eval.facts.reference={path} has no {ANSWERS_FILE}; pass a run directory of a "
            "facts evaluation (or the file itself)"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["prompt"]: row["answer"] for row in rows}


def _summary(probes: list[Probe], mc: list[bool], gen: list[bool]) -> dict[str, Any]:
    def rate(values: Iterable[bool]) -> float | None:
        values = list(values)
        return sum(values) / len(values) if values else None

    domains = sorted({p.fact.domain for p in probes})
    return {
        "mc_acc": rate(mc),
        "gen_acc": rate(gen),
        "n_prompts": len(probes),
        "n_facts": len({p.fact.id for p in probes}),
        "domains": {
            d: {
                "mc_acc": rate(c for p, c in zip(probes, mc, strict=True) if p.fact.domain == d),
                "gen_acc": rate(c for p, c in zip(probes, gen, strict=True) if p.fact.domain == d),
            }
            for d in domains
        },
    }


def evaluate_facts(
    model,
    tokenizer,
    splits: dict[str, list[Probe]],
    *,
    gen_max_new_tokens: int = 16,
    batch_size: int = 16,
    reference: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics per split (e.g. forget, retain), and one answer row per probe."""
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for split, probes in splits.items():
        if not probes:
            continue
        mc = mc_correct(model, tokenizer, probes, batch_size=batch_size)
        answers = greedy_continuations(
            model,
            tokenizer,
            [p.text for p in probes],
            max_new_tokens=gen_max_new_tokens,
            batch_size=batch_size,
            desc=f"facts {split} answers",
            stop_strings=["\n"],  # only the first line is scored
        )
        gen = [answer_matches(a, p.fact.target) for a, p in zip(answers, probes, strict=True)]
        metrics[split] = _summary(probes, mc, gen)
        if reference is not None:
            known = [(p, a) for p, a in zip(probes, answers, strict=True) if p.text in reference]
            same = [first_line(a) == first_line(reference[p.text]) for p, a in known]
            metrics[split]["agreement"] = sum(same) / len(same) if same else None
            lines = [(p.text, raw_first_line(reference[p.text])) for p, _ in known]
            forced = [(prompt, line) for prompt, line in lines if line.strip()]
            top1 = continuation_top1(
                model, tokenizer, forced, batch_size=batch_size, desc=f"facts {split} top-1"
            )
            metrics[split]["token_agreement"] = sum(top1) / len(top1) if top1 else None
        rows += [
            {
                "split": split,
                "fact": p.fact.id,
                "domain": p.fact.domain,
                "prompt": p.text,
                "target": p.fact.target,
                "answer": a,
                "mc_correct": m,
                "gen_correct": g,
            }
            for p, a, m, g in zip(probes, answers, mc, gen, strict=True)
        ]
    return metrics, rows
