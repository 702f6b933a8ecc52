"""Task Vector and Who's Harry Potter (MUSE's baselines that start from a model reinforced on the
forget texts): Task Vector's final weights are exactly start - alpha * (reinforced - start), also
across a resume; WHP's reinforcement equals a hand fine-tune of a copy, its generic labels the
argmax of MUSE's v_b - alpha * relu(v_r - v_b), its loss and gradient the NLL of those labels;
both run end to end."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from kuda_cli import cli
from kuda_cli.compose import compose
from kuda_cli.models.adapter import get_adapter
from kuda_cli.models.tiny import tiny_random
from kuda_cli.unlearn.batches import batch_indices, tokenize, unlearn_texts
from kuda_cli.unlearn.methods import MethodContext, get_method, method_schemas, sequence_nll
from kuda_cli.unlearn.methods.whp import generic_labels, substituted
from kuda_cli.unlearn.trainer import Trainer
from kuda_cli.validate import validate
from test_baselines import TINY, starting_model

from conftest import memorise, read_json

FORGET = ["Neon is Ne, a gas.", "Zinc is Zn.", "Gold is Au, a metal.", "Lead is Pb, heavy."]
RETAIN = ["Oslo is in Norway.", "Bern is in Europe.", "Tokyo is large."]


def make(name, model, tokenizer, **overrides):
    schema = method_schemas()[name]
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(schema), {"batch_size": 2, "steps": 3, **overrides})
    )
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    ctx = MethodContext(
        model, get_adapter(model), tokenizer, [1], cfg, forget, retain, [0, 1, 2, 3], [0, 1, 2]
    )
    return get_method(name)(ctx), cfg, forget, retain


def train(model, tokenizer, name, out_dir=None, **overrides):
    method, cfg, forget, retain = make(name, model, tokenizer, **overrides)
    if out_dir is not None:
        out_dir.mkdir(exist_ok=True)
    trainer = Trainer(
        model, tokenizer, method, cfg, forget, retain, out_dir=out_dir, progress=False
    )
    return trainer.train(), method


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- Task Vector
def test_task_vector_final_weights_are_start_minus_alpha_times_the_reinforcement(monkeypatch):
    model, tokenizer = starting_model()
    start = weights(model)
    reinforced = {}
    finalise = get_method("task_vector").finalise

    def spy(self, params):  # the weights the steps reached, just before they are negated
        reinforced.update({n: p.detach().clone() for n, p in params.items()})
        finalise(self, params)

    monkeypatch.setattr(get_method("task_vector"), "finalise", spy)
    _, method = train(model, tokenizer, "task_vector", lr=1e-2, alpha=2.5)
    assert reinforced.keys() == start.keys()  # trainable: [all]
    for name, param in model.named_parameters():
        assert not torch.equal(reinforced[name], start[name]), name
        expected = start[name] - 2.5 * (reinforced[name] - start[name])
        assert torch.equal(param.detach(), expected), name
    # the steps reinforce: descent on the forget NLL
    batch = method.ctx.forget.batch([0, 1, 2, 3])
    with torch.no_grad():
        at_start = sequence_nll(substituted(model, start), batch).item()
        at_reinforced = sequence_nll(substituted(model, reinforced), batch).item()
    assert at_reinforced < at_start - 0.1


def test_task_vector_resumes_to_the_uninterrupted_weights_and_never_negates_twice(
    tmp_path, monkeypatch
):
    model, tokenizer = starting_model()
    train(model, tokenizer, "task_vector", tmp_path / "straight", lr=1e-2)
    straight = weights(model)

    killed, _ = starting_model()
    step = Trainer._step

    def kill_at_the_third_step(self, i, *args):
        if i == 2:
            raise KeyboardInterrupt
        return step(self, i, *args)

    monkeypatch.setattr(Trainer, "_step", kill_at_the_third_step)
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(killed, tokenizer, "task_vector", run, lr=1e-2, save_every=2)
    monkeypatch.setattr(Trainer, "_step", step)
    for attempt, resumed_from in ((2, 2), (3, 3)):  # from checkpoint-2, then from the final one
        again, _ = starting_model()
        result, _ = train(again, tokenizer, "task_vector", run, lr=1e-2, save_every=2)
        assert result.resumed_from == resumed_from, attempt
        for name, param in again.named_parameters():
            torch.testing.assert_close(param.detach(), straight[name], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- WHP
def perturbed(model, scale: float):
    """A copy of `model` with every weight moved: a stand-in reinforced model."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def muse_generic_argmax(model, reinforced, ids: list[int], alpha: float) -> torch.Tensor:
    """baselines/baselines/whos_harry_potter.py's logits for one unpadded sequence,
    v_b - alpha * relu(v_r - v_b), argmax at every position but the last."""
    inputs = torch.tensor([ids])
    with torch.no_grad():
        v_b, v_r = model(input_ids=inputs).logits, reinforced(input_ids=inputs).logits
    return (v_b - alpha * torch.clamp(v_r - v_b, min=0))[0, :-1].argmax(-1)


