"""KUDA's null-space keys from general text (`unlearn.nullspace.key_source`): the moment they
give, how retain and general keys mix, the model's own text written once per seed, the spectra
cache told apart by key source, a missing local source refused, the evaluation's text never a
key."""

import json

import pytest
import torch

from kuda_cli.models.adapter import get_adapter
from kuda_cli.models.hooks import trace
from kuda_cli.unlearn import general_keys
from kuda_cli.unlearn.batches import TokenSet, tokenize
from kuda_cli.unlearn.general_keys import (
    GeneralTextConfig,
    general_texts,
    key_sets,
    self_text_path,
)
from kuda_cli.unlearn.methods import MethodContext
from kuda_cli.unlearn.methods.kuda import KudaMethod, NullspaceConfig
from kuda_cli.unlearn.nullspace import retain_spectra

RETAIN = ["Paris is the capital of France.", "Rome is in Italy.", "Tokyo is large."]
GENERAL = [
    "The river flows north through the valley.",
    "Bread is baked from flour, water and yeast.",
    "The committee met on Tuesday.",
    "Music festivals draw crowds every summer.",
]
EVALUATED = "Bread is baked from flour, water and yeast."


def keys_of(model, adapter, layer, tokens: TokenSet) -> torch.Tensor:
    """(d_ff, n): the down_proj inputs at every token of `tokens`, by hand."""
    batch = tokens.batch(list(range(len(tokens))))
    name = adapter.module_name("down_proj", layer)
    with torch.no_grad(), trace(model, [name], inputs=True) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return rec[name].input[batch["attention_mask"].bool()].double().T


def context(model, tokenizer, tmp_path, keys: str, general: GeneralTextConfig, eval_texts=()):
    cfg = KudaMethod(max_length=64, nullspace=NullspaceConfig(key_source=keys, general=general))
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    return MethodContext(
        model,
        get_adapter(model),
        tokenizer,
        [1],
        cfg,
        retain,
        retain,
        [],
        [],
        cache_dir=tmp_path / "cache",
        model_key="m",
        eval_texts=lambda: list(eval_texts),
    )


def local_source(tmp_path, texts=GENERAL, tokens=10_000) -> GeneralTextConfig:
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return GeneralTextConfig(source="path", path=str(path), tokens=tokens)


def moment_of(ctx, layer: int):
    spectrum = retain_spectra(
        ctx.model,
        ctx.adapter,
        [layer],
        key_sets(ctx, ctx.cfg.nullspace, layer),
        cache_dir=None,
        model_key="m",
    )[layer]
    u = spectrum.eigenvectors.double()
    return (u * spectrum.eigenvalues) @ u.T, spectrum.tokens


