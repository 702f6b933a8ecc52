"""Unlearning methods, registered by name: `unlearn.method` picks one.

A method is one module: its config schema (a dataclass extending `kuda_cli.config.UnlearnConfig`)
and a class with `@register_method(name, Schema)`, plus one YAML in conf/unlearn/ starting from
`/schema/unlearn/<name>`, found as `kuda_cli.plugins` finds every plug-in (a method outside kuda:
an entry point of the group `kuda_cli.methods`, `name = "package.module"`). The class owns
everything about the method: its display name, its checks across config groups, whether LoRA can
train it, the settings `kuda report` shows, the memory planner's terms. The method says which
parameters train, precomputes what it compares against (original representations, reference
log-probabilities) in `prepare`, and returns its loss and the loss terms to log for a forget
batch (and a retain batch when `needs_retain` is set); `finalise` may change the trained weights
once after the last step. The trainer does everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kuda_cli.models.adapter import Adapter
from kuda_cli.plugins import Registry
from kuda_cli.unlearn.batches import TokenSet

REGISTRY = Registry("method", __name__, "kuda_cli.methods", "unlearn.method")


def method_modules() -> dict[str, str]:
    """Method name -> its module: this package's modules, then the entry points'."""
    return REGISTRY.modules()


def method_schemas() -> dict[str, type]:
    """Method name -> its config schema (imports every method module)."""
    return {name: method.schema for name, method in REGISTRY.all().items()}


@dataclass
class MethodContext:
    model: nn.Module
    adapter: Adapter
    tokenizer: Any
    layers: list[int]  # the located (or given) layers
    cfg: Any  # the method's config dataclass (kuda_cli.config.*Method)
    forget: TokenSet
    retain: TokenSet
    forget_used: list[int]  # forget items the trainer will draw, in no particular order
    retain_used: list[int]
    forget_heldout: TokenSet | None = None  # never trained on: KRD
    work_dir: Path | None = None  # the run directory: disk stores go here
    cache_dir: Path | None = None  # shared caches (null-space spectra)
    model_key: str = ""  # content fingerprint of the starting model
    seed: int = 0
    data: Any = None  # the data group's config (a dataclass): what a method may ask its kind
    # the evaluation's texts (perplexity), read when called: a method never keeps them as keys
    eval_texts: Callable[[], list[str]] | None = None


class Method:
    """Base class: trainable parameters by `cfg.trainable` x layers, no projection."""

    name = ""
    schema: type = object  # set by register_method
    display_name = ""  # in tables and plots; register_method: the name in capitals by default
    # whether unlearn.lora (adapters instead of the weights) can train it: not when the loss or
    # the projector reads the weights of named modules
    supports_lora = True
    lora_refusal = "trains named modules' weights"  # why not, in unlearn.lora's error line

    @classmethod
    def check_config(cls, cfg) -> None:
        """Checks across config groups before any work (`cfg`: the whole composed config), each
        a ConfigError of one line; the schema's own field checks have run already."""

    @classmethod
    def layer_options(cls, unlearn) -> list[tuple[str, list[int]]]:
        """(key, layers) of the layer indices this method's options name, checked against the
        model's depth with locate.layers and unlearn.layers."""
        return []

    @classmethod
    def hub_sources(cls, cfg) -> list:
        """Each hub dataset its options name (`HubSource`s), for the offline checks before any
        work (kuda_cli.requires)."""
        return []

    @classmethod
    def report_settings(cls, unlearn: dict[str, Any]) -> list[tuple[str, Any]]:
        """(label, value) pairs `kuda report` adds to a run's settings cell after the scalar
        fields of the method's schema (nested options, e.g. KUDA's null space)."""
        return []

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    @property
    def needs_retain(self) -> bool:
        """Whether the loss reads a retain batch: a positive `retain_weight` (a method without
        one reads none, unless it says otherwise)."""
        return getattr(self.cfg, "retain_weight", 0) > 0

    @property
    def trained_layers(self) -> list[int]:
        return list(self.cfg.layers) if self.cfg.layers is not None else list(self.ctx.layers)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return select_parameters(
            self.ctx.model, self.ctx.adapter, list(self.cfg.trainable), self.trained_layers
        )

    def prepare(self) -> None:
        """Precompute before the first step (runs again on resume, deterministically)."""

    def projector(self, params: dict[str, nn.Parameter]):
        """An UpdateProjector for `params`, or None."""
        return None

    def tuning_texts(self) -> list[str] | None:
        """The texts unlearn.auto_tune reads its perplexity and agreement on (None: the retain
        facts' passages)."""
        return None

    def initialise(self, params: dict[str, nn.Parameter], projector) -> None:
        """Change the trained weights before the first step (not on resume)."""

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def finalise(self, params: dict[str, torch.Tensor]) -> None:
        """Change the trained weights after the last step, before the final checkpoint is saved
        and the model evaluated (`params`: what the optimiser updated, float32 master copies
        where kept). Not called when a run resumes from its final checkpoint: that holds the
        finalised weights already."""

    def diagnostics(self, params: dict[str, nn.Parameter]) -> dict[str, Any]:
        """Method-specific figures computed after training (e.g. KUDA's KRD)."""
        return {}

    def close(self) -> None:
        """Release precomputed stores."""

    # What the memory plan (unlearn/memory_plan.py) reads of a method; nothing here allocates.
    memory_target: float | None = None  # the most its peak may be, x the bf16 weights

    class LossReach(NamedTuple):
        """How far a loss's training forward runs, and what it keeps there."""

        last_layer: int  # the deepest decoder layer the forward runs
        logits: bool  # whether it reaches the logits (a log-softmax over the vocabulary kept)
        sites: int = 0  # hidden states it compares with a float32 loss (cosine, MSE)
        site_bytes: int = 0  # bytes per token and hidden unit each such site keeps, in bf16
        rows: int = 1  # sequences the forward runs per batch item (IdkDPO: both answers)

    def forget_reach(self, num_layers: int) -> Method.LossReach:
        """The forget loss's forward: by default every layer to the logits (a next-token loss)."""
        return self.LossReach(num_layers - 1, logits=True)

    def retain_reach(self, num_layers: int) -> Method.LossReach:
        """The retain loss's forward: by default the retain NLL (every layer, the logits)."""
        return self.LossReach(num_layers - 1, logits=True)

    @property
    def recorded_sites(self) -> int:
        """Hidden-state sites per item whose originals `prepare` records and stores (0: none)."""
        return 0

    @property
    def precomputes_reference(self) -> bool:
        """Whether `prepare` runs a no-grad forward to the logits over the forget items (a
        reference model's log-probabilities)."""
        return False

    @property
    def nullspace_settings(self) -> Any:
        """The null-space settings (`NullspaceConfig`) when the update is projected, else None."""
        return None


