"""The baseline methods on the shared trainer: GA, GradDiff, NPO, SimNPO and RMU. Their losses
as functions (bounded or not), what one step does, references and originals computed once from
the starting weights (also on resume), and `kuda unlearn` end to end for each."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from kuda_cli import cli
from kuda_cli.compose import compose, group_options
from kuda_cli.config import TinySpec
from kuda_cli.errors import ConfigError
from kuda_cli.models.adapter import get_adapter
from kuda_cli.models.hooks import trace
from kuda_cli.models.tiny import tiny_random
from kuda_cli.unlearn.batches import tokenize, unlearn_texts
from kuda_cli.unlearn.methods import (
    MethodContext,
    get_method,
    method_modules,
    sequence_logprob,
    sequence_nll,
)
from kuda_cli.unlearn.methods.ga import GaMethod, ga_loss
from kuda_cli.unlearn.methods.graddiff import GradDiffMethod
from kuda_cli.unlearn.methods.npo import NpoMethod, npo_loss
from kuda_cli.unlearn.methods.rmu import (
    RmuMethod,
    masked_mse,
    site_output,
    steering_vector,
)
from kuda_cli.unlearn.methods.simnpo import SimNpoMethod, simnpo_loss
from kuda_cli.unlearn.trainer import Trainer, used_indices
from kuda_cli.validate import validate
from test_unlearn import FORGET, RETAIN

from conftest import read_json

BASELINES = ("ga", "graddiff", "npo", "simnpo", "rmu")
SCHEMAS = {
    "ga": GaMethod,
    "graddiff": GradDiffMethod,
    "npo": NpoMethod,
    "simnpo": SimNpoMethod,
    "rmu": RmuMethod,
}
SPEC = TinySpec(num_layers=3, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)


def starting_model():
    """The same tiny model every call (as the CLI reloads the starting model on resume)."""
    model, tokenizer = tiny_random(SPEC)
    return model.eval(), tokenizer


def make_method(name, model, tokenizer, *, layers=(1,), work_dir=None, **overrides):
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(SCHEMAS[name]),
            {"method": name, "batch_size": 2, "steps": 3, **overrides},
        )
    )
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    ctx = MethodContext(
        model,
        get_adapter(model),
        tokenizer,
        list(layers),
        cfg,
        forget,
        retain,
        list(range(len(forget))),
        list(range(len(retain))),
        work_dir=work_dir,
    )
    return get_method(name)(ctx), cfg, forget, retain


# ----------------------------------------------------------------------------- registry, configs
def test_registry_lists_every_method_and_each_config_composes():
    new = {"adaptive_rmu", "undial", "idkdpo", "task_vector", "whp", "elm"}
    assert set(method_modules()) == {"kuda", *new, *BASELINES}
    for name in method_modules():
        assert get_method(name).name == name
    for option in group_options("unlearn"):
        cfg = compose([f"unlearn={option}", "stage=unlearn"])
        validate(cfg)
        assert cfg.unlearn.method in method_modules(), option  # no YAML without a method
    for name in BASELINES:
        cfg = compose([f"unlearn={name}", "stage=unlearn"]).unlearn
        assert OmegaConf.get_type(cfg) is SCHEMAS[name]
        assert list(cfg.trainable) == (["down_proj"] if name == "rmu" else ["all"])


def test_unknown_method_option_exits_2_with_one_line(capsys):
    assert cli.main(["unlearn", "unlearn=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unlearn=nope is not an option" in err and "npo" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["unlearn=ga", "unlearn.trainable=[all,down_proj]"], "all already trains every"),
        (["unlearn=npo", "unlearn.trainable=[]"], "unlearn.trainable is empty"),
        (
            ["unlearn=rmu", "unlearn.layers=[1,2]", "unlearn.steer_layer=1"],
            "steer_layer=1 comes before layer 2",
        ),
        (
            ["unlearn=rmu", "locate=fixed", "locate.layers=[2,3]", "unlearn.steer_layer=2"],
            "layer 3",
        ),
    ],
)
def test_trainable_and_steer_layer_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["model=tiny-random", *overrides, "stage=unlearn"]))


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo", "simnpo"])
def test_all_parameters_by_default_or_the_layers_kinds_asked(name):
    model, tokenizer = starting_model()
    method, *_ = make_method(name, model, tokenizer, layers=[0, 2])
    assert set(method.trainable_parameters()) == set(dict(model.named_parameters()))
    method, *_ = make_method(name, model, tokenizer, layers=[0, 2], trainable=["down_proj"])
    assert set(method.trainable_parameters()) == {
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    }


def test_rmu_refuses_a_steer_layer_before_a_located_layer():
    model, tokenizer = starting_model()
    method, *_ = make_method("rmu", model, tokenizer, layers=[1, 2], steer_layer=1)
    with pytest.raises(Exception, match="steer_layer=1 comes before trained layer 2"):
        method.trainable_parameters()


# ----------------------------------------------------------------------------- GA, GradDiff
def test_ga_step_raises_the_forget_nll():
    model, tokenizer = starting_model()
    method, cfg, forget, retain = make_method("ga", model, tokenizer, lr=1e-3, steps=1)
    batch = forget.batch(list(range(len(forget))))
    with torch.no_grad():
        before = float(sequence_nll(model, batch))
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=None, progress=False).train()
    with torch.no_grad():
        after = float(sequence_nll(model, batch))
    assert after > before + 1e-3


def test_graddiff_loss_is_the_weighted_difference_of_nlls():
    model, tokenizer = starting_model()
    method, _, forget, retain = make_method(
        "graddiff", model, tokenizer, forget_weight=0.5, retain_weight=2.0
    )
    f, r = forget.batch([0, 1]), retain.batch([1, 2])
    with torch.no_grad():
        loss, terms = method.loss(f, r)
        expected = -0.5 * sequence_nll(model, f) + 2.0 * sequence_nll(model, r)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["retain_nll"] == pytest.approx(sequence_nll(model, r).item(), rel=1e-5)
    assert method.needs_retain


# ----------------------------------------------------------------------------- NPO, SimNPO
def test_npo_is_bounded_below_where_ga_is_not():
    logp = torch.tensor([-1.0, -10.0, -1e2, -1e3, -1e4, -1e6])
    ref = torch.full_like(logp, -5.0)
    lengths = torch.full_like(logp, 10)
    npo = torch.stack([npo_loss(lp[None], r[None], 0.1) for lp, r in zip(logp, ref, strict=True)])
    ga = torch.stack([ga_loss(lp[None], n[None]) for lp, n in zip(logp, lengths, strict=True)])
    assert torch.all(npo[1:4] < npo[:3]) and torch.all(npo[1:] <= npo[:-1])
    assert torch.all(npo >= 0)
    assert npo[-1].item() < 1e-6  # -> 0 as the forget log-probability -> -inf
    assert torch.all(ga[1:] < ga[:-1]) and ga[-1].item() == pytest.approx(-1e5)  # no bound
    for beta in (0.05, 0.1, 1.0):  # at theta = ref: (2/beta) log 2
        at_ref = npo_loss(torch.tensor([-7.0, -30.0]), torch.tensor([-7.0, -30.0]), beta)
        assert at_ref.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_simnpo_falls_with_the_forget_logprob_and_is_bounded():
    beta, gamma = 2.5, 0.5
    logp = -torch.logspace(-2, 5, 30)  # from near 0 down to -1e5
    lengths = torch.full_like(logp, 20)
    values = torch.stack(
        [simnpo_loss(lp[None], n[None], beta, gamma) for lp, n in zip(logp, lengths, strict=True)]
    )
    ceiling = -(2 / beta) * math.log(1 / (1 + math.exp(gamma)))  # logp = 0
    assert torch.all(values[1:20] < values[:19]) and torch.all(values[1:] <= values[:-1])
    assert torch.all(values >= 0) and torch.all(values <= ceiling + 1e-6)
    assert values[-1].item() < 1e-6
    # length-normalised: the same per-token log-probability gives the same loss
    short = simnpo_loss(torch.tensor([-20.0]), torch.tensor([10]), beta, gamma)
    long = simnpo_loss(torch.tensor([-40.0]), torch.tensor([20]), beta, gamma)
    assert short.item() == pytest.approx(long.item(), rel=1e-6)


def test_simnpo_step_lowers_the_forget_logprob():
    model, tokenizer = starting_model()
    method, cfg, forget, retain = make_method(
        "simnpo", model, tokenizer, lr=1e-3, steps=2, retain_weight=0.0
    )
    batch = forget.batch(list(range(len(forget))))
    with torch.no_grad():
        before = sequence_logprob(model, batch)[0].sum().item()
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=None, progress=False).train()
    with torch.no_grad():
        assert sequence_logprob(model, batch)[0].sum().item() < before - 1e-2


def _llama_count() -> int:
    gc.collect()
    return sum(type(o).__name__ == "LlamaForCausalLM" for o in gc.get_objects())


def test_npo_starts_at_2_over_beta_log_2_from_precomputed_references():
    model, tokenizer = starting_model()
    method, _, forget, _ = make_method("npo", model, tokenizer, beta=0.1)
    models = _llama_count()
    method.prepare()
    assert _llama_count() == models  # no second copy of the model
    assert not [v for v in vars(method).values() if isinstance(v, torch.nn.Module)]
    assert sorted(method.reference) == list(range(len(forget)))
    with torch.no_grad():
        for i in range(len(forget)):
            alone = sequence_logprob(model, forget.batch([i]))[0].item()
            assert method.reference[i] == pytest.approx(alone, abs=1e-4)
        loss, terms = method.loss(forget.batch([3, 0]), None)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)
    assert abs(terms["forget_logratio"]) < 1e-4


def test_npo_references_come_from_the_starting_weights_also_on_resume(tmp_path):
    model, tokenizer = starting_model()
    method, cfg, forget, retain = make_method("npo", model, tokenizer, lr=1e-2, steps=3)
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=tmp_path, progress=False).train()
    with torch.no_grad():
        trained = sequence_logprob(model, forget.batch([0]))[0].item()
    assert abs(trained - method.reference[0]) > 1e-2  # training moved it: the test can tell

    # what the CLI does on resume: load the starting model again, then the checkpoint
    again, _ = starting_model()
    resumed, cfg2, forget2, retain2 = make_method("npo", again, tokenizer, lr=1e-2, steps=3)
    trainer = Trainer(again, tokenizer, resumed, cfg2, forget2, retain2, out_dir=tmp_path)
    assert trainer.train().resumed_from == 3
    for name, param in again.named_parameters():  # the checkpoint's weights are in place...
        torch.testing.assert_close(param, dict(model.named_parameters())[name])
    assert resumed.reference == pytest.approx(method.reference, abs=1e-6)  # ...not in the refs


# ----------------------------------------------------------------------------- RMU
def test_steering_vector_is_a_seeded_positive_direction_of_norm_c():
    v = steering_vector(64, 6.5, seed=0)
    assert v.norm().item() == pytest.approx(6.5, rel=1e-6) and torch.all(v >= 0)
    assert torch.equal(v, steering_vector(64, 6.5, seed=0))
    assert not torch.equal(v, steering_vector(64, 6.5, seed=1))


def test_rmu_retain_mse_starts_at_zero_from_stored_originals(tmp_path):
    model, tokenizer = starting_model()
    for store in ("memory", "disk"):
        method, _, forget, retain = make_method(
            "rmu", model, tokenizer, c=1.0, alpha=10.0, originals=store, work_dir=tmp_path
        )
        method.prepare()
        assert (tmp_path / "originals").exists() == (store == "disk")
        with torch.no_grad():
            loss, terms = method.loss(forget.batch([0, 1]), retain.batch([2, 0]))
        assert terms["retain_mse"] < 1e-10
        assert terms["forget_mse"] > 0.01 and loss.item() == pytest.approx(terms["forget_mse"])
        method.close()


def test_rmu_forward_stops_after_the_steer_layer():
    model, tokenizer = starting_model()
    method, _, forget, _ = make_method("rmu", model, tokenizer, layers=[0, 1])
    method.prepare()
    assert method.site == "model.layers.1"  # null steer_layer: the last trained layer
    ran = []
    handles = [
        model.get_submodule(n).register_forward_hook(lambda *a, n=n: ran.append(n))
        for n in ("model.layers.1", "model.layers.2", "lm_head")
    ]
    method.loss(forget.batch([0]), None)
    for h in handles:
        h.remove()
    assert ran == ["model.layers.1"]


def test_rmu_padding_gets_no_gradient():
    model, tokenizer = starting_model()
    method, _, forget, _ = make_method("rmu", model, tokenizer, c=1.0)
    method.prepare()
    batch = forget.batch([2, 3])  # different lengths: the first row is padded
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    grabbed = {}

    def keep(output):
        output.retain_grad()
        grabbed["out"] = output
        return output

    with trace(model, [], edit={method.site: keep}):
        loss, _ = method.loss(batch, None)
    loss.backward()
    grad = grabbed["out"].grad
    assert grad[mask == 0].abs().max().item() == 0.0
    assert grad[mask == 1].abs().max().item() > 0.0
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(mask == 0, 7))
    with torch.no_grad():
        assert method.loss(other, None)[0].item() == pytest.approx(loss.item(), abs=1e-6)


def test_rmu_moves_forget_activations_towards_c_u_and_trains_only_down_proj():
    model, tokenizer = starting_model()
    method, cfg, forget, retain = make_method(
        "rmu", model, tokenizer, layers=[0, 1], c=2.0, alpha=1.0, lr=5e-2, steps=6
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.prepare()
    batch = forget.batch(list(range(len(forget))))

    def forget_mse() -> float:
        with torch.no_grad():
            h = method.activations(batch)
            return masked_mse(h, method.control, batch["attention_mask"]).item()

    before = forget_mse()
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=None, progress=False).train()
    assert forget_mse() < 0.8 * before
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


# ----------------------------------------------------------------------------- end to end
TINY = [
    "model=tiny-random",
    "eval=none",
    "unlearn.steps=2",
    "unlearn.batch_size=2",
    "unlearn.max_length=64",
]
TERMS = {
    "ga": "forget_nll",
    "graddiff": "retain_nll",
    "npo": "npo",
    "simnpo": "simnpo",
    "rmu": "retain_mse",
}


# How far each run must move its forget objective (below) in 2 steps. Measured: the forget NLL
# rises 3e-4 (GradDiff, down_proj only) to 0.1 nats (NPO, all weights), RMU's forget MSE to c*u
# falls 0.13-0.19; float32 noise on these is ~1e-6. A run whose update does nothing (lr 0) moves
# neither at all, one with its sign flipped moves it the other way.
MOVED = {"ga": 1e-4, "graddiff": 1e-4, "npo": 1e-4, "rmu": 1e-2}


def _forget_objective(run, name, overrides, trained_layers) -> tuple[float, float]:
    """What the method drives on the forget texts it trained on, at the starting weights and at
    the run's final checkpoint, signed so that unlearning raises it: the forget NLL (GA,
    GradDiff, NPO) or minus RMU's forget MSE to c*u at its steer layer."""
    cfg = compose(["stage=unlearn", f"unlearn={name}", *overrides])
    start, tokenizer = tiny_random(OmegaConf.to_object(cfg.model.tiny))  # the same seed
    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    ucfg = cfg.unlearn
    forget = tokenize(
        tokenizer, unlearn_texts(OmegaConf.to_object(cfg.data)).forget, ucfg.max_length, "forget"
    )
    micro_steps = ucfg.steps * ucfg.grad_accum
    batch = forget.batch(used_indices(len(forget), ucfg.batch_size, micro_steps, cfg.seed))

    def measure(model) -> float:
        with torch.no_grad():
            if name != "rmu":
                return sequence_nll(model.eval(), batch).item()
            site = f"model.layers.{max(trained_layers)}"  # steer_layer null: the last trained
            control = steering_vector(model.config.hidden_size, ucfg.c, cfg.seed)
            h = site_output(model.eval(), site, batch)
            return -masked_mse(h, control, batch["attention_mask"]).item()

    return measure(start), measure(trained)


