"""Causal tracing: the restorations mean what they say (restoring the clean state restores the clean
probability, no noise means no effect), the fast implementation equals ROME's naive loop on every
adapter family, probes come from every data kind, the layer window is the best one, and
`kuda trace` writes its files."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from kuda_cli import cli
from kuda_cli.compose import compose
from kuda_cli.data.probes import TraceProbe, from_facts, from_qa, from_wmdp
from kuda_cli.errors import UserError
from kuda_cli.locate.effects import average_by_category
from kuda_cli.locate.layers import read_layers
from kuda_cli.locate.layers import write_layers as write_checked_layers
from kuda_cli.locate.pipeline import find_layers
from kuda_cli.locate.probes import build_probes, choose, encode
from kuda_cli.locate.restore import restored_layers
from kuda_cli.locate.select import last_subject_scores, select_window
from kuda_cli.locate.tracing import (
    KINDS,
    embedding_std,
    make_noise,
    trace_probe,
    trace_probes,
)
from kuda_cli.models.adapter import get_adapter
from kuda_cli.models.precision import autocast, fast_bf16, resolve_precision
from kuda_cli.models.tiny import byte_tokenizer

from conftest import read_json

AGREE = 1e-4  # max |naive - fast| of restored probabilities, float32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharpen(model, factor: float = 20.0):
    """Random tiny models predict nearly uniformly, so restorations barely move the target's
    probability; larger weights give peaked predictions and effects of tenths."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(factor)
    return model.eval()


def probe_for(model, tokenizer, prompt: str, span: tuple[int, int]):
    """A probe whose target is the model's own top prediction (as ROME traces by default)."""
    enc = encode(tokenizer, TraceProbe(prompt, " x", span, "p"))
    with torch.no_grad():
        top = model(input_ids=torch.tensor([enc.input_ids])).logits[0, -1].argmax().item()
    return replace(enc, target_id=int(top))


def noise_for(model, enc, samples: int = 3, scale: float = 3.0, seed: int = 0):
    adapter = get_adapter(model)
    std = scale * embedding_std(model, adapter, [enc])
    width = adapter.embedding(model).embedding_dim
    return make_noise(samples, enc.span[1] - enc.span[0], width, std, seed)


@pytest.fixture
def sharp_llama(tiny):
    model, tokenizer = tiny
    return sharpen(model), tokenizer


# ----------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_restoring_the_clean_state_at_every_layer_gives_the_clean_probability(sharp_llama, naive):
    model, tokenizer = sharp_llama
    # the corrupted span is the last token: restoring its hidden state at any layer makes every
    # later computation clean
    enc = probe_for(model, tokenizer, "Gold is Au", (9, 10))
    result = trace_probe(
        model, get_adapter(model), enc, noise_for(model, enc), window=2, naive=naive
    )
    assert abs(result.clean - result.corrupted) > 0.05  # the noise matters
    np.testing.assert_allclose(result.restored["hidden"][-1], result.clean, atol=1e-5)


@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_restoring_before_the_span_or_the_last_block_elsewhere_changes_nothing(sharp_llama, naive):
    model, tokenizer = sharp_llama
    enc = probe_for(model, tokenizer, "So Gold is", (3, 7))
    result = trace_probe(
        model, get_adapter(model), enc, noise_for(model, enc), window=2, naive=naive
    )
    for kind in KINDS:  # positions before the corrupted span hold clean states already
        np.testing.assert_allclose(result.restored[kind][:3], result.corrupted, atol=1e-5)
    # the last block's output reaches the head only at the last position
    np.testing.assert_allclose(result.restored["hidden"][:-1, -1], result.corrupted, atol=1e-5)
    assert result.restored["hidden"][-1, -1] == pytest.approx(result.clean, abs=1e-5)


