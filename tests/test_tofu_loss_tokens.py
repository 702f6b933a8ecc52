"""data.loss_tokens on TOFU: with `answer` (the default, open-unlearning's) the unlearning losses
count a TOFU item's answer tokens only, given its question: the label mask the tokenised texts
carry, GA's, NPO's and RMU's losses and IdkDPO's prompt against a hand computation on the tiny
model; with `all` every token of the document counts, as for every other data kind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.config import TinySpec
from kuda_cli.data.kinds import kind_of
from kuda_cli.models.tiny import tiny_random
from kuda_cli.unlearn.batches import tokenize
from kuda_cli.unlearn.methods import get_method
from kuda_cli.unlearn.methods.rmu import site_output

from conftest import memorise, method_on

FIXTURE = Path(__file__).parent / "tofu"
LOCAL = [f"data.{key}.path={FIXTURE / key}.jsonl" for key in ("forget", "retain")]
SPEC = TinySpec(num_layers=3, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)


def rows(key: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / f"{key}.jsonl").read_text().splitlines()]


def texts_of(*overrides: str):
    cfg = compose(["data=tofu", "eval=tofu", "stage=unlearn", *LOCAL, *overrides])
    data = OmegaConf.to_object(cfg.data)
    return kind_of(data).unlearn_texts(data)


def token_sets(tokenizer, *overrides: str, max_length: int = 512):
    texts = texts_of(*overrides)
    forget = tokenize(
        tokenizer, texts.forget, max_length, "forget", answer_starts=texts.forget_answer_starts
    )
    retain = tokenize(
        tokenizer, texts.retain, max_length, "retain", answer_starts=texts.retain_answer_starts
    )
    return forget, retain


def prompt_and_answer(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """The tokens of an item's prompt and of its answer (after a space), encoded apart."""
    prompt = tokenizer(f"Question: {row['question']}\nAnswer:").input_ids
    return prompt, tokenizer(" " + row["answer"], add_special_tokens=False).input_ids


def method_of(name: str, model, tokenizer, forget, retain, **overrides):
    return method_on(name, model, tokenizer, forget, retain, **overrides)[0]


@torch.no_grad()
def answer_logprobs(model, tokenizer, row: dict) -> torch.Tensor:
    """log p of each answer token given the prompt and the answer's earlier tokens (float64)."""
    prompt, answer = prompt_and_answer(tokenizer, row)
    ids = torch.tensor([prompt + answer])
    logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return torch.stack([logp[len(prompt) + i - 1, t] for i, t in enumerate(answer)])


@torch.no_grad()
def document_logprobs(model, tokenizer, row: dict) -> torch.Tensor:
    prompt, answer = prompt_and_answer(tokenizer, row)
    ids = torch.tensor([prompt + answer])
    logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)


@pytest.fixture
def tiny_tofu():
    """The tiny model, taught the forget answers alone: their tokens are far likelier than the
    questions', so a loss over the whole document is far from one over the answers."""
    model, tokenizer = tiny_random(SPEC)
    memorise(model, tokenizer, [" " + r["answer"] for r in rows("forget")], steps=15)
    return model.eval(), tokenizer


def test_the_label_mask_marks_exactly_the_answer_tokens_of_a_tofu_item(tiny_tofu):
    _, tokenizer = tiny_tofu
    forget, retain = token_sets(tokenizer)
    for tokens, key in ((forget, "forget"), (retain, "retain")):
        for i, row in enumerate(rows(key)[: len(tokens)]):
            prompt, answer = prompt_and_answer(tokenizer, row)
            assert tokens.ids[i] == prompt + answer
            assert tokens.label_mask[i] == [0] * len(prompt) + [1] * len(answer)
    batch = forget.batch([0, 2])
    assert batch["label_mask"].shape == batch["attention_mask"].shape
    for r, i in enumerate([0, 2]):
        n = len(forget.ids[i])
        assert batch["label_mask"][r, :n].tolist() == forget.label_mask[i]
        assert not batch["label_mask"][r, n:].any()  # 0 at padding


def test_a_text_cut_before_its_answer_counts_every_token(tiny_tofu, caplog):
    _, tokenizer = tiny_tofu
    prompt, _ = prompt_and_answer(tokenizer, rows("forget")[0])
    with caplog.at_level("INFO"):
        forget, _ = token_sets(tokenizer, max_length=len(prompt) - 2)
    assert all(row == [1] * len(row) for row in forget.label_mask)
    assert len([r for r in caplog.records if "no answer token" in r.getMessage()]) == 2


