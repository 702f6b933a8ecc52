"""The robustness attacks (evaluate/attacks/): each changes what is scored (a no-op fails its
test), gives the evaluated model back as it was, and scores with the run's own metrics."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.data.fact_set import load_facts, probes, split_facts
from kuda_cli.evaluate import EvalContext, get_metric
from kuda_cli.evaluate.attack_facts import _accuracy, _rows, halves
from kuda_cli.evaluate.attacks import AttackContext, get_attack
from kuda_cli.evaluate.attacks.fewshot import demonstrated
from kuda_cli.evaluate.attacks.logit_lens import lens_correct, lens_inputs
from kuda_cli.evaluate.attacks.relearn_general import unrelated
from kuda_cli.evaluate.floors import forget_removed
from kuda_cli.evaluate.quantization import linear_weights, quantize_in_place, rtn
from kuda_cli.unlearn.diagnostics import swapped_in

from conftest import read_json

FAST = [
    "stage=eval",
    "model=tiny-random",
    "eval.facts.all_prompts=false",
    "eval.facts.gen_max_new_tokens=2",
    "eval.facts.fluency_max_new_tokens=2",
    "data.retain_domains=[capitals]",
    "eval.perplexity.max_texts=2",
    "eval.perplexity.max_length=32",
]


def attack_context(loaded, out_dir, name, *overrides, judge=None, before_dir=None):
    cfg = compose([*FAST, *overrides])
    ctx = EvalContext(
        loaded=loaded,
        eval=OmegaConf.to_object(cfg.eval),
        data=OmegaConf.to_object(cfg.data),
        out_dir=out_dir,
        judge=judge,
    )
    return AttackContext(ctx, getattr(ctx.eval.attack, name), before_dir, seed=0)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_relearn_at_zero_steps_is_the_unattacked_figure_on_the_held_half_and_floor(
    loaded, tmp_path
):
    actx = attack_context(loaded, tmp_path, "relearn", "eval.metrics=[facts]")
    unattacked = get_metric("facts").compute(actx.ctx)  # writes facts_answers.jsonl
    (tmp_path / "metrics.json").write_text(json.dumps(unattacked))
    actx = attack_context(
        loaded,
        tmp_path,
        "relearn",
        "eval.metrics=[facts]",
        "eval.attack.relearn.steps=[0]",
        before_dir=tmp_path,
    )
    found = get_attack("relearn").run(actx)
    held = set(found["split"]["scored"])
    assert held and not held & set(found["split"]["relearned"])
    forget = found["steps_0"]["facts"]["forget"]
    assert (forget["mc_acc"], forget["gen_acc"]) == _accuracy(_rows(tmp_path), held)
    assert forget["n_facts"] == len(held)
    removed = found["steps_0"]["forget_removed"]
    assert removed["attacked"] == removed["unattacked"]
    assert removed["above_attacked_floor"] == removed["attacked"]  # the floor is the starting one
    floor, unattacked_floor = found["steps_0"]["facts"]["floor"], unattacked["facts"]["floor"]
    assert (floor["mc_acc"], floor["n_facts"]) == (
        unattacked_floor["mc_acc"],
        unattacked_floor["n_facts"],
    )


def test_relearn_trains_the_model_then_gives_it_back(loaded, tmp_path):
    saved = state(loaded.model)
    actx = attack_context(
        loaded,
        tmp_path,
        "relearn",
        "eval.metrics=[perplexity]",
        "eval.attack.relearn.steps=[0,6]",
        "eval.attack.relearn.lr=1e-3",
    )
    found = get_attack("relearn").run(actx)
    before, after = found["steps_0"]["perplexity"], found["steps_6"]["perplexity"]
    assert after["perplexity"] != before["perplexity"]
    assert found["steps_6"]["loss"] is not None and found["steps_0"]["loss"] is None
    assert same_state(loaded.model, saved)


def test_lora_relearning_trains_adapters_only_then_removes_them(loaded, tmp_path, monkeypatch):
    trained = []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            params = list(params)
            trained.append(len(params))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    saved = state(loaded.model)
    modules = [type(m) for m in loaded.model.modules()]
    actx = attack_context(
        loaded,
        tmp_path,
        "relearn",
        "eval.metrics=[perplexity]",
        "eval.attack.relearn.steps=[0,6]",
        "eval.attack.relearn.lr=1e-2",
        "eval.attack.relearn.lora_rank=4",
    )
    found = get_attack("relearn").run(actx)
    before, after = found["steps_0"]["perplexity"], found["steps_6"]["perplexity"]
    assert after["perplexity"] != before["perplexity"]  # the adapters changed the model
    assert [type(m) for m in loaded.model.modules()] == modules  # and are gone
    # an A and a B matrix for each projection of the blocks, nothing else
    assert trained == [2 * len(linear_weights(loaded.model, loaded.adapter.layers))]
    assert same_state(loaded.model, saved)


def test_halves_split_by_fact_with_the_seed():
    forget, _ = split_facts(load_facts(), ["chemistry"], ["capitals"])
    a, b = halves(forget, 0)
    assert {f.id for f in a} | {f.id for f in b} == {f.id for f in forget}
    assert not {f.id for f in a} & {f.id for f in b} and abs(len(a) - len(b)) <= 1
    assert halves(forget, 0) == (a, b) and halves(forget, 1) != (a, b)


def test_general_relearning_text_names_no_forget_fact():
    forget, _ = split_facts(load_facts(), ["chemistry"], ["capitals"])
    texts = ["Hydrogen burns.", "The symbol Li is light.", "Tin cans.", "A li of rice.", "Seas."]
    # a subject in any case; a chemical symbol only as written ("li" is a Chinese mile)
    assert unrelated(texts, forget) == ["A li of rice.", "Seas."]


@pytest.mark.parametrize(("bits", "group_size"), [(4, 16), (8, 0)])
def test_rtn_equals_a_plain_round_to_nearest_of_one_layer(loaded, bits, group_size):
    weight = linear_weights(loaded.model, loaded.adapter.layers)[
        "model.layers.0.mlp.down_proj.weight"
    ]
    codes, values = rtn(weight, bits, group_size)
    groups = weight.detach().reshape(-1, group_size or weight.shape[1])
    low, high = groups.min(1, keepdim=True)[0], groups.max(1, keepdim=True)[0]
    per_step = (2**bits - 1) / (high - low)  # codes per unit
    plain = (groups * per_step - low * per_step).round().clamp(0, 2**bits - 1)
    assert torch.equal(codes.reshape(plain.shape).float(), plain)
    expected = (plain + low * per_step) / per_step
    assert torch.allclose(values.reshape(plain.shape), expected, atol=1e-6)
    assert not torch.equal(values, weight)


@contextmanager
def lent(params, values):
    with swapped_in(params, values):
        yield None, None, "starting model"


def test_hqq_optimised_zero_points_fit_a_layer_closer_than_round_to_nearest(loaded):
    weight = next(iter(linear_weights(loaded.model, loaded.adapter.layers).values())).detach()
    _, plain = rtn(weight, 4, 0)
    _, optimised = rtn(weight, 4, 0, optimize=True)
    assert (optimised - weight).norm() < (plain - weight).norm()


def test_quant4_of_an_update_below_half_a_step_gives_the_starting_codes(loaded, tmp_path):
    saved = state(loaded.model)
    weights = linear_weights(loaded.model, loaded.adapter.layers)
    quantize_in_place(loaded.model, loaded.adapter.layers, 4, 16)  # on the 4-bit grid
    starting = {n: w.detach().clone() for n, w in weights.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for w in weights.values():
            groups = w.view(-1, 16)
            step = (groups.max(1, keepdim=True)[0] - groups.min(1, keepdim=True)[0]) / 15
            nudge = (torch.rand_like(groups) - 0.5) * 0.8 * step  # under half a step
            ends = (groups == groups.max(1, keepdim=True)[0]) | (
                groups == groups.min(1, keepdim=True)[0]
            )
            groups.add_(nudge.masked_fill(ends, 0.0))  # each group's range kept
    nudged = state(loaded.model)
    actx = attack_context(
        loaded,
        tmp_path,
        "quant4",
        "eval.metrics=[perplexity]",
        "eval.attack.quant4.group_size=16",
        judge=lambda: lent(weights, starting),
    )
    found = get_attack("quant4").run(actx)
    assert found["round_back"]["changed"] > 0 and found["round_back"]["share"] == 1.0
    assert found["perplexity"] == found["starting"]["perplexity"]
    assert same_state(loaded.model, nudged)
    loaded.model.load_state_dict(saved)


def test_quant8_changes_the_scored_model_and_gives_it_back(loaded, tmp_path):
    saved = state(loaded.model)
    actx = attack_context(loaded, tmp_path, "quant8", "eval.metrics=[perplexity]")
    unattacked = get_metric("perplexity").compute(actx.ctx)["perplexity"]
    found = get_attack("quant8").run(actx)
    assert found["perplexity"]["perplexity"] != unattacked["perplexity"]
    assert found["perplexity"]["tokens"] == unattacked["tokens"]
    assert "starting" not in found  # no starting model lent
    assert same_state(loaded.model, saved)


def test_attack_figures_forget_scores_the_same_forget_figures_and_nothing_else(loaded, tmp_path):
    scored = {}
    for figures in ("all", "forget"):
        actx = attack_context(
            loaded,
            tmp_path,
            "quant8",
            "eval.metrics=[facts,perplexity]",
            f"eval.attack_figures={figures}",
        )
        scored[figures] = get_attack("quant8").run(actx)
    full, narrow = scored["all"], scored["forget"]
    assert narrow["facts"]["forget"] == full["facts"]["forget"]
    assert set(narrow) == {"bits", "group_size", "optimize", "facts"}  # no perplexity, no fluency
    assert set(narrow["facts"]) == {"forget"}
    assert {"perplexity", "fluency"} <= set(full) and "retain" in full["facts"]


def test_logit_lens_last_layer_is_the_models_own_first_token_choice(loaded):
    forget, _ = split_facts(load_facts(), ["chemistry"], ["capitals"])
    chosen = probes(forget, all_prompts=False)[:24]
    norm = loaded.model.get_submodule(loaded.adapter.final_norm).weight
    saved = norm.detach().clone()
    torch.manual_seed(0)
    with torch.no_grad():  # a final norm that is not a plain rescaling: reading must apply it
        norm.copy_(torch.rand_like(norm) * 2 - 0.5)
    try:
        correct = lens_correct(loaded.model, loaded.tokenizer, loaded.adapter, chosen, 5)
        own = []
        with torch.no_grad():
            for p in chosen:  # one unpadded prompt at a time, through the whole model
                ids, tokens = lens_inputs(loaded.tokenizer, p)
                scores = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1][tokens]
                tied = scores == scores.max()  # options sharing a first token tie: shared credit
                own.append(float(tied[0]) / int(tied.sum()))
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert correct.shape == (loaded.num_layers + 1, len(chosen))
    assert correct[-2].tolist() == pytest.approx(own) and correct[-1].tolist() == pytest.approx(own)
    assert 0 < sum(0 < c < 1 for c in own)  # the prompts include ties, scored 1/k
    assert correct[:-2].tolist() != [own] * (loaded.num_layers - 1)  # earlier layers read apart


def test_fewshot_prompts_hold_k_demonstrations_from_retain_facts_only():
    forget, retain = split_facts(load_facts(), ["chemistry"], ["capitals", "languages"])
    chosen = probes(forget, all_prompts=False)
    shown = demonstrated(chosen, retain, 3, seed=0)
    answered = {f"{f.prompt(0)} {f.target}" for f in retain}
    forgotten = {f"{f.prompt(0)} {f.target}" for f in forget}
    for probe, prompted in zip(chosen, shown, strict=True):
        lines = prompted.text.split("\n")
        assert lines[-1] == probe.text and len(lines) == 4
        assert set(lines[:3]) <= answered and len(set(lines[:3])) == 3
        assert not set(lines[:3]) & forgotten
    assert len({p.prefix for p in shown}) > 1  # drawn for each prompt


def test_kuda_eval_writes_each_attack_beside_the_unattacked_figures(kuda, tmp_path):
    kuda(
        "eval",
        *[o for o in FAST if not o.startswith("stage=")],
        "eval.attacks=[relearn,relearn_general,quant8,quant4,logit_lens,fewshot]",
        "eval.attack.relearn.steps=[0,1]",
        "eval.attack.relearn_general.steps=[1]",
        "hydra.run.dir=run",
        check=True,
    )
    metrics = read_json(tmp_path / "run" / "metrics.json")
    attacks = metrics["attacks"]
    assert set(attacks) == {
        "relearn",
        "relearn_general",
        "quant8",
        "quant4",
        "logit_lens",
        "fewshot",
    }
    for found in (
        attacks["relearn"]["steps_1"],
        attacks["quant4"],
        attacks["relearn_general"]["steps_1"],
    ):
        assert set(found["facts"]["forget"]) >= set(metrics["facts"]["forget"]) - {"agreement"}
        assert set(found["perplexity"]) == set(metrics["perplexity"])
    assert "relearned" in attacks["relearn"]["steps_1"]["facts"]
    assert len(attacks["logit_lens"]["forget"]["mc_acc_by_layer"]) == 4
    # kuda eval: the lens floor on the evaluated model (no starting model lent)
    assert len(attacks["logit_lens"]["floor"]["mc_acc_by_layer"]) == 4
    assert (
        attacks["fewshot"]["facts"]["forget"]["n_prompts"]
        == metrics["facts"]["forget"]["n_prompts"]
    )
    assert all(found["seconds"] >= 0 for found in attacks.values())


def test_an_unknown_attack_stops_before_any_work(kuda, tmp_path):
    done = kuda("eval", "model=tiny-random", "eval.attacks=[nope]")
    assert done.returncode == 2 and "eval.attacks" in done.stderr and "relearn" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["data=wmdp_bio", "eval.attacks=[logit_lens]"], "data=facts"),
        (["eval.attacks=[relearn]", "eval.attack.relearn.steps=[-1]"], "eval.attack.relearn.steps"),
        (["eval.attacks=[relearn]", "eval.metrics=[]"], "eval.metrics"),
        (["eval.attacks=[fewshot]", "eval.attack.fewshot.k=500"], "eval.attack.fewshot.k"),
        (["eval.attacks=[fewshot]", "eval.metrics=[perplexity]"], "eval.metrics"),
        (
            ["eval.attacks=[relearn_general]", "eval.attack.relearn_general.builtin=nope"],
            "nope",
        ),
        (
            [
                "stage=unlearn",
                "unlearn=npo",
                "unlearn.lora.enabled=true",
                "eval.attacks=[relearn]",
                "eval.attack.relearn.lora_rank=8",
            ],
            "eval.attack.relearn.lora_rank",
        ),
    ],
)
def test_an_attack_its_data_or_settings_cannot_serve_is_refused(overrides, named):
    from kuda_cli.errors import UserError
    from kuda_cli.evaluate.attacks import check_attacks

    cfg = compose(["stage=eval", "model=tiny-random", *overrides])
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        check_attacks(cfg)


def test_kuda_unlearn_attacks_the_unlearned_model_against_the_starting_one(kuda, tmp_path):
    kuda(
        "unlearn",
        *[o for o in FAST if not o.startswith("stage=")],
        "locate=fixed",
        "locate.layers=[1,2]",
        "unlearn.steps=4",
        "unlearn.lr=1e-2",
        "eval.metrics=[facts]",
        "eval.attacks=[quant4,relearn,fewshot,logit_lens]",
        "eval.attack.relearn.steps=[0]",
        "hydra.run.dir=run",
        check=True,
    )
    attacks = read_json(tmp_path / "run" / "metrics.json")["attacks"]
    assert attacks["quant4"]["round_back"]["changed"] > 0  # the starting model was lent
    assert set(attacks["quant4"]["starting"]["facts"]) == set(attacks["quant4"]["facts"])
    quant_floor = read_json(tmp_path / "run" / "before" / "metrics.json")["facts"]["floor"]
    reference = attacks["quant4"]["starting"]["facts"]["forget"]
    expected = forget_removed(
        reference["mc_acc"], attacks["quant4"]["facts"]["forget"]["mc_acc"], quant_floor["mc_acc"]
    )
    against = attacks["quant4"]["forget_removed"]["against_quantized_start"]
    assert against["mc"] == expected
    # each attacked model's answers are kept apart from the run's own
    for where, figures in (
        ("quant4", attacks["quant4"]["facts"]["forget"]),
        ("quant4/starting", attacks["quant4"]["starting"]["facts"]["forget"]),
        ("relearn/steps_0", attacks["relearn"]["steps_0"]["facts"]["forget"]),
    ):
        rows = _rows(tmp_path / "run" / "attacks" / where)
        assert _accuracy(rows, None)[0] == pytest.approx(figures["mc_acc"])
    removed = attacks["relearn"]["steps_0"]["forget_removed"]
    assert removed["attacked"] == removed["unattacked"]
    assert set(attacks["fewshot"]["starting"]["facts"]) == {"forget"}
    lens = attacks["logit_lens"]
    assert len(lens["floor"]["mc_acc_by_layer"]) == len(lens["forget"]["mc_acc_by_layer"])
    assert lens["floor"] != lens["starting"]["forget"]  # read on the invented facts
    expected = forget_removed(
        lens["starting"]["forget"]["best_mc_acc"],
        lens["forget"]["best_mc_acc"],
        lens["floor"]["best_mc_acc"],
    )
    assert lens["forget_removed"] == {"mc": expected}