def test_zero_noise_gives_zero_indirect_effect(sharp_llama):
    model, tokenizer = sharp_llama
    enc = probe_for(model, tokenizer, "Gold is", (0, 4))
    result = trace_probe(model, get_adapter(model), enc, torch.zeros(2, 4, 32), window=2)
    assert result.corrupted == pytest.approx(result.clean, abs=1e-6)
    for kind in KINDS:
        np.testing.assert_allclose(result.effect(kind), 0.0, atol=1e-6)


def test_restored_windows_follow_rome():
    assert list(restored_layers("hidden", 4, 30, 10)) == [4]
    assert list(restored_layers("mlp", 12, 30, 10)) == list(range(7, 17))
    assert list(restored_layers("attn", 1, 30, 10)) == list(range(0, 6))
    assert list(restored_layers("mlp", 28, 30, 10)) == list(range(23, 30))
    assert list(restored_layers("mlp", 2, 30, 3)) == [1, 2, 3]


# ----------------------------------------------------------------------------- naive == fast
V = 260  # the byte tokenizer's vocabulary
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=V),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8),  # logit soft-capping
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=8),
    "olmo2": lambda: transformers.Olmo2Config(**SMALL),
    "phi3": lambda: transformers.Phi3Config(**{**SMALL, "num_key_value_heads": 4}, pad_token_id=0),
}


def assert_naive_equals_fast(model, tokenizer, prompt, span, window):
    enc = probe_for(model, tokenizer, prompt, span)
    adapter, noise = get_adapter(model), noise_for(model, enc)
    naive = trace_probe(model, adapter, enc, noise, window=window, naive=True)
    fast = trace_probe(model, adapter, enc, noise, window=window, batch_tokens=20)  # chunks
    assert fast.clean == pytest.approx(naive.clean, abs=1e-7)
    assert fast.corrupted == pytest.approx(naive.corrupted, abs=1e-7)
    for kind in KINDS:
        assert np.abs(naive.effect(kind)).max() > 0.01, kind  # something to agree on
        np.testing.assert_allclose(fast.restored[kind], naive.restored[kind], rtol=0, atol=AGREE)


def test_bf16_autocast_traces_close_to_float32(sharp_llama):
    model, tokenizer = sharp_llama
    enc = probe_for(model, tokenizer, "The Au of gold", (11, 15))
    adapter, noise = get_adapter(model), noise_for(model, enc)
    exact = trace_probe(model, adapter, enc, noise, window=2)
    with autocast("bfloat16", torch.device("cpu")):
        low = trace_probe(model, adapter, enc, noise, window=2)
    # bf16 products did run, and stayed close. The sharpened weights amplify bf16's rounding:
    # measured here (one thread, CPU with bf16 units; the embedded model gives about 2%) the
    # largest difference is 10.1% (hidden), 5.5% (mlp), 7.0% (attn) of the largest effect; the
    # bounds are twice that. A few-% error of its own is below bf16's here; a traced state
    # stored at float8's precision (hidden: 25%) is not.
    bound = {"hidden": 0.2, "mlp": 0.11, "attn": 0.14}
    for kind in KINDS:
        scale = np.abs(exact.effect(kind)).max()
        assert scale > 0.01
        diff = np.abs(low.effect(kind) - exact.effect(kind)).max()
        assert 0 < diff < bound[kind] * scale, (kind, diff / scale)


def test_precision_auto_resolves_by_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("bfloat16", cpu) == "bfloat16"
    assert resolve_precision("auto", cpu) == ("bfloat16" if fast_bf16(cpu) else "float32")
    assert resolve_precision("auto", torch.device("meta")) == "float32"


@pytest.mark.parametrize(
    "flags, fast",
    [
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4, Cooper Lake
        ("fpu avx512f amx_bf16 amx_tile", True),  # Sapphire Rapids
        ("fpu avx2 avx512f avx512_vnni", False),
        ("fpu avx2 fma", False),
    ],
)
def test_bf16_units_are_read_from_the_cpu_flags(flags, fast):
    from kuda_cli.models.precision import cpu_has_bf16_units

    cpuinfo = f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n"
    assert cpu_has_bf16_units(cpuinfo) is fast
    assert cpu_has_bf16_units(f"bugs\t\t: {flags}\n") is False  # only the flags line counts