def test_ga_and_npo_losses_count_the_answer_tokens_only(tiny_tofu):
    model, tokenizer = tiny_tofu
    forget, retain = token_sets(tokenizer)
    items, chosen = rows("forget"), [3, 0]
    batch = forget.batch(chosen)
    answer = [answer_logprobs(model, tokenizer, items[i]) for i in chosen]
    whole = [document_logprobs(model, tokenizer, items[i]) for i in chosen]
    expected = float(sum(a.sum() for a in answer) / sum(len(a) for a in answer))
    document = float(sum(w.sum() for w in whole) / sum(len(w) for w in whole))
    assert abs(expected - document) > 0.1  # the question's tokens change the figure
    with torch.no_grad():
        ga, _ = method_of("ga", model, tokenizer, forget, retain).loss(batch, None)
    assert ga.item() == pytest.approx(expected, rel=1e-5)

    npo = method_of("npo", model, tokenizer, forget, retain, beta=0.5, retain_weight=0.0)
    npo.prepare()  # the reference: the starting model's answer log-probabilities
    for i in range(len(forget)):
        assert npo.reference[i] == pytest.approx(
            float(answer_logprobs(model, tokenizer, items[i]).sum()), rel=1e-5
        )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        loss, _ = npo.loss(batch, None)
    ratios = [
        float(answer_logprobs(model, tokenizer, items[i]).sum()) - npo.reference[i] for i in chosen
    ]
    hand = -(2 / 0.5) * sum(math.log(1 / (1 + math.exp(0.5 * r))) for r in ratios) / len(ratios)
    assert loss.item() == pytest.approx(hand, rel=1e-5)


def test_rmu_activation_loss_counts_the_answer_tokens_only(tiny_tofu):
    model, tokenizer = tiny_tofu
    forget, retain = token_sets(tokenizer)
    rmu = method_of("rmu", model, tokenizer, forget, retain, c=2.0, alpha=0.0)
    rmu.prepare()
    items, chosen = rows("forget"), [1, 4]
    squared, counted, every = 0.0, 0, []
    with torch.no_grad():
        for i in chosen:
            prompt, answer = prompt_and_answer(tokenizer, items[i])
            one = {"input_ids": torch.tensor([prompt + answer])}
            one["attention_mask"] = torch.ones_like(one["input_ids"])
            h = site_output(model, rmu.site, one)[0].double()
            per_token = (h - rmu.control.double()).pow(2).mean(-1)
            squared += float(per_token[len(prompt) :].sum())
            counted += len(answer)
            every.append(per_token)
        loss, terms = rmu.loss(forget.batch(chosen), None)
    assert terms["forget_mse"] == pytest.approx(squared / counted, rel=1e-5)
    whole = float(torch.cat(every).mean())
    assert abs(whole - squared / counted) > 1e-3 * abs(whole)


def test_idkdpo_prompts_are_the_questions_where_answers_are_marked(tiny_tofu):
    model, tokenizer = tiny_tofu
    forget, retain = token_sets(tokenizer)
    idkdpo = method_of("idkdpo", model, tokenizer, forget, retain, retain_weight=0.0)
    idkdpo.prepare()
    for i, row in enumerate(rows("forget")[: len(forget)]):
        prompt, _ = prompt_and_answer(tokenizer, row)
        assert idkdpo.starts[i] == len(prompt)
        assert idkdpo.preferred[i][: len(prompt)] == prompt


def test_loss_tokens_all_trains_on_every_token_of_the_document(tiny_tofu):
    model, tokenizer = tiny_tofu
    texts = texts_of("data.loss_tokens=all")
    assert texts.forget_answer_starts is None and texts.retain_answer_starts is None
    forget, retain = token_sets(tokenizer, "data.loss_tokens=all")
    assert forget.label_mask is None and "label_mask" not in forget.batch([0, 1])
    items, chosen = rows("forget"), [3, 0]
    whole = [document_logprobs(model, tokenizer, items[i]) for i in chosen]
    with torch.no_grad():
        ga, _ = method_of("ga", model, tokenizer, forget, retain).loss(forget.batch(chosen), None)
    expected = float(sum(w.sum() for w in whole) / sum(len(w) for w in whole))
    assert ga.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo", "simnpo", "undial", "whp", "idkdpo"])
def test_no_forget_loss_reads_the_predictions_of_question_tokens(tiny_tofu, name):
    """The forget loss's gradient at the logits that predict a question's tokens is zero, and
    not at those that predict its answer's (IdkDPO: both of an item's rows)."""
    model, tokenizer = tiny_tofu
    forget, retain = token_sets(tokenizer)
    settings = {"reinforce_steps": 1} if name == "whp" else {}
    if hasattr(get_method(name).schema, "retain_weight"):
        settings["retain_weight"] = 0.0
    method = method_of(name, model, tokenizer, forget, retain, **settings)
    method.prepare()
    chosen = [1, 4]
    prompts = [len(prompt_and_answer(tokenizer, rows("forget")[i])[0]) for i in chosen]
    prompts = prompts * 2 if name == "idkdpo" else prompts
    grabbed = []

    def keep(module, args, output):
        output.retain_grad()
        grabbed.append(output)

    handle = model.lm_head.register_forward_hook(keep)
    try:
        loss, _ = method.loss(forget.batch(chosen), None)
    finally:
        handle.remove()
    loss.backward()
    grad = grabbed[-1].grad.abs().amax(-1)
    for row, n in enumerate(prompts):
        assert grad[row, : n - 1].max().item() == 0.0, row
        assert grad[row, n - 1].item() > 0.0, row  # the first answer token's prediction
    model.zero_grad(set_to_none=True)
