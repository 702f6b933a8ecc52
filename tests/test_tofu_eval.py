"""eval=tofu on local TOFU-format splits (the tiny model), every figure checked against a hand
computation: answer probability, ROUGE-L recall, truth ratio (forget and retain forms),
forget quality and model utility, and the LOSS attack's AUC on forget vs holdout answers."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from rouge_score import rouge_scorer

from kuda_cli.compose import compose
from kuda_cli.evaluate import EvalContext, get_metric

FIXTURE = Path(__file__).parent / "tofu"
SPLITS = ("forget", "retain", "holdout", "forget_perturbed", "retain_perturbed")
SPLITS += ("real_authors", "world_facts")
NEW_TOKENS, MAX_ITEMS = 8, 5
RETAIN_RATIOS = [0.2, 0.45, 0.7, 0.95, 1.3]
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / f"{name}.jsonl").read_text().splitlines()]


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------ the oracle
# From TOFU's definitions with plain torch, one item at a time, no batching, padding or cache.


def prompt_of(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@torch.no_grad()
def answer_loss(model, tokenizer, question: str, answer: str) -> float:
    """Mean NLL of the answer's tokens and the EOS token after the prompt."""
    context = tokenizer(prompt_of(question)).input_ids
    target = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    logits = model(torch.tensor([context + target])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    picked = [logprobs[len(context) + i - 1, t] for i, t in enumerate(target)]
    return -float(sum(picked)) / len(target)


@torch.no_grad()
def greedy(model, tokenizer, question: str, margins: list[float]) -> str:
    ids = tokenizer(prompt_of(question)).input_ids
    new: list[int] = []
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([ids + new])).logits[0, -1]
        top2 = logits.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@torch.no_grad()
def answer_only_loss(model, tokenizer, question: str, answer: str) -> float:
    """Mean NLL of the answer's tokens after the prompt, no EOS (a membership attack's LOSS)."""
    context = tokenizer(prompt_of(question)).input_ids
    target = tokenizer(" " + answer, add_special_tokens=False).input_ids
    logprobs = model(torch.tensor([context + target])).logits[0].double().log_softmax(-1)
    return -float(sum(logprobs[len(context) + i - 1, t] for i, t in enumerate(target))) / len(
        target
    )


def ks_pvalue_by_enumeration(a: list[float], b: list[float]) -> float:
    """Exact two-sided KS p-value: the share of the ways to split the pooled values into groups
    of len(a) and len(b) whose largest ECDF gap is at least the observed one."""

    def gap(x, y):
        return max(
            abs(sum(v <= t for v in x) / len(x) - sum(v <= t for v in y) / len(y)) for t in x + y
        )

    pooled, observed = a + b, gap(a, b)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    count = 0
    for chosen in splits:
        x = [pooled[i] for i in chosen]
        y = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        count += gap(x, y) >= observed - 1e-12
    return count / len(splits)


def mean(values):
    return sum(values) / len(values)


def pairwise_auc(members, nonmembers):
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


# ------------------------------------------------------------------------------ the test


