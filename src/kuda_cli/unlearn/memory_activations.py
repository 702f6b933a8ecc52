"""Activation memory of training forwards and backwards, per token: what autograd keeps of each
decoder layer and the temporaries of the forward, the backward and the losses, calibrated on
transformers' Llama/Mistral layers. The memory plan (unlearn/memory_plan.py) adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Activation bytes per token of transformers' Llama/Mistral decoder layers (sdpa attention), as
# (x d_ff, x hidden) in bf16, x e/2 for other element sizes; measured with the CPU check's
# allocator trace on bf16 models of several widths (torch 2.13, transformers 5; docs/scale.md).
PER_TOKEN = {
    "trained_layer": (8, 23),  # every weight trains: their inputs are kept too
    "frozen_layer": (6, 13.2),  # frozen weights, the gradient flows through (gate, act, up, ...)
    "down_input": (2, 0),  # the down_proj input, kept where down_proj trains
    "nograd_layer": (6, 9),  # the largest live set inside a layer without autograd
    "forward_tmp": (0, 20),  # float32 temporaries of the norms and the losses
    "backward_tmp": (4, 6),  # gradient buffers inside a layer's backward
    "backward_fp32": (0, 16),  # ... and of a float32 loss on hidden states
}
# x vocab: the log-softmax kept for backward, the forward's and backward's temporaries at the
# logits (their float copy, the gradient), and a no-grad forward's peak there (reference log-p)
PER_TOKEN_VOCAB = {"log_softmax": 4, "forward_tmp": 6, "backward_tmp": 8, "nograd": 10}


@dataclass(frozen=True)
class Dims:
    hidden: int
    ffn: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.vocab_size,
        )

    def per_token(self, key: str, e: int) -> float:
        ffn, hidden = PER_TOKEN[key]
        return (ffn * self.ffn + hidden * self.hidden) * e / 2

    def per_site(self, site_bytes: int, e: int) -> float:
        """Per token: what a loss keeps at one hidden-state site (`Method.LossReach`)."""
        return site_bytes * self.hidden * e / 2

    def per_vocab(self, key: str, e: int) -> float:
        return PER_TOKEN_VOCAB[key] * self.vocab * e / 2


def layer_of(name: str, adapter) -> int | None:
    prefix = adapter.layers + "."
    return int(name[len(prefix) :].split(".", 1)[0]) if name.startswith(prefix) else None


@dataclass
class Activations:
    """The per-token cost of one run's training forwards, from the tensors it trains."""

    d: Dims
    e: int  # bytes per element of the weights
    adapter: Any
    trained: dict[str, tuple[int, int]]  # name -> (elements, bytes per element)
    full: bool  # every parameter trains

    def __post_init__(self):
        self.by_layer: dict[int | None, list[str]] = {}  # trained tensors (None: outside layers)
        for name in self.trained:
            self.by_layer.setdefault(layer_of(name, self.adapter), []).append(name)
        self.first = 0 if None in self.by_layer else min(self.by_layer)  # autograd's first layer
        self.biggest = max(k for k, _ in self.trained.values())  # the largest trained tensor

    def kept(self, i: int) -> float:
        """Per token: what autograd keeps of decoder layer `i` in a training forward."""
        d, e, names = self.d, self.e, self.by_layer.get(i, [])
        down = self.adapter.module_name("down_proj", i) + "."
        only_down = bool(names) and all(n.startswith(down) for n in names)
        if self.full or (names and not only_down):
            return d.per_token("trained_layer", e)
        if i == self.first:
            return d.per_token("down_input", e)
        return d.per_token("frozen_layer", e) + (d.per_token("down_input", e) if names else 0)

    def one_pass(self, reach) -> dict[str, float]:
        """Per token of the batch: what a training forward to layer `reach.last_layer` keeps,
        and its temporaries, over its `reach.rows` sequences per item (`reach`: a
        `Method.LossReach`)."""
        d, e = self.d, self.e
        keep = sum(self.kept(i) for i in range(self.first, reach.last_layer + 1))
        fwd, bwd = d.per_token("forward_tmp", e), d.per_token("backward_tmp", e)
        if reach.sites:
            keep += reach.sites * d.per_site(reach.site_bytes, e)
            bwd = max(bwd, d.per_token("backward_fp32", e))
        if reach.logits:
            keep += d.per_vocab("log_softmax", e)
            fwd = max(fwd, d.per_vocab("forward_tmp", e))
            bwd = max(bwd, d.per_vocab("backward_tmp", e))
        return {"kept": reach.rows * keep, "fwd": reach.rows * fwd, "bwd": reach.rows * bwd}

    def training(self, n_tok: int, passes: list[dict], grads: float, grad_tmp: float) -> dict:
        """The worst moment of forward + backward over `n_tok` tokens: the forward's end, the
        backward's start, or its end (all gradients, the activations gone)."""
        e, biggest = self.e, self.biggest
        act = n_tok * sum(p["kept"] for p in passes)
        fwd = act + n_tok * max(p["fwd"] for p in passes)
        bwd = act + max(n_tok * max(p["bwd"] for p in passes), grad_tmp)
        end = grads + e * biggest
        worst = max(fwd, bwd, end)
        if worst == end:
            return {
                "gradients (backward's end)": grads,
                "a gradient in the model dtype": e * biggest,
            }
        return {"activations": act, "temporaries": worst - act}