def _check_sweep(sweep, overrides, expected_params):
    for num, name in enumerate(BASELINES):
        run = sweep / str(num)
        meta, metrics = read_json(run / "meta.json"), read_json(run / "metrics.json")
        assert meta["status"] == "completed", (name, meta)
        assert metrics["train"]["method"] == name
        assert metrics["train"]["trainable_parameters"] == expected_params(name, metrics)
        krd = metrics["diagnostics"]["krd"]  # the same held-out measure as KUDA's, for the table
        assert {f"l{layer}" for layer in metrics["locate"]["layers"]} < set(krd), (name, krd)
        assert krd["mean"] > 0, (name, krd)
        assert read_json(run / "checkpoint" / "trainer_state.json")["step"] == 2
        assert (run / "checkpoint" / "model.safetensors").exists()
        rows = (run / "train_log.jsonl").read_text().splitlines()
        assert len(rows) == 2 and f'"{TERMS[name]}"' in rows[-1], (name, rows[-1])
        # SimNPO's forget term is saturated on a random model (its per-token log-probability,
        # about log(1/259), times beta is far past the sigmoid's knee: the term's gradient is
        # ~1e-6 of the retain NLL's), so its run trains on the retain texts alone here;
        # test_simnpo_step_lowers_the_forget_logprob checks its direction
        if name in MOVED:
            before, after = _forget_objective(run, name, overrides, metrics["train"]["layers"])
            assert after - before > MOVED[name], (name, before, after)


