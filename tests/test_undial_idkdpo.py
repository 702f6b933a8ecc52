"""UNDIAL (self-distillation with adjusted logits) and IdkDPO (DPO with "I don't know" preferred)
as open-unlearning implements them: each loss and its gradient equal a hand computation of
open-unlearning's formula (src/trainer/utils.py) on a tiny model and batch, their references
come from the starting weights without a second model, and each runs end to end."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.errors import ConfigError
from kuda_cli.models.adapter import get_adapter
from kuda_cli.unlearn.batches import tokenize
from kuda_cli.unlearn.methods import MethodContext, get_method, method_schemas
from kuda_cli.validate import validate
from test_baseline_options import FORGET, RETAIN, gradients, open_unlearning_kl, perturb
from test_baselines import TINY, _forget_objective, _llama_count, starting_model

from conftest import read_json

# items of different lengths (the tiny tokenizer has a token per character): padded batches
UNEVEN = ["Neon is Ne.", "Zinc is Zn, a metal.", "Gold is Au, a soft metal.", "Lead is Pb."]


def make(name, model, tokenizer, forget=FORGET, seed=0, **overrides):
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(method_schemas()[name]),
            {"batch_size": 2, "steps": 2, **overrides},
        )
    )
    forget_set = tokenize(tokenizer, forget, 64, "forget")
    retain_set = tokenize(tokenizer, RETAIN, 64, "retain")
    used = list(range(len(forget_set)))
    ctx = MethodContext(
        model, get_adapter(model), tokenizer, [1], cfg, forget_set, retain_set, used, [0, 1, 2]
    )
    ctx.seed = seed
    return get_method(name)(ctx), forget_set, retain_set


def open_unlearning_retain(model, reference, batch, retain_loss) -> torch.Tensor:
    """GradDiff's `compute_retain_loss` on a batch without padding: `NLL`, the model's own loss
    with every token a label, or `KL`, compute_kl_divergence (test_baseline_options)."""
    if retain_loss == "kl":
        return open_unlearning_kl(model, reference, batch)
    ids = batch["input_ids"]
    return model(input_ids=ids, attention_mask=batch["attention_mask"], labels=ids).loss


# ----------------------------------------------------------------------------- UNDIAL
def open_unlearning_undial(model, reference, batch, beta) -> torch.Tensor:
    """`compute_undial_loss`: the soft-label cross-entropy from the teacher's softmax with the
    label's logit lowered by beta, at every position of the batch, averaged."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    shift_labels = batch["input_ids"][..., 1:]
    shift_logits = model(**inputs).logits[..., :-1, :]
    with torch.no_grad():
        teacher = reference(**inputs).logits[..., :-1, :]
    mask = torch.zeros_like(teacher)
    rows = torch.arange(mask.shape[0]).view(-1, 1, 1)
    positions = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[rows, positions, shift_labels.unsqueeze(-1)] = 1.0
    soft_label = F.softmax(teacher - mask * beta, dim=-1)
    vocab = shift_logits.shape[-1]
    return F.cross_entropy(
        shift_logits.reshape(-1, vocab), soft_label.reshape(-1, vocab), reduction="none"
    ).mean()


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_undial_loss_and_gradient_equal_open_unlearnings_formula(retain_loss):
    model, tokenizer = starting_model()
    reference = copy.deepcopy(model)
    method, forget, retain = make(
        "undial",
        model,
        tokenizer,
        beta=3.0,
        forget_weight=1.5,
        retain_weight=2.0,
        retain_loss=retain_loss,
    )
    method.prepare()
    perturb(model)
    f, r = forget.batch([2, 0]), retain.batch([0, 1])
    assert bool(f["attention_mask"].all() and r["attention_mask"].all())  # no padding
    loss, terms = method.loss(f, r)
    got = gradients(model, loss)

    undial = open_unlearning_undial(model, reference, f, 3.0)
    expected = 1.5 * undial + 2.0 * open_unlearning_retain(model, reference, r, retain_loss)
    want = gradients(model, expected)
    assert terms["undial"] == pytest.approx(undial.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.keys() == want.keys() and got
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    method.close()


def test_undial_teacher_is_the_starting_model_without_a_second_copy():
    model, tokenizer = starting_model()
    method, forget, _ = make("undial", model, tokenizer, forget=UNEVEN)
    models = _llama_count()
    method.prepare()
    assert _llama_count() == models  # no second copy of the model
    batch = forget.batch([1, 0, 3])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher = method.teacher.logits(batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(teacher[real], logits[real], rtol=1e-5, atol=1e-5)


def test_undial_masks_padding():
    model, tokenizer = starting_model()
    method, forget, _ = make("undial", model, tokenizer, forget=UNEVEN, beta=5.0)
    method.prepare()
    perturb(model)
    batch = forget.batch([1, 0, 3])
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad():
        _, terms = method.loss(batch, None)
        alone = [method.loss(forget.batch([i]), None)[1]["undial"] for i in (1, 0, 3)]
    predicted = batch["attention_mask"][:, 1:].sum(1).tolist()
    by_token = sum(a * n for a, n in zip(alone, predicted, strict=True)) / sum(predicted)
    assert terms["undial"] == pytest.approx(by_token, rel=1e-5)


# ----------------------------------------------------------------------------- IdkDPO
def labelled(rows: list[list[int]], starts: list[int]) -> dict:
    """A batch as open-unlearning's collator gives it: right-padded, labels -100 on the prompt
    and on padding."""
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for r, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        labels[r, start : len(row)] = torch.tensor(row[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def compute_batch_nll(model, inputs) -> torch.Tensor:
    """open-unlearning's per-sequence summed NLL over the labelled tokens."""
    logits = model(**inputs).logits[..., :-1, :]
    shifted = inputs["labels"][..., 1:]
    return F.cross_entropy(
        logits.transpose(-1, -2), shifted, ignore_index=-100, reduction="none"
    ).sum(-1)


def idk_pairs(tokenizer, forget, indices, seed, share=0.5):
    """kuda's pairs, written out: the prompt is the first half of the item's tokens, the
    preferred answer one of the schema's list drawn by default_rng([seed, index])."""
    answers = method_schemas()["idkdpo"]().idk_answers
    win, lose, starts = [], [], []
    for i in indices:
        ids = forget.ids[i]
        start = min(max(int(len(ids) * share), 1), len(ids) - 1)
        text = answers[int(np.random.default_rng([seed, i]).integers(len(answers)))]
        idk = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        win.append(ids[:start] + idk)
        lose.append(ids)
        starts.append(start)
    return labelled(win, starts), labelled(lose, starts)


@pytest.mark.parametrize(("seed", "retain_loss"), [(0, "nll"), (3, "kl")])
def test_idkdpo_loss_and_gradient_equal_open_unlearnings_formula(seed, retain_loss):
    model, tokenizer = starting_model()
    reference = copy.deepcopy(model)
    method, forget, retain = make(
        "idkdpo",
        model,
        tokenizer,
        forget=UNEVEN,
        seed=seed,
        beta=0.5,
        forget_weight=1.5,
        retain_weight=2.0,
        retain_loss=retain_loss,
    )
    method.prepare()
    perturb(model)
    indices = [2, 0, 3]
    r = retain.batch([0, 1])
    loss, terms = method.loss(forget.batch(indices), r)
    got = gradients(model, loss)

    win, lose = idk_pairs(tokenizer, forget, indices, seed)
    with torch.no_grad():
        win_ref, lose_ref = compute_batch_nll(reference, win), compute_batch_nll(reference, lose)
    win_log_ratio = -(compute_batch_nll(model, win) - win_ref)
    lose_log_ratio = -(compute_batch_nll(model, lose) - lose_ref)
    dpo = -2 / 0.5 * F.logsigmoid(0.5 * (win_log_ratio - lose_log_ratio)).mean()
    expected = 1.5 * dpo + 2.0 * open_unlearning_retain(model, reference, r, retain_loss)
    want = gradients(model, expected)
    assert terms["dpo"] == pytest.approx(dpo.item(), rel=1e-5)
    assert terms["forget_logratio"] == pytest.approx(lose_log_ratio.mean().item(), rel=1e-4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.keys() == want.keys() and got
    for key in got:  # summed log-probabilities: gradients up to ~20, float32 rounding ~1e-6 of it
        scale = want[key].abs().max().item()
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5 * scale)


def test_idkdpo_starts_at_2_over_beta_log_2_from_precomputed_references():
    model, tokenizer = starting_model()
    method, forget, _ = make("idkdpo", model, tokenizer, forget=UNEVEN, beta=0.1)
    models = _llama_count()
    method.prepare()
    assert _llama_count() == models
    assert sorted(method.reference) == list(range(len(forget)))
    with torch.no_grad():
        loss, terms = method.loss(forget.batch([3, 0, 1]), None)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)
    assert abs(terms["idk_logratio"]) < 1e-5 and abs(terms["forget_logratio"]) < 1e-5


def test_idk_answer_of_an_item_depends_on_seed_and_index_alone():
    model, tokenizer = starting_model()
    method, _, _ = make("idkdpo", model, tokenizer, forget=UNEVEN, seed=0)
    method.prepare()
    subset, _, _ = make("idkdpo", model, tokenizer, forget=UNEVEN, seed=0)
    subset.ctx.forget_used = [3, 1]  # another run drawing fewer items, in another order
    subset.prepare()
    assert {i: subset.preferred[i] for i in (3, 1)} == {i: method.preferred[i] for i in (3, 1)}
    reseeded = [make("idkdpo", model, tokenizer, forget=UNEVEN, seed=s)[0] for s in range(1, 6)]
    for other in reseeded:
        other.prepare()
    assert any(other.preferred != method.preferred for other in reseeded)
    for i, row in method.preferred.items():  # the prompt is the item's first half
        start = method.starts[i]
        assert row[:start] == method.ctx.forget.ids[i][:start] and len(row) > start


def test_an_empty_idk_answer_is_refused():
    overrides = ["model=tiny-random", "unlearn=idkdpo", "unlearn.idk_answers=[' ']"]
    with pytest.raises(ConfigError, match="unlearn.idk_answers holds an empty answer"):
        validate(compose([*overrides, "stage=unlearn"]))


# ----------------------------------------------------------------------------- end to end
def test_undial_and_idkdpo_unlearn_end_to_end(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    fixed = [*TINY, "locate=fixed", "locate.layers=[1,2]"]
    kuda("unlearn", "-m", "unlearn=undial,idkdpo", *fixed, "hydra.sweep.dir=sweep", check=True)
    for num, (name, term) in enumerate([("undial", "undial"), ("idkdpo", "dpo")]):
        run = tmp_path / "sweep" / str(num)
        assert read_json(run / "meta.json")["status"] == "completed", name
        assert read_json(run / "metrics.json")["train"]["method"] == name
        rows = (run / "train_log.jsonl").read_text().splitlines()
        assert len(rows) == 2 and f'"{term}"' in rows[-1], (name, rows[-1])
        before, after = _forget_objective(run, name, fixed, [1, 2])
        # the forget NLL rose (measured: 0.045 nats UNDIAL, 0.051 IdkDPO; float32 noise ~1e-6)
        assert after - before > 1e-2, (name, before, after)
