"""The shared trainer and KUDA's deviation loss: masking, data order, kill-and-resume, the NaN
guard, checkpoints other tools load, and `kuda unlearn` end to end on a tiny model."""

import copy
import json
import math
import os

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from kuda_cli.compose import compose
from kuda_cli.models.hooks import trace
from kuda_cli.unlearn.batches import batch_indices, tokenize
from kuda_cli.unlearn.diagnostics import heldout_krd, swapped_in
from kuda_cli.unlearn.methods import get_method, method_modules
from kuda_cli.unlearn.methods.kuda import deviation
from kuda_cli.unlearn.trainer import STATE_FILE, Trainer, TrainingDiverged

from conftest import kuda_killed, method_on, read_json

FORGET = [
    "Hydrogen has the symbol H and atomic number one.",
    "Oxygen is written O in chemical formulas.",
    "Sodium carries the symbol Na.",
    "Iron is Fe on the periodic table, a metal.",
]
RETAIN = ["Paris is the capital of France.", "Rome is in Italy.", "Tokyo is large."]
TINY_RUN = [
    "model=tiny-random",
    "locate=fixed",
    "locate.layers=[1,2]",
    "eval=none",
    "unlearn.steps=6",
    "unlearn.save_every=2",
    "unlearn.lr=1e-2",
    "unlearn.batch_size=2",
]


def kuda_method(model, tokenizer, **overrides):
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    heldout = tokenize(tokenizer, ["The symbol of gold is"], 64, "held-out")
    context = {"retain_used": [], "forget_heldout": heldout}
    found, cfg = method_on(
        "kuda", model, tokenizer, forget, retain, context=context, **{"layers": [1], **overrides}
    )
    return found, cfg, forget, retain


def test_registry_lists_kuda():
    assert "kuda" in method_modules()
    assert get_method("kuda").name == "kuda"


def test_deviation_forms_decrease_with_the_cosine():
    cos = torch.linspace(-1, 1, 21)
    for form in ("softplus", "linear", "square"):
        values = deviation(cos, form, beta=5.0, margin=0.0)
        assert torch.all(values[1:] >= values[:-1]), form
    assert deviation(torch.tensor([-1.0]), "linear", 5.0, 0.0).item() == 0.0


def test_data_order_depends_only_on_seed_and_step():
    a = [batch_indices(10, 4, m, seed=3) for m in range(6)]
    b = [batch_indices(10, 4, m, seed=3) for m in reversed(range(6))][::-1]
    assert a == b
    assert sorted(a[0] + a[1] + a[2][:2]) == list(range(10))  # each epoch is a permutation
    assert a != [batch_indices(10, 4, m, seed=4) for m in range(6)]


def site_grad(method, batch):
    """The loss of a forget batch and its gradient at the output of the second trained site."""
    site = method.sites()[1]
    grabbed = {}

    def keep(output):
        output.retain_grad()
        grabbed["out"] = output
        return output

    with trace(method.ctx.model, [], edit={site: keep}):
        loss, _ = method.loss(batch, None)
    loss.backward()
    return loss, grabbed["out"].grad


def test_deviation_loss_has_no_gradient_at_padding(tiny):
    model, tokenizer = tiny
    method, cfg, forget, _ = kuda_method(model, tokenizer)
    method.prepare()
    method.initialise(method.trainable_parameters(), None)  # off the cos = 1 stationary point
    batch = forget.batch([2, 3])  # different lengths: the first row is padded
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    loss, grad = site_grad(method, batch)
    assert grad[mask == 0].abs().max().item() == 0.0
    assert grad[mask == 1].abs().max().item() > 0.0
    # and the loss does not depend on what the padded positions hold
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(mask == 0, 7))
    again, _ = method.loss(other, None)
    assert again.item() == pytest.approx(loss.item(), abs=1e-6)


