"""Options of the baselines that published code bases ship: the KL retain term of GradDiff and
NPO (`unlearn.retain_loss=kl`, open-unlearning's `retain_loss_type: KL`) and adaptive RMU (Dang
et al. 2025). Each loss and its gradient equal a hand computation of the reference's formula on
a tiny model and batch, and each runs end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kuda_cli import cli
from kuda_cli.models.adapter import get_adapter
from kuda_cli.unlearn.batches import batch_indices, tokenize
from kuda_cli.unlearn.methods import (
    MethodContext,
    get_method,
    method_schemas,
    sequence_logprob,
    sequence_nll,
)
from kuda_cli.unlearn.methods.npo import npo_loss
from kuda_cli.unlearn.methods.rmu import steering_vector
from test_baselines import TINY, starting_model

from conftest import read_json

# the tiny tokenizer has a token per character: texts of one length make batches without padding
FORGET = ["Neon is Ne, a gas.", "Zinc is Zn, metal.", "Gold is Au, metal.", "Lead is Pb, heavy."]
RETAIN = ["Oslo is in Norway.", "Bern is in Europe.", "Tokyo is large."]


def make(name, model, tokenizer, **overrides):
    schema = method_schemas()[name]
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(schema), {"batch_size": 2, "steps": 2, **overrides})
    )
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    ctx = MethodContext(
        model, get_adapter(model), tokenizer, [1], cfg, forget, retain, [0, 1, 2, 3], [0, 1, 2]
    )
    return get_method(name)(ctx), forget, retain


def perturb(model) -> None:
    """Move every weight off the starting point, so the reference and the model differ."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def open_unlearning_kl(model, reference, batch) -> torch.Tensor:
    """KL(p_ref || p_theta) summed over the vocabulary at every position of the batch, divided
    by batch x positions (kl_div's `batchmean` over the flattened rows there)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        log_ref = reference(**inputs).logits.log_softmax(-1)
    log_now = model(**inputs).logits.log_softmax(-1)
    rows = log_now.shape[0] * log_now.shape[1]
    return (log_ref.exp() * (log_ref - log_now)).sum() / rows


@pytest.mark.parametrize("name", ["graddiff", "npo"])
def test_kl_retain_loss_and_gradient_equal_open_unlearnings_formula(name):
    model, tokenizer = starting_model()
    reference = copy.deepcopy(model)
    method, forget, retain = make(name, model, tokenizer, retain_loss="kl", retain_weight=2.0)
    method.prepare()
    perturb(model)
    f, r = forget.batch([0, 1]), retain.batch([1, 0])
    assert bool(r["attention_mask"].all())  # no padding: the reference's formula applies as is
    loss, terms = method.loss(f, r)
    got = gradients(model, loss)

    if name == "graddiff":
        forget_term = -sequence_nll(model, f)
    else:
        logp, _ = sequence_logprob(model, f)
        ref = torch.tensor([method.reference[i] for i in (0, 1)])
        forget_term = npo_loss(logp, ref, method.cfg.beta)
    kl = open_unlearning_kl(model, reference, r)
    expected = forget_term + 2.0 * kl
    want = gradients(model, expected)
    assert terms["retain_kl"] == pytest.approx(kl.item(), rel=1e-5) and kl.item() > 1e-3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    method.close()


def test_kl_retain_is_zero_at_the_start_and_masks_padding():
    model, tokenizer = starting_model()
    method, forget, retain = make("graddiff", model, tokenizer, retain_loss="kl")
    method.prepare()
    with torch.no_grad():
        _, terms = method.loss(forget.batch([0]), retain.batch([2, 0]))
    assert abs(terms["retain_kl"]) < 1e-6  # the reference is the starting model
    reference = copy.deepcopy(model)
    perturb(model)
    r = retain.batch([2, 0])  # item 2 is shorter: padded
    with torch.no_grad():
        _, terms = method.loss(forget.batch([0]), r)
        alone = [open_unlearning_kl(model, reference, retain.batch([i])) for i in (2, 0)]
    lengths = r["attention_mask"].sum(1)
    by_token = sum(k * n for k, n in zip(alone, lengths, strict=True)) / lengths.sum()
    assert terms["retain_kl"] == pytest.approx(by_token.item(), rel=1e-5)


def test_retain_loss_is_refused_for_a_method_without_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were it accepted, the run would go there
    code = cli.main(["unlearn", "model=tiny-random", "unlearn=simnpo", "unlearn.retain_loss=kl"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "retain_loss" in err, err
    assert not list(tmp_path.iterdir())


def activation(model, batch, layer) -> torch.Tensor:
    """The residual stream after decoder layer `layer` (not the last: no final norm)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
    )
    return out.hidden_states[layer + 1]


