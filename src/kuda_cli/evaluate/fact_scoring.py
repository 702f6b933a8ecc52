"""The built-in knowledge evaluation: 4-way multiple choice by log-likelihood of the answer text,
greedy-completion accuracy, agreement of retain answers with a reference run, and the fluency of
answers to forget prompts.

Agreement with a reference run (the starting model's answers) comes in two strengths:
`agreement`, the share of prompts whose greedy first line is exactly the reference's (one
changed token changes every later one), and `token_agreement`, the share of the reference
first line's tokens that the model still ranks first when fed the reference's earlier tokens
(teacher-forced, EasyEdit's locality), averaged over prompts. Each split can be summarised on
named subsets of its facts too (the retain split on other and same subjects).

Fluency of long greedy continuations of forget prompts, in three figures:
- `entropy`: ROME/MEMIT's generation entropy, the mean of 2/3 x the 2-gram and 4/3 x the
  3-gram entropy (bits) over word tokens, averaged over texts: loops score low;
- `repetition`: the share of word trigrams that repeat an earlier one;
- `nll_vs_fluent_wrong`: a judge model's mean token NLL of the answers over its NLL of a fluent
  wrong reference (the reference model's answers to other facts' prompts of the same domain, put
  in place of the answers): <= 1 reads as naturally as a fluent wrong answer, gibberish and
  shuffled words score far above."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kuda_cli.data.fact_set import Probe
from kuda_cli.errors import UserError
from kuda_cli.evaluate.scoring import (
    continuation_logprobs,
    greedy_continuations,
    option_scores,
)

ANSWERS_FILE = "facts_answers.jsonl"
FLUENCY_FILE = "fluency_answers.jsonl"


def mc_correct(model, tokenizer, probes: list[Probe], *, batch_size: int = 16) -> list[bool]:
    """Whether the target scores the highest summed log-likelihood among the options."""
    return mc_and_top1(model, tokenizer, probes, batch_size=batch_size)[0]


def mc_and_top1(
    model,
    tokenizer,
    probes: list[Probe],
    forced: list[str | None] | None = None,
    *,
    batch_size: int = 16,
) -> tuple[list[bool], list[float | None]]:
    """`mc_correct` per probe, and, where `forced` gives a probe a continuation, the share of
    its tokens that are the model's top-1 prediction under teacher forcing
    (`continuation_top1`): packed beside the options over one copy of the prompt."""
    mc, counts = mc_and_top1_counts(model, tokenizer, probes, forced, batch_size=batch_size)
    return mc, top1_shares(counts)


def top1_shares(counts: list[tuple[int, int] | None]) -> list[float | None]:
    """Each (tokens ranked top-1, tokens) as its share; None stays None."""
    return [None if c is None else c[0] / c[1] for c in counts]


def mc_and_top1_counts(
    model,
    tokenizer,
    probes: list[Probe],
    forced: list[str | None] | None = None,
    *,
    batch_size: int = 16,
) -> tuple[list[bool], list[tuple[int, int] | None]]:
    """`mc_and_top1` with, per forced continuation, (tokens ranked top-1, tokens) in place of
    their share: what a resample of the prompts re-aggregates."""
    forced = forced or [None] * len(probes)
    groups = [
        (p.text, [" " + option for option in p.fact.options] + ([f] if f else []))
        for p, f in zip(probes, forced, strict=True)
    ]
    scores = option_scores(model, tokenizer, groups, batch_size=batch_size, desc="facts mc")
    mc, counts = [], []
    for p, options in zip(probes, scores, strict=True):
        totals = [total for total, _, _ in options[: len(p.fact.options)]]
        mc.append(totals.index(max(totals)) == 0)  # ties go to the target, listed first
        extra = options[len(p.fact.options) :]
        counts.append((extra[0][2], extra[0][1]) if extra else None)
    return mc, counts


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


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks, as NLTK's word tokenizer splits English (close enough for
    n-gram statistics; kuda does not depend on NLTK)."""
    return re.findall(r"\w+(?:'\w+)?|[^\w\s]", text)