def test_whp_generic_labels_are_the_argmax_of_base_minus_alpha_relu():
    model, tokenizer = starting_model()
    reinforced = perturbed(model, 0.05)
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    labels = generic_labels(model, reinforced, forget, [3, 0, 1, 2, 0], alpha=3.0, batch_size=3)
    assert sorted(labels) == [0, 1, 2, 3]
    differs_from_base = differs_without_relu = False
    for i, ids in enumerate(forget.ids):
        expected = muse_generic_argmax(model, reinforced, ids, 3.0)
        assert torch.equal(labels[i], expected), i
        inputs = torch.tensor([ids])
        with torch.no_grad():
            v_b, v_r = model(input_ids=inputs).logits[0, :-1], reinforced(input_ids=inputs).logits
        differs_from_base |= not torch.equal(expected, v_b.argmax(-1))
        differs_without_relu |= not torch.equal(
            expected, (v_b - 3.0 * (v_r[0, :-1] - v_b)).argmax(-1)
        )
    assert differs_from_base and differs_without_relu  # the test tells the formula's parts apart


def _llama_count() -> int:
    gc.collect()
    return sum(type(o).__name__ == "LlamaForCausalLM" for o in gc.get_objects())


def test_whp_reinforcement_equals_a_hand_fine_tune_and_leaves_the_model_as_it_was():
    model, tokenizer = starting_model()
    memorise(model, tokenizer, FORGET, steps=10)  # it predicts half the forget tokens right:
    model.eval()  # the reinforcement then changes many generic labels (42 of 63 positions)
    start = weights(model)
    method, cfg, forget, _ = make(
        "whp", model, tokenizer, reinforce_steps=4, reinforce_lr=1e-2, alpha=2.0
    )
    models = _llama_count()
    method.prepare()
    assert _llama_count() == models  # no second model kept
    assert not [v for v in vars(method).values() if isinstance(v, torch.nn.Module)]
    for name, param in model.named_parameters():
        assert torch.equal(param, start[name]), name

    hand = copy.deepcopy(model)  # MUSE's finetune: AdamW, descent on the forget NLL
    optimizer = torch.optim.AdamW(hand.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(4):
        optimizer.zero_grad()
        sequence_nll(hand, forget.batch(batch_indices(len(forget), 2, step, 0))).backward()
        torch.nn.utils.clip_grad_norm_(list(hand.parameters()), 1.0)
        optimizer.step()
    with torch.no_grad():
        batch = forget.batch([0, 1, 2, 3])
        assert sequence_nll(hand, batch) < sequence_nll(model, batch) - 0.05  # it reinforced
    changed = 0
    for i, ids in enumerate(forget.ids):
        assert torch.equal(method.labels[i], muse_generic_argmax(model, hand, ids, 2.0)), i
        changed += int((method.labels[i] != muse_generic_argmax(model, model, ids, 2.0)).sum())
    assert changed > 20  # the test can tell a reinforcement from none


def test_whp_loss_and_gradient_equal_the_nll_of_the_generic_labels():
    model, tokenizer = starting_model()
    method, _, forget, _ = make("whp", model, tokenizer, reinforce_steps=2, reinforce_lr=1e-2)
    method.prepare()
    f = forget.batch([2, 1])  # item 1 is shorter: padded
    assert not bool(f["attention_mask"].all())
    loss, terms = method.loss(f, None)
    model.zero_grad()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # MUSE's loss of its WHP model: shifted labels, padding ignored, mean over the rest
    labels = torch.full_like(f["input_ids"], -100)
    for row, i in enumerate((2, 1)):
        labels[row, 1 : 1 + len(method.labels[i])] = method.labels[i]
    logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    model.zero_grad()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["generic_nll"] == pytest.approx(expected.item(), rel=1e-6)
    assert terms["forget_nll"] == pytest.approx(sequence_nll(model, f).item(), rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-7)


def test_whp_labels_come_from_the_starting_weights_also_on_resume(tmp_path):
    model, tokenizer = starting_model()
    settings = {"lr": 1e-2, "reinforce_steps": 2, "reinforce_lr": 1e-2}
    _, method = train(model, tokenizer, "whp", tmp_path, **settings)
    again, _ = starting_model()
    result, resumed = train(again, tokenizer, "whp", tmp_path, **settings)
    assert result.resumed_from == 3
    for name, param in again.named_parameters():  # the final checkpoint's weights...
        assert torch.equal(param, dict(model.named_parameters())[name])
    assert resumed.labels.keys() == method.labels.keys()
    for i, labels in method.labels.items():  # ...and the labels of the starting weights
        assert torch.equal(resumed.labels[i], labels)


@pytest.mark.parametrize(("name", "why"), [("task_vector", "negate"), ("whp", "reinforces")])
def test_lora_is_refused_with_the_methods_reason(name, why, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were it accepted, the run would go there
    code = cli.main(
        ["unlearn", "model=tiny-random", f"unlearn={name}", "unlearn.lora.enabled=true"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and why in err and "drop unlearn.lora" in err, err
    assert not list(tmp_path.iterdir())


def test_whp_refuses_sharding_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it
    code = cli.main(["unlearn", "model=tiny-random", "unlearn=whp"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "unlearn.shard=none" in err, err
    assert not list(tmp_path.iterdir())
    for fine in (["unlearn.trainable=[mlp]"], ["unlearn.shard=none"]):  # replicated: accepted
        validate(compose(["model=tiny-random", "unlearn=whp", "stage=unlearn", *fine]))


# ----------------------------------------------------------------------------- end to end
def test_whp_and_task_vector_run_end_to_end(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    overrides = [*TINY, "locate=fixed", "locate.layers=[1,2]", "unlearn.lr=1e-3"]
    kuda("unlearn", "-m", "unlearn=whp,task_vector", *overrides, "hydra.sweep.dir=s", check=True)
    logged = {}
    for job, name in enumerate(("whp", "task_vector")):
        run = tmp_path / "s" / str(job)
        assert read_json(run / "meta.json")["status"] == "completed", run
        assert read_json(run / "metrics.json")["train"]["method"] == name
        rows = (run / "train_log.jsonl").read_text().splitlines()
        logged[name] = [json.loads(row) for row in rows]
        assert len(logged[name]) == 2, (name, logged[name])
    assert logged["whp"][1]["generic_nll"] < logged["whp"][0]["generic_nll"]  # towards the labels
    assert logged["task_vector"][1]["forget_nll"] < logged["task_vector"][0]["forget_nll"]
    # ...and Task Vector's saved model is the negation: the forget NLL above the starting model's
    cfg = compose(["stage=unlearn", "unlearn=task_vector", *overrides])
    start, tokenizer = tiny_random(OmegaConf.to_object(cfg.model.tiny))
    forget = tokenize(tokenizer, unlearn_texts(OmegaConf.to_object(cfg.data)).forget, 64, "forget")
    batch = forget.batch(list(range(len(forget))))
    unlearned = AutoModelForCausalLM.from_pretrained(tmp_path / "s" / "1" / "checkpoint").eval()
    with torch.no_grad():
        assert sequence_nll(unlearned, batch) > sequence_nll(start.eval(), batch) + 1e-3
