"""MUSE metrics: the scores checked by hand and against reference implementations, the
model-running helpers checked against unbatched computation on the tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from rouge_score import rouge_scorer

from kuda_cli.evaluate import muse_scoring as muse_metrics
from kuda_cli.evaluate.muse_scoring import (
    auc,
    first_answer,
    greedy_continuations,
    knowmem,
    knowmem_prompt,
    mia_min_k,
    min_k_score,
    privleak,
    rouge_l_f1,
    rouge_tokens,
    token_logprobs,
    truncate_to_tokens,
    verbmem,
)

from conftest import memorise

TEXTS = [
    "Harry looked at the letter.",
    "A",  # shortest: one byte, so no scored token at all
    "The quick brown fox jumps over the lazy dog, twice, and then sleeps.",
    "Dumbledore smiled.",
    "Hi there",
]

# ---------------------------------------------------------------------------------------------
# ROUGE-L


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # pred [the cat sat on the mat], ref [the cat is on the mat]: LCS "the cat on the mat" = 5;
        # P = 5/6, R = 5/6, F1 = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # pred [a b c d] (4), ref [b d] (2): LCS "b d" = 2; P = 2/4, R = 2/2,
        # F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
        ("A B C D", "b d", 2 / 3),
        # order matters: pred [c b a], ref [a b c]: LCS = 1; P = R = 1/3, F1 = 1/3.
        ("c b a", "a b c", 1 / 3),
        # case and punctuation are not tokens: both are [hello world]; LCS = 2, F1 = 1.
        ("Hello, World!", "hello world", 1.0),
        # an apostrophe splits: [don t stop] on both sides, F1 = 1.
        ("don't stop", "don t stop", 1.0),
        # no common token: LCS = 0, F1 = 0.
        ("abc", "xyz", 0.0),
        # non-ASCII letters are separators: pred [caf], ref [caf x]: LCS = 1; P = 1, R = 1/2,
        # F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
        ("café", "caf x", 2 / 3),
    ],
)
def test_rouge_l_f1_by_hand(prediction, reference, expected):
    assert rouge_l_f1(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("prediction", "reference"), [("", "x"), ("x", ""), ("", ""), ("!?", "a")])
def test_rouge_l_f1_empty_is_zero(prediction, reference):
    assert rouge_l_f1(prediction, reference) == 0.0


def test_rouge_tokens_match_rouge_score_default():
    assert rouge_tokens("It's 3:45 p.m. — Ünïcode, UPPER_case!") == [
        "it", "s", "3", "45", "p", "m", "n", "code", "upper", "case",
    ]  # fmt: skip


ROUGE_PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Harry Potter and the Philosopher's Stone", "Harry Potter and the Sorcerer's Stone"),
    ("", "nothing here"),
    ("nothing here", ""),
    ("a a a a", "a"),
    ("a", "a a a a"),
    ("one two three four five", "five four three two one"),
    ("The Answer is 42.", "42"),
    ("In 1997, J.K. Rowling published her first book.", "Rowling's first book came out in 1997"),
    ("x y z x y z x y z", "z y x z y x"),
    ("Mr. and Mrs. Dursley, of number four, Privet Drive", "Mr and Mrs Dursley of Privet Drive"),
    ("ÀÉÎÕÜ accents everywhere", "accents everywhere"),
    ("tabs\tand\nnewlines   spaces", "tabs and newlines spaces"),
    ("repeated repeated words words", "words repeated words repeated"),
    ("e-mail co-operate re-enter", "email cooperate reenter"),
    ("123 456 789", "123 789 456"),
    ("Question: who? Answer: him", "him"),
    ("he said he would come", "she said she would not come"),
    ("!!!", "???"),
    ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the lazy fox"),
    ("running runs ran", "run running runner"),
    ("single", "single"),
]


@pytest.mark.parametrize(("prediction", "reference"), ROUGE_PAIRS)
def test_rouge_l_f1_matches_rouge_score(prediction, reference):
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = scorer.score(reference, prediction)["rougeL"].fmeasure  # score(target, prediction)
    assert rouge_l_f1(prediction, reference) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Min-K%, AUC, PrivLeak


def test_min_k_score_by_hand():
    logprobs = [-1.0, -5.0, -2.0, -8.0, -3.0]
    # k = 0.4: int(5 * 0.4) = 2 lowest, -8 and -5: mean -6.5.
    assert min_k_score(logprobs, 0.4) == pytest.approx(-6.5)
    assert min_k_score(torch.tensor(logprobs), 0.4) == pytest.approx(-6.5)
    # k = 0.1: int(0.5) = 0, but at least one token: -8.
    assert min_k_score(logprobs, 0.1) == pytest.approx(-8.0)
    # k = 1: every token: -19 / 5.
    assert min_k_score(logprobs, 1.0) == pytest.approx(-3.8)
    assert min_k_score([-0.7], 0.4) == pytest.approx(-0.7)


def test_min_k_score_rejects_nothing_to_score():
    with pytest.raises(ValueError):
        min_k_score([], 0.4)
    with pytest.raises(ValueError):
        min_k_score([-1.0], 0.0)


def test_auc_extremes_and_ties():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert auc([1, 1, 1], [1, 1]) == 0.5
    # members [0.9, 0.5, 0.5], non-members [0.5, 0.1]: 0.9 beats both (2); each 0.5 ties 0.5
    # (1/2) and beats 0.1 (1), so 1.5 twice; (2 + 3) / (3 * 2) pairs = 5/6.
    assert auc([0.9, 0.5, 0.5], [0.5, 0.1]) == pytest.approx(5 / 6)


def test_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    # rounded so that ties occur
    members = (torch.randn(40, generator=generator) + 0.5).round(decimals=1).tolist()
    nonmembers = torch.randn(30, generator=generator).round(decimals=1).tolist()
    expected = metrics.roc_auc_score([1] * 40 + [0] * 30, members + nonmembers)
    assert auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)


def test_auc_needs_both_sets():
    with pytest.raises(ValueError):
        auc([], [1.0])


def test_privleak_sign():
    assert privleak(0.8, 0.5) == pytest.approx(60.0)  # forget set still recognised
    assert privleak(0.3, 0.5) == pytest.approx(-40.0)  # forget set now looks unseen
    assert privleak(0.5, 0.5) == 0.0


# ---------------------------------------------------------------------------------------------
# Running the model


def _unbatched_logprobs(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_token_logprobs_equal_unbatched(tiny, batch_size):
    model, tokenizer = tiny
    side = tokenizer.padding_side
    got = token_logprobs(model, tokenizer, TEXTS, batch_size=batch_size)
    assert len(got) == len(TEXTS)
    for text, lp in zip(TEXTS, got, strict=True):
        n_tokens = len(tokenizer(text).input_ids)
        assert lp.shape == (n_tokens - 1,)
        assert lp.dtype == torch.float32
        assert (lp <= 0).all()
        torch.testing.assert_close(lp, _unbatched_logprobs(model, tokenizer, text))
    assert tokenizer.padding_side == side


def test_token_logprobs_truncate(tiny):
    model, tokenizer = tiny
    (lp,) = token_logprobs(model, tokenizer, [TEXTS[2]], max_length=8)
    assert lp.shape == (7,)


def test_greedy_continuations_batched_equal_one_by_one(tiny):
    model, tokenizer = tiny
    tokenizer.padding_side = "right"
    prompts = ["Question: who?\nAnswer:", "Once", "The quick brown fox", "ab"]
    batched = greedy_continuations(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    single = [
        greedy_continuations(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0]
        for p in prompts
    ]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)
    assert not any("<pad>" in text or "</s>" in text for text in batched)
    assert tokenizer.padding_side == "right"  # restored
    assert batched == greedy_continuations(model, tokenizer, prompts, max_new_tokens=12)


def test_greedy_continuations_without_pad_token(tiny):
    model, tokenizer = tiny
    expected = greedy_continuations(model, tokenizer, ["Once", "ab"], max_new_tokens=4)
    tokenizer.pad_token = None  # as Llama tokenizers ship
    assert greedy_continuations(model, tokenizer, ["Once", "ab"], max_new_tokens=4) == expected
    assert tokenizer.pad_token is None


def test_truncate_to_tokens(tiny):
    _, tokenizer = tiny  # one token per byte
    assert truncate_to_tokens(tokenizer, "Hello world", 5) == "Hello"
    assert truncate_to_tokens(tokenizer, "Hi", 5) == "Hi"


def test_verbmem(tiny):
    model, tokenizer = tiny
    prompts = ["Mr. and Mrs. Dursley", "It was a bright cold day"]
    truths = [" of number four, Privet Drive", " in April"]
    result = verbmem(model, tokenizer, prompts, truths, max_new_tokens=8, batch_size=2)
    assert set(result) == {"rougeL_f1", "n", "per_item"}
    assert result["n"] == 2 and len(result["per_item"]) == 2
    assert all(0.0 <= s <= 1.0 for s in result["per_item"])
    assert result["rougeL_f1"] == pytest.approx(sum(result["per_item"]) / 2)
    assert verbmem(model, tokenizer, prompts, truths, max_new_tokens=8) == result


def test_verbmem_cuts_truth_to_token_budget(tiny, monkeypatch):
    model, tokenizer = tiny

    # The random model emits arbitrary bytes; fix its output to see what the truth is cut to.
    def fixed(*args, **kwargs):
        return ["alpha beta"]

    monkeypatch.setattr(muse_metrics, "greedy_continuations", fixed)
    truth = "alpha beta gamma delta"
    # 10 byte tokens is "alpha beta": LCS 2 of 2 and 2, F1 = 1.
    assert verbmem(model, tokenizer, ["p"], [truth], max_new_tokens=10)["per_item"] == [1.0]
    # Uncut: P = 2/2, R = 2/4, F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert verbmem(model, tokenizer, ["p"], [truth], max_new_tokens=64)["rougeL_f1"] == (
        pytest.approx(2 / 3)
    )


def test_knowmem_prompt_format():
    assert knowmem_prompt("Who?", [("Q1?", "A1"), ("Q2?", "A2")]) == (
        "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Who?\nAnswer:"
    )
    assert knowmem_prompt("Who?") == "Question: Who?\nAnswer:"
    assert knowmem_prompt("Who?", []) == "Question: Who?\nAnswer:"


@pytest.mark.parametrize(
    ("generated", "answer"),
    [
        (" Hermione Granger\n\nQuestion: Who is Ron?\nAnswer: A friend", "Hermione Granger"),
        (" Hermione Granger Question: next", "Hermione Granger"),
        (" 1997", "1997"),
        ("\nHogwarts\nmore", "Hogwarts"),
        ("   ", ""),
        ("", ""),
    ],
)
def test_first_answer(generated, answer):
    assert first_answer(generated) == answer


def test_knowmem(tiny):
    model, tokenizer = tiny
    questions = ["Who wrote it?", "When?", "Where?"]
    answers = ["Rowling", "1997", "Hogwarts"]
    kwargs = dict(icl_questions=["What colour?"], icl_answers=["Red"], max_new_tokens=6)
    result = knowmem(model, tokenizer, questions, answers, batch_size=2, **kwargs)
    assert set(result) == {"rougeL_f1", "n", "per_item"}
    assert result["n"] == 3 and len(result["per_item"]) == 3
    assert all(0.0 <= s <= 1.0 for s in result["per_item"])
    assert knowmem(model, tokenizer, questions, answers, batch_size=3, **kwargs) == result
    with pytest.raises(ValueError):
        knowmem(model, tokenizer, questions, answers, icl_questions=["q"], icl_answers=[])


def test_mia_min_k_shapes(tiny):
    model, tokenizer = tiny
    result = mia_min_k(model, tokenizer, TEXTS[2:4], [TEXTS[0], TEXTS[4]], k=0.2, batch_size=2)
    assert result["k"] == 0.2
    assert 0.0 <= result["auc"] <= 1.0
    assert math.isfinite(result["member_mean"]) and math.isfinite(result["nonmember_mean"])
    assert result["member_mean"] == pytest.approx(sum(result["member_scores"]) / 2)
    assert mia_min_k(model, tokenizer, TEXTS[2:4], [TEXTS[0], TEXTS[4]], k=0.2) == result


def test_mia_min_k_detects_memorised_texts(tiny):
    model, tokenizer = tiny
    members = ["The owl brought a letter at dawn.", "Seven keys open the silver door."]
    nonmembers = ["Rain fell on the quiet harbour.", "Bread rises slowly in a warm room."]
    memorise(model, tokenizer, members)
    result = mia_min_k(model, tokenizer, members, nonmembers)
    assert result["auc"] == 1.0
    assert result["member_mean"] > result["nonmember_mean"]
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    mia_min_k(model, tokenizer, members[:1], nonmembers[:1])
    assert modes == [False, False]  # scored in eval mode ...
    assert model.training  # ... and the caller's mode is given back
