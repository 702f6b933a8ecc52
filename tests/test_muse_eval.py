"""eval=muse end to end on local copies of the MUSE splits (the tiny model), checked against a
hand computation of VerbMem, KnowMem, PrivLeak and the LOSS attack's AUC; and the one-line
error for an unreachable hub dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from rouge_score import rouge_scorer, tokenizers

from kuda_cli.compose import compose
from kuda_cli.config import ModelConfig, TinySpec
from kuda_cli.evaluate import EvalContext, get_metric
from kuda_cli.models.loading import load_model

VERB_TOKENS, KNOW_TOKENS, ICL_EXAMPLES, MINK_K, MAX_LENGTH, MAX_ITEMS = 16, 8, 1, 0.3, 24, 4
RETRAIN_AUC = 0.4
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = tokenizers.DefaultTokenizer(use_stemmer=False).tokenize


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------ the oracle
# Written from MUSE's definitions with plain torch and `rouge_score`, one text at a time and
# without a key-value cache, so it shares no code (batching, padding, caching) with kuda's.


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, margins: list[float]) -> str:
    """Greedy continuation, a full forward pass per new token, stopping at EOS; the gap between
    the two best logits of each step goes to `margins` (see the check on it in the test)."""
    ids = tokenizer(prompt).input_ids  # encoded as MUSE does: the tokenizer's default specials
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + new])).logits[0, -1]
        top2 = logits.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def rouge_l(prediction: str, reference: str) -> float:
    return SCORER.score(reference, prediction)["rougeL"].fmeasure


def answer_part(generation: str) -> str:
    """KnowMem keeps the answer's first line (leading whitespace skipped) before any Question:."""
    return generation.lstrip().split("\n")[0].split("Question:")[0].strip()


def knowmem_prompt(question: str, icl: list[dict]) -> str:
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return f"{shots}Question: {question}\nAnswer:"


@torch.no_grad()
def text_logprobs(model, tokenizer, text: str, max_length: int) -> list[float]:
    """log p(token_t | tokens_<t) for t >= 1 of the text's first `max_length` tokens."""
    ids = torch.tensor([tokenizer(text).input_ids[:max_length]])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return [float(logprobs[t, ids[0, t + 1]]) for t in range(ids.shape[1] - 1)]


def min_k(logprobs: list[float], k: float, extra: int = 0) -> float:
    """Min-K% Prob: the mean of the floor(k * n) lowest log-probabilities (at least one);
    `extra` more of them for the check that the fixture tells such a count apart."""
    lowest = sorted(logprobs)[: max(1, math.floor(len(logprobs) * k)) + extra]
    return sum(lowest) / len(lowest)


def pairwise_auc(members: list[float], nonmembers: list[float]) -> float:
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ------------------------------------------------------------------------------ the test