def test_naive_and_fast_agree_on_llama(sharp_llama):
    assert_naive_equals_fast(*sharp_llama, "The Au of gold", (11, 15), window=2)


def test_fast_tracing_passes_the_cache_by_the_installed_transformers_keyword(sharp_llama):
    """transformers 5.x renamed `past_key_values` to `cache` and warns on the old name: the fast
    path's own calls raise no deprecation warning (issue 18), and still agree with naive."""
    model, tokenizer = sharp_llama
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        assert_naive_equals_fast(model, tokenizer, "The Au of gold", (11, 15), window=2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_naive_and_fast_agree_on_every_adapter_family(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    assert get_adapter(model).family == family
    assert_naive_equals_fast(sharpen(model), byte_tokenizer(), "Gold: Au", (0, 4), window=3)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "gpt2"])
def test_eager_attention_on_the_cpu_traces_as_the_model_own_attention(family):
    """trace_probes switches CPU tracing to eager attention (faster at probe lengths): same
    numbers, and the model's own implementation comes back afterwards."""
    from kuda_cli.locate.tracing import attention

    torch.manual_seed(0)
    model = sharpen(transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()))
    assert model.config._attn_implementation == "sdpa"
    enc = probe_for(model, byte_tokenizer(), "Gold: Au", (0, 4))
    adapter, noise = get_adapter(model), noise_for(model, enc)
    own = trace_probe(model, adapter, enc, noise, window=3)
    with attention(model, "eager"):
        assert model.config._attn_implementation == "eager"
        eager = trace_probe(model, adapter, enc, noise, window=3)
    assert model.config._attn_implementation == "sdpa"
    for kind in KINDS:
        np.testing.assert_allclose(eager.restored[kind], own.restored[kind], rtol=0, atol=AGREE)
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(model.config._attn_implementation))
    trace_probes(model, adapter, [enc], samples=2, window=3)
    assert set(seen) == {"eager"}
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- selection
def test_window_selection_picks_the_known_maximum():
    scores = np.array([0.0, 0.1, 0.2, 0.9, 1.0, 0.8, 0.1, 0.0])
    selection = select_window(scores, 3)
    assert selection.layers == [3, 4, 5]
    assert selection.score == pytest.approx(0.9)
    assert select_window(scores, 1).layers == [4]


def test_window_selection_edge_cases():
    assert select_window([1.0, 2.0, 2.0, 1.0, 2.0, 2.0], 2).layers == [1, 2]  # ties: earliest
    assert select_window([0.1, 0.2, 0.3], 3).layers == [0, 1, 2]  # the whole range
    with pytest.raises(ValueError, match="does not fit"):
        select_window([0.1, 0.2, 0.3], 4)
    with pytest.raises(ValueError, match="NaN"):
        select_window([0.1, float("nan"), 0.3], 2)


def test_scores_are_taken_at_each_probes_last_subject_token():
    a, b = np.zeros((4, 3)), np.zeros((5, 3))
    a[1] = [1.0, 2.0, 3.0]
    b[3] = [3.0, 2.0, 1.0]
    np.testing.assert_allclose(last_subject_scores([a, b], [1, 3]), [2.0, 2.0, 2.0])


def test_average_by_category_folds_tokens_into_rome_categories(tiny):
    _, tokenizer = tiny
    enc = encode(tokenizer, TraceProbe("a Gold is x", " y", (2, 6)))  # bytes: a _ G o l d _ i s _ x
    effect = np.arange(len(enc.input_ids), dtype=float)[:, None].repeat(2, axis=1)
    average = average_by_category([effect], [enc])
    # first subject token 2, middle 3-4, last 5, first after 6, further 7-9, last token 10
    np.testing.assert_allclose(average[:, 0], [2.0, 3.5, 5.0, 6.0, 8.0, 10.0])