DEGENERATE_CHARS = 20


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float | None:
    """ROME's generation entropy of one text: the arithmetic mean over n of weight_n x the
    entropy (bits) of its word n-gram frequencies. A text too short for an n-gram is a short
    answer (None: left out of means) unless it has at least `DEGENERATE_CHARS` characters, a
    long run without word structure ("1000000000...", "²²²²..."): that has no variety, 0."""
    tokens = word_tokens(text)
    parts = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        if not total:
            return 0.0 if len("".join(text.split())) >= DEGENERATE_CHARS else None
        parts.append(weight * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(parts) / len(parts)


def judge_nll(judge, tokenizer, prompts, generations, *, batch_size: int = 16):
    """Per generation, (summed log-probability, tokens) under the judge given its prompt; None
    for an empty one."""
    keep = [i for i, g in enumerate(generations) if g and g.strip()]
    scored = continuation_logprobs(
        judge,
        tokenizer,
        [(prompts[i], generations[i]) for i in keep],
        batch_size=batch_size,
        desc="fluency",
    )
    out: list[tuple[float, int] | None] = [None] * len(generations)
    for i, score in zip(keep, scored, strict=True):
        out[i] = score
    return out


def _mean_nll(scores, indices) -> float | None:
    picked = [scores[i] for i in indices if scores[i] is not None]
    tokens = sum(n for _, n in picked)
    return -sum(total for total, _ in picked) / tokens if tokens else None


def fluency(
    judge,
    tokenizer,
    prompts: list[str],
    generations: list[str],
    *,
    batch_size: int = 16,
    fluent_wrong: list[str | None] | None = None,
    fluent_wrong_scores: list[tuple[float, int] | None] | None = None,
):
    """Mean token NLL of the generations under the judge model (given their prompts), their mean
    trigram repetition rate and n-gram entropy; with `fluent_wrong` answers (one per prompt, None
    to skip), the judge's NLL of those on the same prompts and the ratio of the two (over the
    prompts both have). `fluent_wrong_scores`: the same judge's `judge_nll` of `fluent_wrong`,
    computed before (the starting model's evaluation keeps them), so they are not scored again.
    Empty generations are skipped for the NLL."""
    reps = [repetition_rate(g) for g in generations]
    entropies = [e for e in map(ngram_entropy, generations) if e is not None]
    own = judge_nll(judge, tokenizer, prompts, generations, batch_size=batch_size)
    out = {
        "nll": _mean_nll(own, range(len(own))),
        "repetition": sum(reps) / len(reps) if reps else None,
        "entropy": sum(entropies) / len(entropies) if entropies else None,
        "empty": sum(score is None for score in own),
        "n": len(generations),
    }
    if fluent_wrong is not None:
        wrong = fluent_wrong_scores or judge_nll(
            judge, tokenizer, prompts, [w or "" for w in fluent_wrong], batch_size=batch_size
        )
        out["fluent_wrong_scores"] = wrong
        both = [i for i in range(len(own)) if own[i] is not None and wrong[i] is not None]
        mine, theirs = _mean_nll(own, both), _mean_nll(wrong, both)
        out["nll_fluent_wrong"] = theirs
        out["nll_vs_fluent_wrong"] = mine / theirs if mine is not None and theirs else None
    return out


def rotate_within_domain(probes: list[Probe], answers: list[str], shift: int = 1):
    """For each probe, the answer given to the probe `shift` places later among the probes of
    the same domain (cyclically): a fluent answer to another fact. None where a domain has one
    probe only."""
    by_domain: dict[str, list[int]] = {}
    for i, p in enumerate(probes):
        by_domain.setdefault(p.fact.domain, []).append(i)
    out: list[str | None] = [None] * len(probes)
    for members in by_domain.values():
        if len(members) < 2:
            continue
        for k, i in enumerate(members):
            j = members[(k + shift) % len(members)]
            if j != i:
                out[i] = answers[j]
    return out


def read_reference_answers(path: str | Path) -> dict[str, str]:
    """Answers of a previous facts evaluation: a run directory or its facts_answers.jsonl."""
    given = Path(path).expanduser()
    path = given / ANSWERS_FILE if given.is_dir() else given
    if not path.is_file():
        raise UserError(
            f"eval.facts.reference={given} has no {ANSWERS_FILE}; pass a run directory of a "
            "facts evaluation (or the file itself)"
        )
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {row["prompt"]: row["answer"] for row in rows if row.get("answer") is not None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(
            f"eval.facts.reference={given}: {path} is not a facts evaluation's answers "
            f"({type(err).__name__}: {err}); pass the run directory of a facts evaluation"
        ) from err


def read_reference_fluency(path: str | Path) -> dict[str, dict[str, Any]] | None:
    """The fluency rows of the reference run by prompt (`answer`: its long greedy continuation;
    `fluent_wrong_score`: its judge's score of the fluent wrong answer it was given), or None
    where it kept none (runs made before they were written)."""
    path = Path(path).expanduser()
    found = (path if path.is_dir() else path.parent) / FLUENCY_FILE
    if not found.is_file():
        return None
    rows = [json.loads(line) for line in found.read_text().splitlines() if line.strip()]
    return {row["prompt"]: row for row in rows}


def _rate(values: Iterable[bool | float | None]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summary(
    probes: list[Probe],
    mc: list[bool],
    gen: list[bool | None],
    top1: list[float | None] | None,
    same: list[bool | None] | None,
) -> dict[str, Any]:
    domains = sorted({p.fact.domain for p in probes})
    out = {
        "mc_acc": _rate(mc),
        "gen_acc": _rate(gen),
        "n_prompts": len(probes),
        "n_facts": len({p.fact.id for p in probes}),
        "domains": {
            d: {
                "mc_acc": _rate(c for p, c in zip(probes, mc, strict=True) if p.fact.domain == d),
                "gen_acc": _rate(g for p, g in zip(probes, gen, strict=True) if p.fact.domain == d),
            }
            for d in domains
        },
    }
    if same is not None:
        out["agreement"] = _rate(same)
    if top1 is not None:
        out["token_agreement"] = _rate(top1)
    return {k: v for k, v in out.items() if k != "gen_acc" or v is not None}


def evaluate_facts(
    model,
    tokenizer,
    splits: dict[str, list[Probe]],
    *,
    gen_max_new_tokens: int = 16,
    batch_size: int = 16,
    gen_batch_size: int | None = None,
    reference: dict[str, str] | None = None,
    subsets: dict[str, dict[str, set[str]]] | None = None,
    no_answers: Iterable[str] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics per split (e.g. forget, retain), and one answer row per probe. `subsets` names,
    per split, sets of fact ids summarised on their own as well (under the split's metrics);
    splits in `no_answers` skip the greedy answers (no gen_acc, no exact-line agreement: token
    agreement needs only the reference's). Greedy answers go `gen_batch_size` prompts at a
    time (default: `batch_size`)."""
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for split, probes in splits.items():
        if not probes:
            continue
        # the reference's first line, teacher-forced for token agreement, is packed beside the
        # options: one forward pass gives both
        forced = _forced_lines(probes, reference)
        mc, counts = mc_and_top1_counts(model, tokenizer, probes, forced, batch_size=batch_size)
        shares = top1_shares(counts)
        answers: list[str | None] = [None] * len(probes)
        if split not in no_answers:
            answers = greedy_continuations(
                model,
                tokenizer,
                [p.text for p in probes],
                max_new_tokens=gen_max_new_tokens,
                batch_size=gen_batch_size or batch_size,
                desc=f"facts {split} answers",
                stop_strings=["\n"],  # only the first line is scored
            )
        gen = [
            None if a is None else answer_matches(a, p.fact.target)
            for a, p in zip(answers, probes, strict=True)
        ]
        same: list[bool | None] | None = None
        top1: list[float | None] | None = None
        if reference is not None:
            if split not in no_answers:
                same = [
                    first_line(a) == first_line(reference[p.text]) if p.text in reference else None
                    for p, a in zip(probes, answers, strict=True)
                ]
            top1 = shares
        metrics[split] = _summary(probes, mc, gen, top1, same)
        named = (subsets or {}).get(split) or {}
        for name, ids in named.items():
            pick = [i for i, p in enumerate(probes) if p.fact.id in ids]
            if pick:
                metrics[split][name] = _summary(
                    [probes[i] for i in pick],
                    [mc[i] for i in pick],
                    [gen[i] for i in pick],
                    None if top1 is None else [top1[i] for i in pick],
                    None if same is None else [same[i] for i in pick],
                )
                metrics[split][name].pop("domains")
        rows += _answer_rows(split, probes, answers, mc, gen, counts, named)
    return metrics, rows


def _forced_lines(probes: list[Probe], reference: dict[str, str] | None) -> list[str | None]:
    """Per probe, the reference answer's first line (None without one, or a blank one)."""
    return [
        raw_first_line(reference[p.text])
        if reference is not None
        and p.text in reference
        and raw_first_line(reference[p.text]).strip()
        else None
        for p in probes
    ]


def _answer_rows(
    split: str, probes: list[Probe], answers, mc, gen, counts, named: dict[str, set[str]]
) -> list[dict[str, Any]]:
    """facts_answers.jsonl's rows of one split: the greedy answer, what was scored right, the
    teacher-forced token agreement's counts (None without a reference) and the named subsets
    the fact is in: each split's figures re-aggregate from its rows."""
    return [
        {
            "split": split,
            "fact": p.fact.id,
            "domain": p.fact.domain,
            "prompt": p.text,
            "target": p.fact.target,
            "answer": a,
            "mc_correct": m,
            "gen_correct": g,
            "agreeing_tokens": None if c is None else c[0],
            "reference_tokens": None if c is None else c[1],
            "subsets": [name for name, ids in named.items() if p.fact.id in ids],
        }
        for p, a, m, g, c in zip(probes, answers, mc, gen, counts, strict=True)
    ]