def test_each_baseline_unlearns_end_to_end_with_fixed_layers(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    overrides = [*TINY, "locate=fixed", "locate.layers=[1,2]"]
    sweep = f"unlearn={','.join(BASELINES)}"
    kuda("unlearn", "-m", sweep, *overrides, "hydra.sweep.dir=sweep", check=True)
    model, _ = tiny_random(TinySpec())  # conf/model/tiny-random.yaml's sizes
    everything = sum(p.numel() for p in model.parameters())
    down_proj = 64 * 128

    def expected(name, metrics):
        return 2 * down_proj if name == "rmu" else everything

    _check_sweep(tmp_path / "sweep", overrides, expected)


def test_each_baseline_unlearns_the_traced_layers(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    overrides = [
        *TINY,
        "unlearn.trainable=[down_proj]",
        "locate.max_probes=2",
        "locate.samples=2",
        "locate.plot_probes=0",
    ]
    sweep = f"unlearn={','.join(BASELINES)}"
    kuda("unlearn", "-m", sweep, *overrides, "hydra.sweep.dir=sweep", check=True)

    def expected(name, metrics):
        assert metrics["train"]["layers"] == metrics["locate"]["layers"]
        return len(metrics["locate"]["layers"]) * 64 * 128

    _check_sweep(tmp_path / "sweep", overrides, expected)