def test_tofu_figures_equal_a_hand_computation(loaded, tmp_path):
    """Each item's candidate answers are the answers of the unperturbed splits, each followed
    by the oracle's own greedy answer: the likeliest is its answer, the next its paraphrased
    answer, the three least likely its perturbed answers. So every ROUGE recall lies strictly
    inside (0, 1) and every truth ratio is below 1 (retain forms above 0)."""
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    margins: list[float] = []
    rows, said = {key: read(key) for key in SPLITS}, {}
    pool = [r["answer"] for key in ("forget", "retain", "holdout") for r in rows[key]]
    for key in SPLITS[3:]:
        for i, row in enumerate(rows[key]):
            text = greedy(model, tokenizer, row["question"], margins)
            said[(key, i)] = text
            candidates = [f"{answer} {text}" for answer in pool]
            loss = {c: answer_loss(model, tokenizer, row["question"], c) for c in candidates}
            ranked = sorted(candidates, key=loss.get)
            row["answer"], row["perturbed_answer"] = ranked[0], ranked[-3:]
            if "paraphrased_answer" in row:
                row["paraphrased_answer"] = ranked[1]
    files = {key: write(tmp_path / f"{key}.jsonl", found) for key, found in rows.items()}

    expected = {}
    forms = {
        "forget_perturbed": ("paraphrased_answer", lambda r: min(r, 1 / (r + 1e-10))),
        "retain_perturbed": ("paraphrased_answer", lambda r: max(0.0, 1 - r)),
        "real_authors": ("answer", lambda r: max(0.0, 1 - r)),
        "world_facts": ("answer", lambda r: max(0.0, 1 - r)),
    }
    for key, (correct_key, form) in forms.items():
        probs, rouges, ratios, forms_of = [], [], [], []
        for i, row in enumerate(rows[key][:MAX_ITEMS]):
            loss = answer_loss(model, tokenizer, row["question"], row["answer"])
            correct = answer_loss(model, tokenizer, row["question"], row[correct_key])
            wrong = [
                answer_loss(model, tokenizer, row["question"], w) for w in row["perturbed_answer"]
            ]
            if key in ("forget_perturbed", "retain_perturbed"):
                probs.append(math.exp(-loss))
            else:
                p = math.exp(-loss)
                probs.append(p / (p + sum(math.exp(-w) for w in wrong)))
            rouges.append(SCORER.score(row["answer"], said[(key, i)])["rougeL"].recall)
            ratio = math.exp(-mean(wrong)) / math.exp(-correct)
            ratios.append(ratio)
            forms_of.append(form(ratio))
        expected[key] = {"prob": mean(probs), "rouge": mean(rouges), "truth_ratio": mean(forms_of)}
        expected[key]["ratios"] = ratios
    utility_parts = [
        expected[k][f]
        for k in ("retain_perturbed", "real_authors", "world_facts")
        for f in ("prob", "rouge", "truth_ratio")
    ]
    expected_utility = len(utility_parts) / sum(1 / v for v in utility_parts)
    expected_quality = ks_pvalue_by_enumeration(
        expected["forget_perturbed"]["ratios"], RETAIN_RATIOS
    )
    # the LOSS attack scores each answer given its question (data.loss_tokens: answer)
    member = [
        -answer_only_loss(model, tokenizer, r["question"], r["answer"])
        for r in rows["forget"][:MAX_ITEMS]
    ]
    nonmember = [
        -answer_only_loss(model, tokenizer, r["question"], r["answer"])
        for r in rows["holdout"][:MAX_ITEMS]
    ]
    expected_loss_auc = pairwise_auc(member, nonmember)

    # The fixture can tell right from wrong: every figure strictly inside (0, 1), and every
    # greedy step decided by more than float32 rounding (kuda generates batched, with a cache).
    assert all(0 < v < 1 for v in utility_parts)
    assert 0 < expected["forget_perturbed"]["rouge"] < 1 and 0 < expected_quality < 1
    assert expected_loss_auc not in (0.0, 0.5, 1.0)
    assert min(margins) > 1e-5

    cfg = compose(
        [
            *(f"data.{key}.path={path}" for key, path in files.items()),
            "data=tofu",
            "eval=tofu",
            "stage=eval",
            "model=tiny-random",
            f"data.retain_truth_ratios=[{','.join(map(str, RETAIN_RATIOS))}]",
            f"eval.tofu.max_new_tokens={NEW_TOKENS}",
            f"eval.tofu.max_items={MAX_ITEMS}",
            "eval.tofu.batch_size=2",  # batches of unequal items, and a last, partial one
        ]
    )
    ctx = EvalContext(
        loaded=loaded, eval=OmegaConf.to_object(cfg.eval), data=OmegaConf.to_object(cfg.data)
    )
    tofu = get_metric("tofu").compute(ctx)["tofu"]

    names = {
        "forget": "forget_perturbed",
        "retain": "retain_perturbed",
        "real_authors": "real_authors",
        "world_facts": "world_facts",
    }
    for name, key in names.items():
        for figure in ("prob", "rouge", "truth_ratio"):
            got = tofu[name][figure]
            assert got == pytest.approx(expected[key][figure], rel=1e-5), (name, figure)
        assert tofu[name]["n"] == min(MAX_ITEMS, len(rows[key]))
    assert tofu["forget"]["truth_ratios"] == pytest.approx(
        expected["forget_perturbed"]["ratios"], rel=1e-5
    )
    assert tofu["forget_quality"] == pytest.approx(expected_quality, abs=1e-9)
    assert tofu["model_utility"] == pytest.approx(expected_utility, rel=1e-5)
    assert set(tofu["mia"]) == {"min_k", "loss", "zlib", "min_k_plus_plus"}
    assert tofu["mia"]["loss"]["auc"] == pytest.approx(expected_loss_auc, abs=1e-12)
