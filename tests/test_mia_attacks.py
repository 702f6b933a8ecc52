"""The membership-inference attacks beside Min-K% (LOSS, zlib, Min-K%++, gradient norm,
reference), checked against a hand computation on the tiny model, their orientation (members
score higher once memorised), exact memorisation and extraction strength by their definitions,
and the eval.muse.mia_attacks setting."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch

from kuda_cli.evaluate.memorization import (
    exact_memorization,
    extraction_strength,
    greedy_answer_tokens,
    memorization,
)
from kuda_cli.evaluate.mia_attacks import ATTACKS, attack_aucs, attack_scores, text_nlls

from conftest import memorise

TEXTS = ["The owl brought a letter at dawn to the tower.", "Seven keys."]
K = 0.5


def _hand_logprobs(model, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next token, log p over the vocabulary at each position), one text alone,
    in float64."""
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1), logp


def _lowest_mean(values: torch.Tensor, k: float) -> float:
    n = max(1, int(len(values) * k))
    return sum(sorted(values.tolist())[:n]) / n


def _hand_scores(lp, logp, ref_lp, text: str, gradnorm: float) -> dict[str, float]:
    """Each attack's score by hand from the scored tokens' log-probabilities `lp`, the full
    log-distributions `logp` at those positions, the reference model's `ref_lp`, and the text
    zlib compresses."""
    nll = -lp.mean().item()
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = (p * (logp - mu[:, None]).square()).sum(-1).sqrt()
    return {
        "min_k": _lowest_mean(lp, K),
        "loss": -nll,
        "zlib": -nll / len(zlib.compress(text.encode("utf-8"))),
        "min_k_plus_plus": _lowest_mean((lp - mu) / sigma, K),
        "reference": -ref_lp.mean().item() - nll,
        "gradnorm": gradnorm,
    }


def _hand_gradnorm(model, tokenizer, text: str) -> float:
    ids = torch.tensor([tokenizer(text).input_ids])
    model.zero_grad()
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    (-logp.gather(-1, ids[0, 1:, None]).mean()).backward()
    norm = sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return -float(norm.sqrt())


def _perturbed(model, seed: int = 1):
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return reference


def test_each_attack_score_equals_hand_computation(tiny):
    model, tokenizer = tiny
    reference = _perturbed(model)
    ref_nlls = text_nlls(reference, tokenizer, TEXTS, batch_size=2)
    got = attack_scores(
        model, tokenizer, TEXTS, ATTACKS, k=K, reference_nlls=ref_nlls, batch_size=2
    )
    assert set(got) == set(ATTACKS)
    assert all(p.grad is None for p in model.parameters())  # gradnorm leaves .grad alone
    for i, text in enumerate(TEXTS):
        lp, logp = _hand_logprobs(model, tokenizer, text)
        ref_lp, _ = _hand_logprobs(reference, tokenizer, text)
        expected = _hand_scores(lp, logp, ref_lp, text, _hand_gradnorm(model, tokenizer, text))
        for name, value in expected.items():
            assert got[name][i] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, text)


PROMPTS = ["Question: Who brought the letter?\nAnswer:", "Question: How many keys?\nAnswer:"]