def test_adaptive_rmu_loss_and_gradient_equal_the_authors_rule():
    model, tokenizer = starting_model()
    frozen = copy.deepcopy(model)
    method, forget, retain = make("adaptive_rmu", model, tokenizer, beta=3.0, alpha=7.0)
    method.prepare()
    first = forget.batch(batch_indices(len(forget), 2, 0, 0))
    with torch.no_grad():  # baselines/adap_rmu/unlearn.py: the first batch, before any update
        norms = activation(frozen, first, 1).norm(dim=-1).mean(dim=1)
    coefficient = 3.0 * norms.mean().item()
    assert method.coefficient == pytest.approx(coefficient, rel=1e-5)

    perturb(model)
    f, r = forget.batch([2, 3]), retain.batch([0, 1])
    loss, terms = method.loss(f, r)
    got = gradients(model, loss)
    control = steering_vector(model.config.hidden_size, 1.0, 0) * coefficient
    with torch.no_grad():
        original = activation(frozen, r, 1)
    expected = F.mse_loss(activation(model, f, 1), control.expand(2, f["input_ids"].shape[1], -1))
    expected = expected + 7.0 * F.mse_loss(activation(model, r, 1), original)
    want = gradients(model, expected)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.keys() == want.keys() and got
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_kl_retain_and_adaptive_rmu_run_end_to_end(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    fixed = [*TINY, "locate=fixed", "locate.layers=[1,2]"]
    kl = ["unlearn=graddiff", "unlearn.retain_loss=kl", "hydra.run.dir=kl"]
    kuda("unlearn", *kl, *fixed, check=True)
    kuda("unlearn", "unlearn=adaptive_rmu", *fixed, "hydra.run.dir=adaptive", check=True)
    for run in (tmp_path / "kl", tmp_path / "adaptive"):
        assert read_json(run / "meta.json")["status"] == "completed", run
        assert len((run / "train_log.jsonl").read_text().splitlines()) == 2, run
    assert '"retain_kl"' in (tmp_path / "kl" / "train_log.jsonl").read_text()
    diagnostics = read_json(tmp_path / "adaptive" / "metrics.json")["diagnostics"]
    assert diagnostics["steering_coefficient"] > 0


@pytest.mark.parametrize(
    ("method", "own_sites"), [("graddiff", 0), ("npo", 0), ("idkdpo", 0), ("undial", 1)]
)
def test_memory_plan_counts_the_kl_reference_only_under_retain_loss_kl(method, own_sites):
    from types import SimpleNamespace

    from kuda_cli.unlearn.methods import get_method, method_schemas

    def sites(**settings) -> int:
        cfg = method_schemas()[method](**settings)
        return get_method(method)(SimpleNamespace(cfg=cfg)).recorded_sites

    assert sites(retain_loss="kl", retain_weight=1.0) == own_sites + 1
    assert sites(retain_loss="nll", retain_weight=1.0) == own_sites
    assert sites(retain_loss="kl", retain_weight=0.0) == own_sites  # no retain batches


@pytest.mark.parametrize("name", ["ga", "npo", "idkdpo"])
def test_memory_plan_counts_the_sequences_the_forget_loss_runs_per_item(name):
    """`forget_reach(...).rows` (the plan's sequences per forget item) is what the loss's
    forwards run: IdkDPO scores each item's "I don't know" answer and its own answer."""
    model, tokenizer = starting_model()
    method, forget, _ = make(name, model, tokenizer)
    method.prepare()
    rows = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        method.loss(forget.batch([0, 2]), None)
    finally:
        hook.remove()
    assert sum(rows) == 2 * method.forget_reach(model.config.num_hidden_layers).rows


def test_memory_plan_keeps_idkdpos_activations_of_both_answers():
    from kuda_cli.unlearn import memory_plan

    model, _ = starting_model()
    work, adapter = memory_plan.Workload(batch=4, seq=64), get_adapter(model)

    def activations(name: str) -> float:
        cfg = method_schemas()[name](trainable=["all"], retain_weight=0.0)
        return memory_plan.plan(cfg, model, adapter, [1], work).phases["step"]["activations"]

    assert activations("idkdpo") == 2 * activations("graddiff")