def test_muse_metric_on_local_splits(tmp_path):
    """VerbMem, KnowMem (forget, retain) and PrivLeak of eval=muse on local splits equal a hand
    computation on the same tiny model. The references are built from the oracle's own greedy
    output, so the ROUGE scores are neither 0 nor 1 and a different generation shows."""
    loaded = load_model(ModelConfig(name="t", source="tiny-random", tiny=TinySpec(), device="cpu"))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    margins: list[float] = []

    # VerbMem: 5 prompts (the 5th beyond eval.muse.max_items); each true continuation starts
    # with a word the model does not write, then the words of its greedy continuation, then
    # words that lie past the first VERB_TOKENS tokens (the reference is cut there), as many
    # as make each item's score its own (an item scored against another's reference shows).
    prompts = [
        "Story 0: the wizard w",
        "The old castle stood",
        "Harry looked at the",
        "At noon the bells",
        "Seven keys opened",
    ]
    verb_rows, expected_verb = [], []
    for i, prompt in enumerate(prompts):
        generated = greedy(model, tokenizer, prompt, VERB_TOKENS, margins)
        gt = " ".join(["the", *WORDS(generated), *["castle"] * (i + 6)])
        verb_rows.append({"prompt": prompt, "gt": gt})
        reference_ids = tokenizer(gt, add_special_tokens=False).input_ids[:VERB_TOKENS]
        reference = tokenizer.decode(reference_ids, skip_special_tokens=True)
        assert reference != gt  # the cut matters
        if i < MAX_ITEMS:
            expected_verb.append(rouge_l(generated, reference))

    # KnowMem: answers made of the oracle's (in-context) answer words plus ones it does not say
    # (a different number per item); two in-context pairs on file, of which
    # eval.muse.icl_examples=1 is used.
    icl = {
        "forget": [
            {"question": "Who wrote the letter?", "answer": "Albus"},
            {"question": "Unused?", "answer": "never"},
        ],
        "retain": [
            {"question": "How old?", "answer": "42"},
            {"question": "Unused?", "answer": "never"},
        ],
    }
    questions = {
        "forget": ["Who walked?", "What did the wizard find?", "When?", "Why?", "Not read?"],
        "retain": ["Where?", "Who is the mayor?", "How many bridges?"],
    }
    qa_rows, expected_know = {}, {}
    for role in ("forget", "retain"):
        shots = icl[role][:ICL_EXAMPLES]
        qa_rows[role], expected_know[role] = [], []
        for i, question in enumerate(questions[role]):
            prompt = knowmem_prompt(question, shots)
            said = answer_part(greedy(model, tokenizer, prompt, KNOW_TOKENS, margins))
            answer = " ".join([*WORDS(said), *["sky"] * (i + 1)])
            qa_rows[role].append({"question": question, "answer": answer})
            if i < MAX_ITEMS:
                expected_know[role].append(rouge_l(said, answer))

    # PrivLeak: Min-K% of 6 forget (members) and 5 holdout texts, 4 of each read, some longer
    # than MAX_LENGTH tokens (truncated); AUC that a member scores above a non-member. Texts
    # chosen so that the AUC (9/16) moves if any of these changed: one lowest token more or
    # fewer (checked below), k=0.4 or 1, the highest tokens instead of the lowest, no
    # truncation, all forget or all holdout texts read, the two swapped (checked when the
    # texts were chosen).
    forget_texts = [
        "Seven keys, one door.",
        "Fish swam under the ice.",
        "The mayor opened the new library today.",
        "Mud covered the boots of every soldier.",
        "An owl brought the letter at noon.",
        "Never read: past max_items.",
    ]
    holdout_texts = [
        "The council met again on Monday evening.",
        "A dragon slept.",
        "Bread rises in a warm oven.",
        "Her brother sold the farm in May.",
        "Snow on the hills.",
    ]
    forget_lp = [text_logprobs(model, tokenizer, t, MAX_LENGTH) for t in forget_texts[:MAX_ITEMS]]
    holdout_lp = [text_logprobs(model, tokenizer, t, MAX_LENGTH) for t in holdout_texts[:MAX_ITEMS]]
    members = [min_k(lp, MINK_K) for lp in forget_lp]
    nonmembers = [min_k(lp, MINK_K) for lp in holdout_lp]
    expected_auc = pairwise_auc(members, nonmembers)
    for extra in (-1, 1):
        moved = [[min_k(lp, MINK_K, extra) for lp in lps] for lps in (forget_lp, holdout_lp)]
        assert pairwise_auc(*moved) != expected_auc

    # The fixture can tell right from wrong: scores strictly inside (0, 1), an AUC other than
    # 1/2 (a forget/holdout swap gives 1 - AUC), no two Min-K% scores within reach of float32
    # rounding (a rank, hence the AUC, cannot flip with batching), and every greedy step decided
    # by more than such rounding (kuda generates batched, left-padded, with a key-value cache:
    # its logits differ from these by ~1e-7, which must not change an argmax).
    for scores in (expected_verb, expected_know["forget"], expected_know["retain"]):
        assert 0 < mean(scores) < 1
    assert expected_auc not in (0.0, 0.5, 1.0)
    pooled = sorted(members + nonmembers)
    assert min(b - a for a, b in zip(pooled, pooled[1:], strict=False)) > 1e-5
    assert min(margins) > 1e-5

    files = {
        "forget": write(tmp_path / "forget.jsonl", [{"text": t} for t in forget_texts]),
        "holdout": write(tmp_path / "holdout.jsonl", [{"text": t} for t in holdout_texts]),
        "verbmem": write(tmp_path / "verbmem.jsonl", verb_rows),
        "knowmem_forget": write(tmp_path / "kf.jsonl", qa_rows["forget"]),
        "knowmem_retain": write(tmp_path / "kr.jsonl", qa_rows["retain"]),
        "knowmem_forget_icl": write(tmp_path / "kfi.jsonl", icl["forget"]),
        "knowmem_retain_icl": write(tmp_path / "kri.jsonl", icl["retain"]),
    }
    cfg = compose(
        [
            *(f"data.{key}.path={path}" for key, path in files.items()),
            "data=muse_news",
            "eval=muse",
            "stage=eval",
            "model=tiny-random",
            f"data.retrain_auc={RETRAIN_AUC}",
            f"eval.muse.verbmem_max_new_tokens={VERB_TOKENS}",
            f"eval.muse.knowmem_max_new_tokens={KNOW_TOKENS}",
            f"eval.muse.icl_examples={ICL_EXAMPLES}",
            f"eval.muse.mink_k={MINK_K}",
            f"eval.muse.max_length={MAX_LENGTH}",
            f"eval.muse.max_items={MAX_ITEMS}",
            "eval.muse.batch_size=3",  # batches of unequal prompts, and a last, partial one
        ]
    )
    ctx = EvalContext(
        loaded=loaded, eval=OmegaConf.to_object(cfg.eval), data=OmegaConf.to_object(cfg.data)
    )
    muse = get_metric("muse").compute(ctx)["muse"]

    # ROUGE is over identical generations (the margins above): equal up to float summation.
    assert muse["verbmem_forget"]["n"] == 4
    assert muse["verbmem_forget"]["rougeL_f1"] == pytest.approx(mean(expected_verb), abs=1e-9)
    assert muse["knowmem_forget"]["n"] == 4 and muse["knowmem_retain"]["n"] == 3
    for role in ("forget", "retain"):
        got = muse[f"knowmem_{role}"]["rougeL_f1"]
        assert got == pytest.approx(mean(expected_know[role]), abs=1e-9), role
    # The AUC is a rank statistic over well-separated scores: exact.
    privleak = muse["privleak"]
    assert privleak["auc"] == pytest.approx(expected_auc, abs=1e-12)
    assert privleak["retrain_auc"] == RETRAIN_AUC and privleak["k"] == MINK_K
    expected_privleak = (expected_auc - RETRAIN_AUC) / RETRAIN_AUC * 100
    assert privleak["privleak"] == pytest.approx(expected_privleak, abs=1e-9)
    # The attacks beside Min-K% (no reference model lent: no reference attack), LOSS by hand.
    mia = muse["mia"]
    assert set(mia) == {"min_k", "loss", "zlib", "min_k_plus_plus"}
    assert mia["min_k"]["auc"] == privleak["auc"]
    expected_loss_auc = pairwise_auc(
        [mean(lp) for lp in forget_lp], [mean(lp) for lp in holdout_lp]
    )
    assert mia["loss"]["auc"] == pytest.approx(expected_loss_auc, abs=1e-12)
    verb = muse["verbmem_forget"]
    assert verb["n"] == 4 and 0 <= verb["extraction_strength"] <= verb["exact_memorization"] <= 1


def test_unreachable_muse_dataset_is_one_line_exit_2(kuda, tmp_path):
    done = kuda("eval", "model=tiny-random", "data=muse_news", "eval=muse")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kuda: data.verbmem") and "muse-bench/MUSE-News" in last
    assert "data.verbmem.path=" in last