# ----------------------------------------------------------------------------- probes
def test_facts_probes_corrupt_the_subject(tiny):
    from kuda_cli.data.fact_set import load_facts, probes

    fact = next(f for f in load_facts() if f.subject == "hydrogen")
    chosen = from_facts(probes([fact]))
    assert [p.target for p in chosen] == [" H"] * len(fact.prompts)
    for probe in chosen:
        a, b = probe.span
        assert probe.prompt[a:b] == "hydrogen"
    whole = from_facts(probes([fact]), span="prompt")[0]
    assert whole.span == (0, len(whole.prompt))


def test_wmdp_rows_become_question_probes(tiny):
    _, tokenizer = tiny
    rows = [
        {"question": "Which gas is inert?", "choices": ["O2", "Ar", "H2", "N2"], "answer": 1},
        {"question": "Pick B", "choices": ["w", "x", "y", "z"], "answer": "B"},
    ]
    first, second = from_wmdp(rows)
    assert first.prompt == "Question: Which gas is inert?\nAnswer:"
    assert first.target == " Ar" and second.target == " x"
    assert first.prompt[slice(*first.span)] == "Which gas is inert?"
    enc = encode(tokenizer, first)
    corrupted = tokenizer.decode(list(enc.input_ids[enc.span[0] : enc.span[1]]))
    assert corrupted == "Which gas is inert?"
    with pytest.raises(UserError, match="answer 7"):
        from_wmdp([{"question": "q", "choices": ["a", "b"], "answer": 7}])


def test_muse_qa_rows_become_question_probes():
    (probe,) = from_qa([{"question": " Who wrote it? ", "answer": "Ann Lee"}])
    assert probe.prompt == "Question: Who wrote it?\nAnswer:" and probe.target == " Ann Lee"
    assert probe.prompt[slice(*probe.span)] == "Who wrote it?"


def test_stage_builds_probes_from_each_data_kind(tmp_path):
    wmdp = tmp_path / "wmdp.jsonl"
    wmdp.write_text(json.dumps({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}))
    muse = tmp_path / "qa.jsonl"
    muse.write_text(json.dumps({"question": "Who?", "answer": "Ann"}))
    cases = {  # held-apart questions (data.probes); the forget corpus's cloze: test_probes.py
        ("data=wmdp_bio", f"data.probes.path={wmdp}"): ("Question: Q?\nAnswer:", " c"),
        ("data=muse_news", f"data.probes.path={muse}"): ("Question: Who?\nAnswer:", " Ann"),
        ("data=facts",): ("The element hydrogen is represented by the symbol", " H"),
    }
    for overrides, (prompt, target) in cases.items():
        built = build_probes(compose(["stage=trace", *overrides]))
        assert (built[0].prompt, built[0].target) == (prompt, target)
    assert len(built) == 45 * 3  # every paraphrase of every chemistry fact


def test_probes_are_drawn_with_the_seed_in_their_order():
    pool = [TraceProbe(f"p{i}", " t", (0, 1), str(i)) for i in range(30)]
    first = choose(pool, 5, seed=0)
    assert first == choose(pool, 5, seed=0) and first != choose(pool, 5, seed=1)
    assert [int(p.id) for p in first] == sorted(int(p.id) for p in first)
    assert choose(pool, None, 0) == pool and choose(pool, 40, 0) == pool