def select_parameters(
    model: nn.Module, adapter: Adapter, kinds: list[str], layers: list[int]
) -> dict[str, nn.Parameter]:
    """The parameters of the module kinds (`down_proj`, `mlp`, `attn`, `layer`) of `layers`,
    or every parameter for `all`."""
    if "all" in kinds:
        return dict(model.named_parameters())
    chosen: dict[str, nn.Parameter] = {}
    for layer in layers:
        for kind in kinds:
            prefix = adapter.module_name(kind, layer)
            for name, param in adapter.module(model, kind, layer).named_parameters():
                chosen[f"{prefix}.{name}"] = param
    return chosen


def register_method(name: str, schema: type):
    """Register a Method subclass as `name`, with the dataclass its config follows."""

    def wrap(cls):
        cls.display_name = cls.__dict__.get("display_name") or name.upper()
        return REGISTRY.register(name, schema)(cls)

    return wrap


def get_method(name: str) -> type[Method]:
    return REGISTRY.get(name, " (unlearn=NAME picks its config)")


def lora_methods() -> list[str]:
    """The registered methods that unlearn.lora can train."""
    return [name for name, method in REGISTRY.all().items() if method.supports_lora]


def counted_tokens(batch: dict) -> torch.Tensor:
    """(batch, width): 1 at the tokens a loss counts: the answer's (`label_mask`) where the data
    has prompts, else every non-padding token (`attention_mask`); 0 at padding."""
    return batch["label_mask"] if "label_mask" in batch else batch["attention_mask"]


def predicted_tokens(batch: dict) -> torch.Tensor:
    """(batch, width - 1), bool: the counted tokens from the second on, as a next-token loss
    reads them (position t: the prediction of token t + 1)."""
    return counted_tokens(batch)[:, 1:].bool()


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """Mean next-token NLL over the counted tokens of a batch (token-weighted)."""
    logp, tokens = sequence_logprob(model, batch)
    return -logp.sum() / tokens.sum()


def sequence_logprob(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of each counted token (`predicted_tokens`) given
    the ones before it, and how many tokens that is (|y|)."""
    mask = predicted_tokens(batch)
    return token_logprobs(model, batch).masked_fill(~mask, 0.0).sum(1), mask.sum(1)


def token_logprobs(model, batch: dict) -> torch.Tensor:
    """(batch, width - 1): the float32 log-probability of each token from the second on, given
    the ones before it (any value at padding)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:]
    return -torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
    ).view_as(targets)


def with_retain_nll(
    model, loss: torch.Tensor, retain: dict | None, weight: float, terms: dict[str, float]
) -> torch.Tensor:
    """`loss + weight * NLL(retain)`, logging `retain_nll`; `loss` alone without a retain batch
    (the gradient-conflict diagnostic asks for the forget term only)."""
    if retain is None or weight == 0:
        return loss
    nll = sequence_nll(model, retain)
    terms["retain_nll"] = float(nll.detach())
    return loss + weight * nll
