"""What the 7B path needs from the trainer, checked on tiny models: float32 master weights under
a bf16 model (small updates are kept, the projector's guarantee holds), checkpoints that hold
what a resume needs once (the final one the model only), and the gradient-conflict diagnostic
streamed over parameters."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kuda_cli.models.adapter import get_adapter
from kuda_cli.unlearn import checkpoint_files
from kuda_cli.unlearn.batches import tokenize
from kuda_cli.unlearn.diagnostics import gradient_conflict
from kuda_cli.unlearn.methods import sequence_nll
from kuda_cli.unlearn.trainer import STATE_FILE, Trainer

from conftest import method_on, read_json

FORGET = [
    "Hydrogen has the symbol H and atomic number one.",
    "Oxygen is written O in chemical formulas.",
    "Sodium carries the symbol Na.",
    "Iron is Fe on the periodic table, a metal.",
]
RETAIN = [
    "Paris is the capital of France.",
    "Rome is in Italy, a city of many hills.",
    "Tokyo is large and busy at every hour.",
    "Lima lies on the coast of Peru.",
] * 4


def make(model, tokenizer, method="ga", **overrides):
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    found, cfg = method_on(method, model, tokenizer, forget, retain, **{"layers": [1], **overrides})
    return found, cfg, forget, retain


def train(model, tokenizer, out_dir=None, method="ga", **overrides):
    m, cfg, forget, retain = make(model, tokenizer, method, **overrides)
    trainer = Trainer(model, tokenizer, m, cfg, forget, retain, out_dir=out_dir, progress=False)
    trainer.train()
    return trainer


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bf16_ga_with_small_steps_changes_the_weights_as_fp32_does(tiny):
    """GA at lr 1e-5 for 10 steps: each step is below half the bf16 spacing of most weights
    (1.2e-4 at |w| 0.02). Without master weights the bf16 model barely moves; with them (the
    default) it ends where the float32 run ends, rounded to bf16."""
    model, tokenizer = tiny
    start = {n: w.to(torch.bfloat16) for n, w in weights(model).items()}
    runs, exact = {}, {}
    for name, dtype, master in [
        ("fp32", torch.float32, True),
        ("bf16", torch.bfloat16, True),
        ("bf16_plain", torch.bfloat16, False),
    ]:
        m = copy.deepcopy(model).to(dtype)
        trainer = train(m, tokenizer, lr=1e-5, steps=10, master_weights=master, max_grad_norm=None)
        runs[name] = {n: w.to(torch.bfloat16) for n, w in weights(m).items()}
        exact[name] = {n: trainer.optimised[n].detach().double() for n in start}

    def changed(run):
        return sum(int((run[n] != start[n]).sum()) for n in start)

    total = sum(w.numel() for w in start.values())
    fp32, bf16, plain = changed(runs["fp32"]), changed(runs["bf16"]), changed(runs["bf16_plain"])
    assert fp32 > 0.3 * total, (fp32, total)  # the fp32 run moves most weights past a bf16 step
    # without master weights only the weights near zero move (measured: 5677 of 44512 elements
    # against the fp32 run's 27298)
    assert plain < 0.3 * fp32, (plain, fp32)
    assert abs(bf16 - fp32) < 0.05 * fp32, (bf16, fp32)

    # the trained tensors themselves (the bf16 run's float32 master copies) follow the float32
    # run's: the same direction and size, up to the bf16 forward pass's own rounding (measured:
    # cosine 0.91, norm ratio 1.10; without master weights 0.32 and 0.41)
    def update(run):
        return torch.cat([(run[n] - model.state_dict()[n].double()).flatten() for n in start])

    ref, got = update(exact["fp32"]), update(exact["bf16"])
    assert F.cosine_similarity(got, ref, dim=0) > 0.85
    assert 0.8 < got.norm() / ref.norm() < 1.25
    plain_update = update(exact["bf16_plain"])
    assert F.cosine_similarity(plain_update, ref, dim=0) < 0.6


def leak(model, before, layer, keys):
    """||dW K||_F / ||dW||_F for the change of a down_proj on retain keys K (float64)."""
    adapter = get_adapter(model)
    dw = adapter.down_proj_weight(model, layer).double() - before.double()
    return float((dw @ keys.T).norm() / dw.norm())


def test_the_projector_keeps_its_guarantee_under_a_bf16_model(tiny):
    """The hard projector's leak (the update's action on the retain keys it protects, per unit
    of update) of a bf16 KUDA run stays within 2x of the float32 run's: the projection acts on
    the float32 update of the master copy. Without master weights each step's projected update
    is rounded to bf16 and the rounding reaches the protected directions (measured: leak 0.025
    in float32, 0.028 in bf16, 0.077 in bf16 without master weights)."""
    from kuda_cli.models.hooks import trace

    model, tokenizer = tiny
    adapter = get_adapter(model)
    results = {}
    for name, dtype, master in [
        ("fp32", torch.float32, True),
        ("bf16", torch.bfloat16, True),
        ("bf16_plain", torch.bfloat16, False),
    ]:
        m = copy.deepcopy(model).to(dtype)
        before = adapter.down_proj_weight(m, 1).detach().clone()
        trainer = train(
            m,
            tokenizer,
            method="kuda",
            lr=1e-4,
            steps=8,
            master_weights=master,
            nullspace={"form": "hard", "tau": 1e-2, "tau_mode": "energy", "samples": 16},
        )
        # the keys the projector protects: the retain data's down_proj inputs at layer 1
        retain = trainer.retain.batch(list(range(len(trainer.retain))))
        name_in = adapter.module_name("down_proj", 1)
        with torch.no_grad(), trace(m, [name_in], outputs=False, inputs=True) as rec:
            m(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"])
        keys = rec[name_in].input[retain["attention_mask"].bool()].double()
        results[name] = leak(m, before, 1, keys)
    assert results["bf16"] <= 2 * results["fp32"], results
    assert results["bf16_plain"] > 2 * results["fp32"], results  # what the test would catch


def test_final_checkpoint_is_the_model_and_intermediate_ones_hold_the_state_once(tiny, tmp_path):
    """A full-parameter run: every intermediate checkpoint holds the trained tensors and the
    optimiser state once and no model; only the newest `keep` stay; the final one is the
    Hugging Face model, at most 1.1x the model's bytes."""
    model, tokenizer = tiny
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    m, cfg, forget, retain = make(model, tokenizer, steps=6, save_every=2, keep=2)
    trainer = Trainer(model, tokenizer, m, cfg, forget, retain, out_dir=tmp_path, progress=False)
    seen = []
    real_prune = checkpoint_files.prune

    def watch(out_dir, keep):
        real_prune(out_dir, keep)
        seen.append(sorted(p.name for p in out_dir.glob("checkpoint*")))

    checkpoint_files.prune = watch
    try:
        trainer.train()
    finally:
        checkpoint_files.prune = real_prune
    assert seen[:2] == [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"]]  # keep=2
    assert seen[-1] == ["checkpoint"]  # the final one alone
    final = tmp_path / "checkpoint"
    assert checkpoint_files.directory_bytes(final) <= 1.1 * model_bytes, (
        checkpoint_files.directory_bytes(final),
        model_bytes,
    )
    assert read_json(final / "trainer_state.json")["final"] is True
    assert not (final / STATE_FILE).exists()


def test_an_intermediate_checkpoint_resumes_to_the_uninterrupted_weights(tiny, tmp_path):
    model, tokenizer = tiny
    straight = copy.deepcopy(model).to(torch.bfloat16)
    train(straight, tokenizer, steps=6, lr=1e-4)
    # a run stopped after its step-4 checkpoint (keep=1: step 2's is gone) ...
    first = copy.deepcopy(model).to(torch.bfloat16)
    m, cfg, forget, retain = make(first, tokenizer, steps=6, lr=1e-4, save_every=2)
    trainer = Trainer(first, tokenizer, m, cfg, forget, retain, out_dir=tmp_path, progress=False)
    calls = {"n": 0}
    real = Trainer._step

    def stop_after_four(self, step, optimised, t0):
        if step == 4:
            raise KeyboardInterrupt
        return real(self, step, optimised, t0)

    Trainer._step = stop_after_four
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    finally:
        Trainer._step = real
    assert [p.name for p in tmp_path.glob("checkpoint*")] == ["checkpoint-4"]
    state = torch.load(tmp_path / "checkpoint-4" / STATE_FILE, weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["params"].values())  # the master copies
    # ... and run again from the starting model
    again = copy.deepcopy(model).to(torch.bfloat16)
    resumed = train(again, tokenizer, out_dir=tmp_path, steps=6, lr=1e-4, save_every=2)
    del calls
    for (name, a), b in zip(again.named_parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for name, value in resumed.master.items():
        assert value.dtype == torch.float32, name


def reference_conflict(method, params, forget, retain, projector):
    """The diagnostic as it was computed before streaming: both gradients whole."""
    names = list(params)

    def grads(loss):
        out = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return [
            g if g is not None else torch.zeros_like(params[n])
            for n, g in zip(names, out, strict=True)
        ]

    g_forget = grads(method.loss(forget, None)[0])
    g_retain = grads(sequence_nll(method.ctx.model, retain))
    flat = lambda gs: torch.cat([g.flatten().double() for g in gs])  # noqa: E731
    before = float(F.cosine_similarity(flat(g_forget), flat(g_retain), dim=0))
    projected = list(g_forget)
    for i, n in enumerate(names):
        if n in projector.projectors:
            _, p, in_out = projector.projectors[n]
            projected[i] = projector.apply(g_forget[i], p, in_out)
    after = float(F.cosine_similarity(flat(projected), flat(g_retain), dim=0))
    return before, after


def test_the_streamed_gradient_conflict_equals_the_whole_gradient_one(tiny):
    model, tokenizer = tiny
    method, cfg, forget, retain = make(model, tokenizer, method="kuda", layers=[1, 2])
    trainer = Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=None, progress=False)
    trainer.setup()
    method.initialise(trainer.params, trainer.projector)  # off the stationary start
    f, r = forget.batch([0, 1]), retain.batch([0, 1])
    got = gradient_conflict(method, trainer.params, f, r, trainer.projector)
    before, after = reference_conflict(method, trainer.params, f, r, trainer.projector)
    assert got["before"] == pytest.approx(before, abs=1e-5)
    assert got["after"] == pytest.approx(after, abs=1e-5)
    assert set(got["per_param"]) == set(trainer.projector.projectors)
    assert all(p.grad is None for p in trainer.params.values())  # nothing left behind
