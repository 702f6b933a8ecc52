"""The architecture adapter names the right modules on each supported family; the hook utility
reads inputs and outputs, replaces outputs, stops early and cleans up."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from kuda_cli.errors import UserError
from kuda_cli.models.adapter import ADAPTERS, get_adapter
from kuda_cli.models.hooks import trace

HIDDEN, FF, LAYERS = 32, 64, 3
LLAMA_STYLE = dict(
    vocab_size=100,
    hidden_size=HIDDEN,
    intermediate_size=FF,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build(config_class, **kwargs):
    torch.manual_seed(0)
    config = config_class(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


FAMILIES = {
    "llama": lambda: build(transformers.LlamaConfig, **LLAMA_STYLE),
    "mistral": lambda: build(transformers.MistralConfig, **LLAMA_STYLE),
    "qwen2": lambda: build(transformers.Qwen2Config, **LLAMA_STYLE),
    "qwen3": lambda: build(transformers.Qwen3Config, head_dim=8, **LLAMA_STYLE),
    "gemma": lambda: build(transformers.GemmaConfig, head_dim=8, **LLAMA_STYLE),
    "gpt2": lambda: build(
        transformers.GPT2Config, vocab_size=100, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_inner=FF
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_finds_embedding_layers_mlp_down_proj_and_attention(family):
    model = FAMILIES[family]()
    adapter = get_adapter(model)
    assert adapter.family == family
    assert adapter.num_layers(model) == LAYERS
    assert adapter.embedding(model).weight.shape == (100, HIDDEN)
    for i in range(LAYERS):
        block = adapter.module(model, "layer", i)
        assert block is model.get_submodule(adapter.layers)[i]
        assert adapter.module(model, "mlp", i) in block.modules()
        assert adapter.module(model, "attn", i) in block.modules()
        down = adapter.module(model, "down_proj", i)
        assert down in adapter.module(model, "mlp", i).modules()
        # the down projection maps the FF width back to the model width, (out, in) oriented
        assert adapter.down_proj_weight(model, i).shape == (HIDDEN, FF)
        assert adapter.down_proj_weight(model, i).data_ptr() == down.weight.data_ptr()
    assert isinstance(model.get_submodule(adapter.final_norm), nn.Module)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_down_proj_input_and_output_are_its_keys_and_values(family):
    """What the hook captures at down_proj is exactly the x and W x of that matrix."""
    model = FAMILIES[family]()
    adapter = get_adapter(model)
    name = adapter.module_name("down_proj", 1)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad(), trace(model, [name], inputs=True) as rec:
        model(input_ids=ids)
    keys, values = rec[name].input, rec[name].output
    assert keys.shape == (2, 7, FF)
    weight = adapter.down_proj_weight(model, 1)
    bias = getattr(adapter.module(model, "down_proj", 1), "bias", None)
    expected = keys @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_names_the_model_type():
    config = transformers.OPTConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        ffn_dim=FF,
        num_attention_heads=4,
        word_embed_proj_dim=HIDDEN,
    )
    with pytest.raises(UserError, match="'opt' is not supported"):
        get_adapter(config)


def test_every_adapter_names_modules_consistently():
    for adapter in ADAPTERS.values():
        assert adapter.module_name("down_proj", 2).startswith(adapter.layer_name(2) + ".")
        assert adapter.module_name("layer", 2) == adapter.layer_name(2)


def test_hooks_read_block_outputs_equal_to_hidden_states(tiny):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    names = [adapter.layer_name(i) for i in range(adapter.num_layers(model))]
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad(), trace(model, names) as rec:
        out = model(**batch, output_hidden_states=True)
    # hidden_states[i + 1] is block i's output (the last one after the final norm)
    for i, name in enumerate(names[:-1]):
        torch.testing.assert_close(rec[name].output, out.hidden_states[i + 1])


def test_replacing_an_output_changes_the_forward_pass_as_specified(tiny):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    mlp = adapter.module_name("mlp", 1)
    batch = tokenizer(["Water boils at"], return_tensors="pt")
    with torch.no_grad():
        clean = model(**batch).logits
        with trace(model, [], edit={mlp: lambda out: out}):
            same = model(**batch).logits
        with trace(model, [mlp], edit={mlp: torch.zeros_like}) as rec:
            ablated = model(**batch).logits
    torch.testing.assert_close(same, clean)
    assert not torch.allclose(ablated, clean)
    assert torch.count_nonzero(rec[mlp].output) == 0  # the record holds the replaced output


def test_restoring_a_block_output_restores_everything_downstream(tiny):
    """Patch block 0's output from a clean run into a corrupted run: the logits become clean."""
    model, tokenizer = tiny
    adapter = get_adapter(model)
    first = adapter.layer_name(0)
    emb = adapter.embed
    batch = tokenizer(["Paris is the capital"], return_tensors="pt")
    with torch.no_grad():
        with trace(model, [first]) as rec:
            clean = model(**batch).logits
        saved = rec[first].output.clone()
        noise = {emb: lambda out: out + torch.randn_like(out)}
        with trace(model, [], edit=noise):
            corrupted = model(**batch).logits
        with trace(model, [], edit={**noise, first: lambda out: saved}):
            restored = model(**batch).logits
    assert not torch.allclose(corrupted, clean)
    torch.testing.assert_close(restored, clean)


def test_stop_after_skips_later_layers_and_hooks_are_removed(tiny):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    batch = tokenizer(["hello"], return_tensors="pt")
    last = adapter.layer_name(adapter.num_layers(model) - 1)
    with (
        torch.no_grad(),
        trace(model, [adapter.layer_name(0), last], stop_after=adapter.layer_name(0)) as rec,
    ):
        model(**batch)
    assert rec[adapter.layer_name(0)].output is not None
    assert rec[last].output is None  # never computed
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_detach_keeps_records_out_of_the_graph(tiny):
    model, tokenizer = tiny
    name = get_adapter(model).module_name("mlp", 0)
    batch = tokenizer(["hello"], return_tensors="pt")
    with trace(model, [name], detach=True) as rec:
        model(**batch)
    assert not rec[name].output.requires_grad
    with trace(model, [name]) as rec:
        model(**batch)
    assert rec[name].output.requires_grad