@pytest.mark.parametrize("layer", [0, 2])
def test_general_keys_moment_is_that_of_the_general_texts_down_proj_inputs(tiny, tmp_path, layer):
    model, tokenizer = tiny
    ctx = context(model, tokenizer, tmp_path, "general", local_source(tmp_path))
    moment, count = moment_of(ctx, layer)
    keys = keys_of(model, ctx.adapter, layer, tokenize(tokenizer, GENERAL, 64, "general"))
    assert count == keys.shape[1]
    torch.testing.assert_close(moment, keys @ keys.T / count, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("share", [0.5, 0.9])
def test_retain_plus_general_mixes_per_token_moments_by_share(tiny, tmp_path, share):
    model, tokenizer = tiny
    source = local_source(tmp_path)
    source.share = share
    ctx = context(model, tokenizer, tmp_path, "retain+general", source)
    moment, count = moment_of(ctx, 1)
    retain = keys_of(model, ctx.adapter, 1, tokenize(tokenizer, RETAIN, 64, "retain"))
    general = keys_of(model, ctx.adapter, 1, tokenize(tokenizer, GENERAL, 64, "general"))
    by_hand = (1 - share) * retain @ retain.T / retain.shape[1]
    by_hand += share * general @ general.T / general.shape[1]
    assert count == retain.shape[1] + general.shape[1]
    torch.testing.assert_close(moment, by_hand, rtol=1e-5, atol=1e-9)


def test_general_keys_stop_at_the_token_budget_and_hold_the_next_texts_out(tiny, tmp_path):
    model, tokenizer = tiny
    texts = [f"{t} Number {i}." for i, t in enumerate(GENERAL * 12)]
    budget = sum(len(tokenizer(t).input_ids) for t in texts[:2])  # met by the first two
    ctx = context(model, tokenizer, tmp_path, "general", local_source(tmp_path, texts, budget))
    chosen = general_texts(ctx, ctx.cfg.nullspace.general, budget)
    assert chosen.keys == texts[:2]
    assert chosen.heldout == texts[2 : 2 + general_keys.TUNER_TEXTS]


def test_the_evaluation_s_texts_are_never_keys(tiny, tmp_path):
    model, tokenizer = tiny
    source = local_source(tmp_path)
    ctx = context(model, tokenizer, tmp_path, "general", source, eval_texts=[EVALUATED + "  "])
    chosen = general_texts(ctx, source, 10_000)
    assert chosen.keys == [t for t in GENERAL if t != EVALUATED]
    everything = context(model, tokenizer, tmp_path, "general", source, eval_texts=GENERAL)
    with pytest.raises(Exception, match="no text apart from the evaluation's"):
        general_texts(everything, source, 10_000)


def test_self_written_text_is_the_same_for_a_seed_and_written_once(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    source = GeneralTextConfig(source="self", new_tokens=8, batch_size=4, tokens=60)
    ctx = context(model, tokenizer, tmp_path, "general", source)
    nocache = context(model, tokenizer, tmp_path, "general", source)
    nocache.cache_dir = None
    first = general_texts(ctx, source, 60)
    assert first == general_texts(nocache, source, 60)  # the seed decides, not the cache
    assert all(t.startswith(general_keys.PROMPTS) for t in first.keys)
    assert len(set(first.keys)) > 1
    path = self_text_path(ctx.cache_dir, "m", source)
    assert len(path.read_text().splitlines()) >= len(first.keys) + len(first.heldout)

    def refuse(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(general_keys, "sampled_texts", refuse)
    assert general_texts(ctx, source, 60) == first  # read back from the cache
    other = GeneralTextConfig(source="self", new_tokens=8, batch_size=4, tokens=60, seed=1)
    monkeypatch.undo()
    reseeded = general_texts(context(model, tokenizer, tmp_path, "general", other), other, 60)
    assert reseeded.keys != first.keys


def test_spectra_cache_tells_key_sources_and_shares_apart(tiny, tmp_path):
    model, tokenizer = tiny
    cache = tmp_path / "spectra"

    def spectrum(keys: str, share: float = 0.5, texts=GENERAL):
        source = local_source(tmp_path, texts)
        source.share = share
        ctx = context(model, tokenizer, tmp_path, keys, source)
        sets = key_sets(ctx, ctx.cfg.nullspace, 1)
        return retain_spectra(model, ctx.adapter, [1], sets, cache_dir=cache, model_key="m")[1]

    seen = [spectrum("retain"), spectrum("general"), spectrum("retain+general")]
    seen += [spectrum("retain+general", 0.8), spectrum("general", texts=GENERAL[:2])]
    assert len(list((cache / "nullspace").glob("*.safetensors"))) == len(seen)
    values = [s.eigenvalues for s in seen]
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            assert not torch.allclose(a, b)
    # today's retain-only spectra keep their cache entry: keyed by the retain tokens alone
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    old = retain_spectra(model, get_adapter(model), [1], retain, cache_dir=cache, model_key="m")
    assert len(list((cache / "nullspace").glob("*.safetensors"))) == len(seen)
    torch.testing.assert_close(old[1].eigenvalues, seen[0].eigenvalues)


def test_a_missing_local_general_source_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from kuda_cli import cli

    monkeypatch.chdir(tmp_path)
    keys = ["unlearn.nullspace.key_source=general", "unlearn.nullspace.general.source=path"]
    code = cli.main(
        ["unlearn", "model=tiny-random", *keys, "unlearn.nullspace.general.path=no.txt"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1
    assert "unlearn.nullspace.general.path=no.txt does not exist" in err
    assert not (tmp_path / "outputs").exists()
    # the same source with retain keys is not read, so not refused
    from kuda_cli.compose import compose
    from kuda_cli.validate import validate

    validate(
        compose(
            ["stage=unlearn", "model=tiny-random", *keys[1:], "unlearn.nullspace.general.path=x"]
        )
    )


def test_a_hub_general_source_is_listed_for_the_offline_check():
    from kuda_cli import requires
    from kuda_cli.compose import compose

    hub = ["stage=unlearn", "unlearn.nullspace.general.source=hub"]
    listed = [
        str(s)
        for s in requires.hub_sources(compose([*hub, "unlearn.nullspace.key_source=general"]))
    ]
    assert "unlearn.nullspace.general (wikitext)" in listed
    assert not any("general" in s for s in map(str, requires.hub_sources(compose(hub))))


@pytest.mark.parametrize("keys", ["retain", "general", "retain+general"])
def test_auto_tune_reads_its_stability_figure_on_held_out_general_text(
    tiny, tmp_path, monkeypatch, keys
):
    """With general keys, the tuner's perplexity and agreement texts are the general source's
    held-out texts, none of them a key; with retain keys, the retain passages (None)."""
    from kuda_cli.compose import compose
    from kuda_cli.unlearn import auto_tune

    model, tokenizer = tiny
    texts = [f"{t} Number {i}." for i, t in enumerate(GENERAL * 12)]
    ctx = context(model, tokenizer, tmp_path, keys, local_source(tmp_path, texts, 40))
    seen = []

    class Stop(Exception):
        pass

    def scorer(*args, texts=None, **kwargs):
        seen.append(texts)
        raise Stop

    monkeypatch.setattr(auto_tune, "Scorer", scorer)
    data = compose(["stage=unlearn", "model=tiny-random"]).data
    with pytest.raises(Stop):
        auto_tune.tune(ctx.cfg, data, ctx, None, None)
    if keys == "retain":
        assert seen == [None]
        return
    chosen = general_texts(ctx, ctx.cfg.nullspace.general, 40)
    assert seen == [chosen.heldout] and len(chosen.heldout) == general_keys.TUNER_TEXTS
    assert not set(chosen.heldout) & set(chosen.keys)
