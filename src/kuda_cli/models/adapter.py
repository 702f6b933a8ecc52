"""Architecture adapters: the one place that names the modules of each supported model family.

Tracing, the losses, RMU and key collection ask an adapter for "the MLP of layer 7" or "the
down_proj of layer 5" instead of spelling module paths themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kuda_cli.errors import UserError

MODULE_KINDS = ("down_proj", "mlp", "attn", "layer")
TRAINABLE_KINDS = (*MODULE_KINDS, "all")  # what unlearn.trainable may name


@dataclass(frozen=True)
class Adapter:
    family: str
    embed: str  # token embedding
    layers: str  # the ModuleList of decoder blocks
    mlp: str  # relative to a block
    down_proj: str  # the MLP's output matrix, relative to a block
    attn: str  # relative to a block
    final_norm: str
    lm_head: str
    # GPT-2's Conv1D stores the weight as (in, out); nn.Linear as (out, in).
    down_proj_weight_is_in_out: bool = False

    def layer_name(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def module_name(self, kind: str, i: int) -> str:
        """Dotted name of `kind` (layer|mlp|down_proj|attn) in block `i`."""
        if kind == "layer":
            return self.layer_name(i)
        if kind not in MODULE_KINDS:
            raise ValueError(f"unknown module kind {kind!r}; expected one of {MODULE_KINDS}")
        return f"{self.layer_name(i)}.{getattr(self, kind)}"

    def num_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.layers))

    def module(self, model: nn.Module, kind: str, i: int) -> nn.Module:
        return model.get_submodule(self.module_name(kind, i))

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed)

    def down_proj_weight(self, model: nn.Module, i: int):
        """The down_proj weight as (out, in), a view of the parameter (no copy)."""
        weight = self.module(model, "down_proj", i).weight
        return weight.T if self.down_proj_weight_is_in_out else weight


_LLAMA_LIKE = dict(
    embed="model.embed_tokens",
    layers="model.layers",
    mlp="mlp",
    down_proj="mlp.down_proj",
    attn="self_attn",
    final_norm="model.norm",
    lm_head="lm_head",
)

ADAPTERS: dict[str, Adapter] = {
    **{
        model_type: Adapter(family=model_type, **_LLAMA_LIKE)
        for model_type in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo2",
            "phi3",
        )
    },
    "gpt2": Adapter(
        family="gpt2",
        embed="transformer.wte",
        layers="transformer.h",
        mlp="mlp",
        down_proj="mlp.c_proj",
        attn="attn",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        down_proj_weight_is_in_out=True,
    ),
}


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model (or its config); a clear error for unsupported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise UserError(
            f"model type {model_type!r} is not supported by kuda's architecture adapters; "
            f"supported: {supported} (add one in kuda_cli/models/adapter.py)"
        )
    return ADAPTERS[model_type]
