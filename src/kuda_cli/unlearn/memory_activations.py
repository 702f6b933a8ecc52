"""Activation memory of training forwards and backwards, per token: what autograd keeps of each
decoder layer and the temporaries of the forward, the backward and the losses, calibrated on
transformers' Llama/Mistral layers. The memory plan (unlearn/memory_plan.py) adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass

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