# ----------------------------------------------------------------------------- the stage
def test_kuda_trace_writes_effects_heatmaps_and_layers(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    kuda(
        "trace",
        "model=tiny-random",
        "locate.max_probes=3",
        "locate.samples=2",
        "locate.plot_probes=1",
        "hydra.run.dir=run",
        check=True,
    )
    out = tmp_path / "run" / "trace"
    layers = read_json(out / "layers.json")
    assert len(layers["layers"]) == 3 and layers["module"] == "mlp"
    assert layers["precision"] in ("float32", "bfloat16")
    assert len(layers["scores"]) == 4
    best = max(np.convolve(layers["scores"], np.ones(3) / 3, mode="valid"))
    assert layers["window_score"] == pytest.approx(best)
    effects = np.load(out / "effects.npz")
    assert effects["mlp_effect"].shape == (3, effects["tokens"].shape[1], 4)
    assert effects["hidden_effect_avg"].shape == (6, 4)
    assert effects["clean_prob"].shape == (3,)
    for name in ["effect_by_layer", *(f"heatmap_{k}" for k in KINDS), "heatmap_mlp_probe0"]:
        assert (out / f"{name}.png").stat().st_size > 1000
    metrics = read_json(tmp_path / "run" / "metrics.json")["trace"]
    assert metrics["layers"] == layers["layers"] and metrics["probes"] == 3
    assert read_json(tmp_path / "run" / "meta.json")["status"] == "completed"


def test_from_run_without_a_trace_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["unlearn", "model=tiny-random", "locate.from_run=no/such/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "locate.from_run=no/such/run" in err and "trace/layers.json" in err
    assert not (tmp_path / "outputs").exists()


def write_layers(run_dir, layers):
    (run_dir / "trace").mkdir(parents=True)
    (run_dir / "trace" / "layers.json").write_text(json.dumps({"layers": layers}))
    return run_dir


def test_find_layers_fixed_from_run_and_bad_files(tmp_path):
    cfg = compose(["stage=unlearn", "model=tiny-random", "locate=fixed", "locate.layers=[2]"])
    assert find_layers(cfg, None, tmp_path, "key").layers == [2]
    previous = write_layers(tmp_path / "prev", [1, 2, 3])
    cfg = compose(["stage=unlearn", "model=tiny-random", f"locate.from_run={previous}"])
    assert find_layers(cfg, SimpleNamespace(num_layers=4), tmp_path, "key").layers == [1, 2, 3]
    with pytest.raises(UserError, match="not layer indices of this model"):
        read_layers(str(previous), 3)
    (previous / "trace" / "layers.json").write_text("{")
    with pytest.raises(UserError, match="cannot read"):
        read_layers(str(previous), 4)


def test_a_trace_whose_layers_file_was_edited_is_refused_and_a_checked_one_read(tmp_path):
    out = tmp_path / "prev" / "trace"
    out.mkdir(parents=True)
    write_checked_layers(out, {"layers": [1, 2], "model_key": "abc"})
    assert read_layers(str(tmp_path / "prev"), 4, "abc") == [1, 2]
    assert read_layers(str(tmp_path / "prev"), 4, "other") == [1, 2]  # a warning only
    with pytest.raises(UserError, match="traced on other weights"):  # a resumed run's own
        read_layers(str(tmp_path / "prev"), 4, "other", same_weights=True)
    edited = json.loads((out / "layers.json").read_text())
    edited["layers"] = [0, 1]  # valid indices, but not what was traced
    (out / "layers.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match="does not match its checksum"):
        read_layers(str(tmp_path / "prev"), 4, "abc")


@pytest.mark.integration
def test_kuda_trace_on_the_embedded_model(kuda, tmp_path):
    """Two probes, three noise samples: the noise must hurt, the selection must be written."""
    kuda("trace", "locate.max_probes=2", "locate.samples=3", "hydra.run.dir=run", check=True)
    out = tmp_path / "run" / "trace"
    layers = read_json(out / "layers.json")
    assert len(layers["layers"]) == 3 and max(layers["layers"]) < 30
    effects = np.load(out / "effects.npz")
    assert (effects["clean_prob"] > effects["corrupted_prob"]).all()
    last = effects["length"] - 1
    for i in range(2):  # the last block's output at the last token restores the clean run
        restored = effects["hidden_restored"][i, last[i], -1]
        assert restored == pytest.approx(effects["clean_prob"][i], abs=1e-4)