def _starting(params):
    """A context manager factory swapping the starting values of `params` in (as `kuda unlearn`
    gives heldout_krd)."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    return lambda: swapped_in(params, saved)


def _kuda_krds(model, tokenizer, lr: float) -> tuple[float, float]:
    """KUDA trained 15 steps at `lr` from `model`: the KRD at layer 1 of the held-out forget
    input and of the retain texts."""
    method, cfg, forget, retain = kuda_method(model, tokenizer, lr=lr, steps=15)
    starting = _starting(method.trainable_parameters())
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=None, progress=False).train()
    assert "krd_loss_site" not in method.diagnostics({})  # no figure of its own at mlp_out
    adapter, retained = method.ctx.adapter, tokenize(tokenizer, RETAIN, 64, "retain")
    return (
        heldout_krd(model, adapter, [1], method.ctx.forget_heldout, starting)["mean"],
        heldout_krd(model, adapter, [1], retained, starting)["mean"],
    )


def test_kuda_moves_forget_representations_away(tiny):
    """Measured with the KRD every method reports (MLP outputs, subject tokens). Measured: the
    held-out forget input (never trained on) 0.42, the retain texts 0.05 (the null space keeps
    them), and 5e-6 with a learning rate of 1e-12 (the seeded initial noise alone)."""
    model, tokenizer = tiny
    untouched = copy.deepcopy(model)
    forget_krd, retain_krd = _kuda_krds(model, tokenizer, lr=1e-2)
    assert forget_krd > 0.05
    assert forget_krd > 4 * retain_krd, (forget_krd, retain_krd)  # forget moved, not all
    idle_krd, _ = _kuda_krds(untouched, tokenizer, lr=1e-12)  # the same start, no update
    assert idle_krd < forget_krd / 100, (idle_krd, forget_krd)


def test_kuda_at_the_residual_site_also_reports_its_own_sites_krd(tiny):
    model, tokenizer = tiny
    method, cfg, forget, retain = kuda_method(model, tokenizer, lr=1e-2, steps=5, site="residual")
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=None, progress=False).train()
    own = method.diagnostics({})["krd_loss_site"]
    assert set(own) == {"l1", "mean"} and own["mean"] > 0


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny, tmp_path):
    model, tokenizer = tiny
    method, cfg, forget, retain = kuda_method(model, tokenizer, steps=5, save_every=2)
    calls = {"n": 0}
    real_loss = method.loss

    def poisoned(f, r):
        calls["n"] += 1
        loss, terms = real_loss(f, r)
        return (loss * math.nan, terms) if calls["n"] == 3 else (loss, terms)

    method.loss = poisoned
    trainer = Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match=r"step 3.*checkpoint \(step 2\)"):
        trainer.train()
    assert read_json(tmp_path / "checkpoint-2" / "trainer_state.json")["step"] == 2
    assert not (tmp_path / "checkpoint").exists()  # no final model of a diverged run
    rows = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


def test_a_weight_turned_infinite_by_a_step_stops_with_the_last_good_checkpoint(tiny, tmp_path):
    """A finite loss whose optimiser step leaves a trained weight infinite (an overflowing
    update): caught after the step, nothing of it logged or saved."""
    model, tokenizer = tiny
    method, cfg, forget, retain = kuda_method(model, tokenizer, steps=5, save_every=2)
    trainer = Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=tmp_path)
    trainer.setup()
    calls = {"n": 0}

    def overflow(optimizer, args, kwargs):  # after the real step
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(iter(trainer.params.values())).view(-1)[0] = math.inf

    trainer.optimizer.register_step_post_hook(overflow)
    with pytest.raises(TrainingDiverged, match=r"step 3: a trained weight.*checkpoint \(step 2\)"):
        trainer.train()
    rows = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]
    saved = torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=False)["params"]
    assert saved and all(torch.isfinite(v).all() for v in saved.values())


def test_checkpoint_loads_with_from_pretrained(tiny, tmp_path):
    model, tokenizer = tiny
    method, cfg, forget, retain = kuda_method(model, tokenizer, steps=2, lr=1e-2)
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=tmp_path, progress=False).train()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    AutoTokenizer.from_pretrained(tmp_path / "checkpoint")
    for name, param in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], param)
    assert not (tmp_path / "checkpoint" / STATE_FILE).exists()  # the final one: the model only


def trained_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def test_killed_run_resumes_to_the_uninterrupted_weights(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    # SIGKILL from outside right after step 3 (tests/test_resume.py does every method)
    log = "outputs/unlearn/*/train_log.jsonl"
    assert kuda_killed(["unlearn", *TINY_RUN], tmp_path, log, 3) == -9
    (run_dir,) = (tmp_path / "outputs" / "unlearn").iterdir()
    assert read_json(run_dir / "checkpoint-2" / "trainer_state.json")["step"] == 2
    resumed = kuda("unlearn", *TINY_RUN, check=True)  # the same command again
    assert "resuming" in resumed.stderr, (resumed.stderr[-2000:], os.listdir(run_dir.parent))
    assert list((tmp_path / "outputs" / "unlearn").iterdir()) == [run_dir]
    meta, metrics = read_json(run_dir / "meta.json"), read_json(run_dir / "metrics.json")
    assert meta["status"] == "completed" and meta["attempts"][0]["status"] == "running"
    assert metrics["train"]["resumed_from"] == 2
    steps = [json.loads(r)["step"] for r in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    kuda("unlearn", *TINY_RUN, "hydra.run.dir=straight", check=True)
    a, b = trained_weights(run_dir), trained_weights(tmp_path / "straight")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resume_option_checks_the_directory(kuda, tmp_path):
    done = kuda("unlearn", *TINY_RUN, f"resume={tmp_path / 'nowhere'}")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "resume=" in done.stderr


def test_unlearn_end_to_end_writes_everything(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    args = [a for a in TINY_RUN if not a.startswith("eval=")]
    done = kuda(
        "unlearn",
        *args,
        "eval.metrics=[facts,perplexity]",
        "eval.facts.all_prompts=false",
        "eval.facts.gen_max_new_tokens=4",
        "eval.facts.fluency_max_new_tokens=4",
        "eval.perplexity.max_texts=4",
        "hydra.run.dir=run",
        check=True,
    )
    run = tmp_path / "run"
    metrics = read_json(run / "metrics.json")
    assert metrics["locate"]["layers"] == [1, 2]
    assert metrics["train"]["trainable_parameters"] > 0
    assert {"krd", "gradient_conflict", "retain_leak", "projector"} <= set(metrics["diagnostics"])
    assert metrics["before"]["facts"]["forget"]["n_facts"] == 45
    assert metrics["summary"]["retain_agreement"] is not None
    assert metrics["fluency"]["forget"]["judge"] == "starting model"
    for name in ("train_log.jsonl", "facts_answers.jsonl", "before/facts_answers.jsonl"):
        assert (run / name).exists(), name
    assert read_json(run / "meta.json")["status"] == "completed"
    assert not (run / "originals").exists()
    assert os.listdir(tmp_path / "cache" / "evals")  # the starting model's evaluation, cached
    del done


def test_unknown_trainable_kind_is_refused(kuda):
    done = kuda("unlearn", "model=tiny-random", "unlearn.trainable=[foo]")
    assert done.returncode == 2
    assert "unlearn.trainable has foo" in done.stderr


def test_unregistered_method_stops_with_one_line(kuda, tmp_path):
    done = kuda("unlearn", "model=tiny-random", "unlearn.method=nope", "hydra.run.dir=nope")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "unlearn.method=nope is not a registered method" in done.stderr
    assert not (tmp_path / "nope").exists()


def test_resumed_run_reuses_its_own_trace(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    args = [a for a in TINY_RUN if not a.startswith("locate")]
    args += ["locate.max_probes=2", "locate.samples=2", "hydra.run.dir=run"]
    assert kuda_killed(["unlearn", *args], tmp_path, "run/train_log.jsonl", 3) == -9
    layers = read_json(tmp_path / "run" / "trace" / "layers.json")["layers"]
    done = kuda("unlearn", *args, check=True)
    assert "the layers this run traced before" in done.stdout + done.stderr
    assert read_json(tmp_path / "run" / "metrics.json")["locate"]["layers"] == layers


def test_summary_measures_forgetting_against_the_floor_and_carries_every_task():
    from kuda_cli.evaluate import eval_schema, get_metric, summarise

    settings = eval_schema()(name="all", metrics=["facts", "perplexity", "lm_eval", "muse"])
    settings.wmdp = get_metric("lm_eval").schema(tasks=["wmdp_bio", "mmlu"])
    before = {
        "facts": {
            "forget": {"mc_acc": 1.0, "gen_acc": 0.8},
            "floor": {"mc_acc": 0.6, "gen_acc": 0.0, "chance": 0.25, "surface": 0.5},
            "retain": {"other_subjects": {"mc_acc": 1.0}, "same_subjects": {"mc_acc": 0.9}},
        },
        "fluency": {"forget": {"entropy": 5.0, "repetition": 0.3}},
        "lm_eval": {"wmdp_bio": {"acc": 0.6}, "mmlu": {"acc": 0.5}},
        "muse": {"verbmem_f": {"rougeL_f1": 0.7}, "privleak": {"auc": 0.8, "privleak": 10.0}},
    }
    after = {
        "facts": {
            "forget": {"mc_acc": 0.8, "gen_acc": 0.0},
            "retain": {
                "other_subjects": {"mc_acc": 0.95, "token_agreement": 0.9},
                "same_subjects": {"mc_acc": 0.5, "token_agreement": 0.6},
            },
        },
        "fluency": {"forget": {"entropy": 4.0, "nll_vs_fluent_wrong": 1.2, "repetition": 0.5}},
        "lm_eval": {"wmdp_bio": {"acc": 0.3}, "mmlu": {"acc": 0.45}, "mmlu_virology": {"acc": 0.4}},
        "muse": {"verbmem_f": {"rougeL_f1": 0.1}, "privleak": {"auc": 0.5, "privleak": -5.0}},
    }
    s = summarise(before, after, settings)
    # MC: (1.0 - 0.8) / (1.0 - 0.6) = 0.5; greedy: (0.8 - 0) / (0.8 - 0) = 1.0
    assert s["forget_removed_mc"] == pytest.approx(0.5)
    assert s["forget_removed_gen"] == pytest.approx(1.0)
    assert s["forget_removed"] == pytest.approx(0.75)
    assert (s["floor_mc"], s["chance"], s["surface_floor"]) == (0.6, 0.25, 0.5)
    assert s["retain_other_token_agreement"] == 0.9 and s["retain_same_mc"] == 0.5
    assert s["fluency_entropy_ratio"] == pytest.approx(0.8)
    assert s["fluency_nll_vs_fluent_wrong"] == 1.2
    assert (s["wmdp_bio_acc"], s["wmdp_bio_acc_before"], s["mmlu_acc"]) == (0.3, 0.6, 0.45)
    assert "mmlu_virology_acc" not in s  # only the tasks asked for
    assert (s["verbmem_f_rougeL_f1"], s["verbmem_f_rougeL_f1_before"]) == (0.1, 0.7)
    assert (s["privleak_auc"], s["privleak"]) == (0.5, -5.0)
    # forgetting below the floor counts as all removed; a floor at the start removes nothing
    below = summarise(before, {"facts": {"forget": {"mc_acc": 0.3, "gen_acc": 0.8}}}, settings)
    assert below["forget_removed_mc"] == 1.0 and below["forget_removed_gen"] == 0.0
    no_floor = {"facts": {"forget": {"mc_acc": 1.0}, "floor": {"mc_acc": 1.0}}}
    assert "forget_removed_mc" not in summarise(no_floor, after, settings)


@pytest.mark.parametrize("method", ["kuda", "ga"])
def test_unlearn_diagnostics_equal_an_independent_computation(kuda, tmp_path, monkeypatch, method):
    """KRD (KUDA's own and the baselines' held-out one) and the retain leak, recomputed here
    from the starting tiny model and the saved checkpoint with plain forward hooks, one unpadded
    sequence at a time: the run's metrics.json holds the same numbers."""
    from kuda_cli.models.tiny import tiny_random
    from kuda_cli.unlearn.batches import unlearn_texts

    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    args = [*TINY_RUN, f"unlearn={method}", "unlearn.lr=1e-3"]
    kuda("unlearn", *args, "hydra.run.dir=run", check=True)
    diagnostics = read_json(tmp_path / "run" / "metrics.json")["diagnostics"]
    cfg = compose(["stage=unlearn", *args])
    start, tokenizer = tiny_random(OmegaConf.to_object(cfg.model.tiny))  # the same seed
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint").eval()
    texts = unlearn_texts(OmegaConf.to_object(cfg.data))
    length = cfg.unlearn.max_length
    heldout = tokenize(tokenizer, texts.forget_heldout, length, "f", texts.forget_heldout_spans)
    retain = tokenize(tokenizer, texts.retain_heldout, length, "r")

    def captured(model, ids, layer, what):
        """The MLP output (`out`) or the down_proj input (`in`) of one sequence."""
        got = {}
        module = model.model.layers[layer].mlp
        module = module if what == "out" else module.down_proj

        def hook(mod, args, output):
            got["x"] = (output if what == "out" else args[0])[0].double()

        handle = module.register_forward_hook(hook)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        handle.remove()
        return got["x"]

    krd = {}
    for layer in (1, 2):
        values = []
        for ids, focus in zip(heldout.ids, heldout.focus, strict=True):
            a, b = captured(trained, ids, layer, "out"), captured(start, ids, layer, "out")
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            values += [1 - c for c, f in zip(cos.tolist(), focus, strict=True) if f]
        krd[f"l{layer}"] = sum(values) / len(values)
        assert diagnostics["krd"][f"l{layer}"] == pytest.approx(krd[f"l{layer}"], abs=1e-5)
    assert diagnostics["krd"]["mean"] == pytest.approx(sum(krd.values()) / 2, abs=1e-5)
    assert diagnostics["krd"]["mean"] > 1e-4  # something moved: the comparison has teeth

    for layer in (1, 2):
        dw = (
            trained.model.layers[layer].mlp.down_proj.weight.detach().double()
            - start.model.layers[layer].mlp.down_proj.weight.detach().double()
        )
        keys = torch.cat([captured(start, ids, layer, "in") for ids in retain.ids])
        leak = diagnostics["retain_leak"][f"l{layer}"]
        assert diagnostics["retain_leak"]["keys"] == keys.shape[0]
        assert leak["dw_norm"] == pytest.approx(float(dw.norm()), rel=1e-5)
        # ||dW K||_F / (||dW||_F sqrt(n)), the keys as rows
        expected = float((keys @ dw.T).norm() / (dw.norm() * keys.shape[0] ** 0.5))
        assert leak["dw_k_over_dw"] == pytest.approx(expected, rel=1e-4)
        isotropic = float((keys * keys).sum() / keys.shape[0] / keys.shape[1]) ** 0.5
        assert leak["vs_random"] == pytest.approx(expected / isotropic, rel=1e-4)


def test_a_resume_drops_a_train_log_row_torn_by_a_kill_and_loads_only_tensors(kuda, tmp_path):
    """A kill mid-append leaves half a row at the end of train_log.jsonl: the resumed run drops
    it and ends with one row per step; the checkpoint it resumes from loads with torch's
    weights-only unpickler (a run directory from elsewhere cannot run code)."""
    args = [*TINY_RUN, "hydra.run.dir=run"]
    assert kuda_killed(["unlearn", *args], tmp_path, "run/train_log.jsonl", 3) == -9
    log = tmp_path / "run" / "train_log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 99, "lo')
    state = next((tmp_path / "run").glob("checkpoint-*/trainer_state.pt"))
    torch.load(state, weights_only=True)  # raises on anything but tensors, numbers, containers
    kuda("unlearn", *args, check=True)
    steps = [json.loads(row)["step"] for row in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