def _hand_answer_logprobs(model, tokenizer, prompt: str, text: str):
    """(log p of each of the text's tokens given the prompt and its earlier tokens, log p over
    the vocabulary at those positions, the prompt's length in tokens), in float64."""
    context = tokenizer(prompt).input_ids
    ids = torch.tensor([context + tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, len(context) - 1 : -1].double().log_softmax(-1)
    return logp.gather(-1, ids[0, len(context) :, None]).squeeze(-1), logp, ids, len(context)


def test_each_attack_given_a_prompt_scores_the_texts_tokens_after_it(tiny):
    model, tokenizer = tiny
    reference = _perturbed(model)
    texts = [" " + t for t in TEXTS]
    ref_nlls = text_nlls(reference, tokenizer, texts, batch_size=2, prompts=PROMPTS)
    got = attack_scores(
        model,
        tokenizer,
        texts,
        ATTACKS,
        k=K,
        reference_nlls=ref_nlls,
        batch_size=2,
        prompts=PROMPTS,
    )
    for i, (prompt, text) in enumerate(zip(PROMPTS, texts, strict=True)):
        lp, logp, ids, n = _hand_answer_logprobs(model, tokenizer, prompt, text)
        ref_lp, *_ = _hand_answer_logprobs(reference, tokenizer, prompt, text)
        model.zero_grad()
        logits = model(input_ids=ids).logits[0, n - 1 : -1]
        (-logits.log_softmax(-1).gather(-1, ids[0, n:, None]).mean()).backward()
        grads = [p.grad.double().square().sum() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        expected = _hand_scores(lp, logp, ref_lp, text, -float(sum(grads).sqrt()))
        for name, value in expected.items():
            # Min-K%++'s float32 variance (E[log p^2] - mu^2) is the least exact
            rel = 1e-3 if name == "min_k_plus_plus" else 1e-4
            assert got[name][i] == pytest.approx(value, rel=rel, abs=1e-5), (name, text)
    whole = attack_scores(
        model, tokenizer, [p + t for p, t in zip(PROMPTS, texts, strict=True)], ["loss"]
    )
    assert all(abs(a - b) > 1e-3 for a, b in zip(whole["loss"], got["loss"], strict=True))


def test_reference_attack_left_out_without_a_reference(tiny):
    model, tokenizer = tiny
    got = attack_scores(model, tokenizer, TEXTS, ["reference", "loss"], batch_size=2)
    assert set(got) == {"min_k", "loss"}
    with pytest.raises(ValueError, match="unknown attacks"):
        attack_scores(model, tokenizer, TEXTS, ["loss", "min_k++"])


def test_every_attack_ranks_memorised_members_higher(tiny):
    model, tokenizer = tiny
    members = [
        "The owl brought a letter at dawn.",
        "Seven keys open the silver door.",
        "A lantern swings above the gate.",
    ]
    nonmembers = [
        "Rain fell on the quiet harbour.",
        "Bread rises slowly in a warm room.",
        "The train left before the bell rang.",
    ]
    starting = copy.deepcopy(model)
    memorise(model, tokenizer, members)
    scores = {
        side: attack_scores(
            model, tokenizer, texts, ATTACKS, reference_nlls=text_nlls(starting, tokenizer, texts)
        )
        for side, texts in (("member", members), ("nonmember", nonmembers))
    }
    aucs = attack_aucs(scores["member"], scores["nonmember"])
    assert set(aucs) == set(ATTACKS)
    for name, result in aucs.items():
        assert result["auc"] > 0.5, name
        assert result["member_mean"] > result["nonmember_mean"], name


@pytest.mark.parametrize(
    ("predicted", "em", "es"),
    [
        ([5, 6, 7, 8], 1.0, 1.0),  # the prompt alone extracts it all
        ([9, 6, 7, 8], 0.75, 0.75),  # one true token given, the rest follows
        ([5, 9, 7, 8], 0.75, 0.5),
        ([5, 6, 7, 9], 0.75, 0.0),  # the last token never follows: k = n
        ([9, 9, 9, 9], 0.0, 0.0),
    ],
)
def test_exact_memorization_and_extraction_strength_by_definition(predicted, em, es):
    answer = torch.tensor([5, 6, 7, 8])
    assert exact_memorization(torch.tensor(predicted), answer) == pytest.approx(em)
    assert extraction_strength(torch.tensor(predicted), answer) == pytest.approx(es)


def _hand_greedy(model, prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
    """The greedy next token at each answer position under the true prefix, one text alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    return logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()


def test_memorization_is_one_on_a_text_the_model_reproduces(tiny):
    model, tokenizer = tiny
    prompt, answer, other = "The old castle", " stood on a hill.", "Harry looked at"
    prompt_ids = tokenizer(prompt).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        ids = torch.tensor([prompt_ids + answer_ids])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert _hand_greedy(model, prompt_ids, answer_ids) == answer_ids  # it reproduces the answer
    found = memorization(model, tokenizer, [prompt, other], [answer, answer], batch_size=2)
    assert found["n"] == 2
    pairs = greedy_answer_tokens(model, tokenizer, [prompt], [answer])
    assert pairs[0][0].tolist() == answer_ids and pairs[0][1].tolist() == answer_ids
    # the other prompt, by hand: the smallest k whose suffix the greedy tokens reproduce
    hits = [
        p == a
        for p, a in zip(
            _hand_greedy(model, tokenizer(other).input_ids, answer_ids), answer_ids, strict=True
        )
    ]
    k = next(k for k in range(len(hits) + 1) if all(hits[k:]))
    assert found["exact_memorization"] == pytest.approx((1.0 + sum(hits) / len(hits)) / 2)
    assert found["extraction_strength"] == pytest.approx((1.0 + 1 - k / len(hits)) / 2)


def test_unknown_mia_attack_is_one_line_exit_2(kuda):
    done = kuda(
        "eval", "model=tiny-random", "data=muse_news", "eval=muse", "eval.muse.mia_attacks=[a,b]"
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()
    assert len(last) == 1 and "eval.muse.mia_attacks" in last[0] and "'a'" in last[0]
    assert "min_k_plus_plus" in last[0]


def test_starting_model_runs_no_reference_attack():
    from kuda_cli.evaluate import get_metric
    from kuda_cli.evaluate.metrics.muse import MuseEvalConfig
    from kuda_cli.evaluate.metrics.tofu import TofuEvalConfig

    for name, schema in (("muse", MuseEvalConfig), ("tofu", TofuEvalConfig)):
        settings = schema(mia_attacks=["loss", "reference", "gradnorm"])
        assert get_metric(name).for_starting_model(settings).mia_attacks == ["loss", "gradnorm"]
    assert "gradnorm" not in MuseEvalConfig().mia_attacks  # costly on a 7B model: opt in


def test_muse_reference_attack_scores_against_the_lent_model(tiny, tmp_path):
    from contextlib import contextmanager

    from omegaconf import OmegaConf

    from kuda_cli.compose import compose
    from kuda_cli.evaluate import EvalContext
    from kuda_cli.evaluate.metrics.muse import mia_of

    model, tokenizer = tiny
    reference = _perturbed(model)
    forget, holdout = ["An owl at dawn.", "Seven keys, one door."], ["Snow on the hills.", "Hi."]
    paths = {}
    for name, texts in (("forget", forget), ("holdout", holdout)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    cfg = compose(
        [
            "data=muse_news",
            "eval=muse",
            "stage=eval",
            "model=tiny-random",
            *(f"data.{name}.path={path}" for name, path in paths.items()),
            "eval.muse.mia_attacks=[reference]",
        ]
    )

    @contextmanager
    def lend():
        yield reference, tokenizer, "reference"

    ctx = EvalContext(
        loaded=type("Loaded", (), {"model": model, "tokenizer": tokenizer})(),
        eval=OmegaConf.to_object(cfg.eval),
        data=OmegaConf.to_object(cfg.data),
        judge=lend,
    )
    expected = attack_aucs(
        *(
            attack_scores(
                model,
                tokenizer,
                texts,
                ["reference"],
                reference_nlls=text_nlls(reference, tokenizer, texts),
            )
            for texts in (forget, holdout)
        )
    )
    assert mia_of(ctx) == expected and set(expected) == {"min_k", "reference"}


def test_muse_summary_has_each_attack_auc_before_and_after():
    from kuda_cli.evaluate import get_metric
    from kuda_cli.evaluate.metrics.muse import MuseEvalConfig

    before = {"muse": {"mia": {"loss": {"auc": 0.9}}}}
    after = {"muse": {"mia": {"loss": {"auc": 0.6}, "reference": {"auc": 0.55}}}}
    summary = get_metric("muse").summarise(before, after, MuseEvalConfig())
    assert (summary["mia_loss_auc"], summary["mia_loss_auc_before"]) == (0.6, 0.9)
    assert (summary["mia_reference_auc"], summary["mia_reference_auc_before"]) == (0.55, None)
