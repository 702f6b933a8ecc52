"""Adaptive RMU (Dang et al. 2025, "On effects of steering latent representation for large
language model unlearning"): RMU (rmu.py) with the steering coefficient set from the model's
own activations instead of a fixed c:

    c = beta * mean over the sequences i of the first forget batch of
               mean over the counted tokens t of  ||h_start(x_{i,t})||

with h_start the starting model's residual stream after `steer_layer`. As the authors' code
(RebelsNLU-jaist/llm-unlearning, baselines/adap_rmu/unlearn.py): one coefficient, measured on the
first forget batch before any update (`--scale` there is beta, default 5) and then fixed, not a
coefficient per sample; their per-sequence mean counts padding tokens, kuda's does not (equal on a
batch without padding), and counts the tokens RMU's loss does (`counted_tokens`: on TOFU with
`data.loss_tokens: answer`, the answer's). Their code alternates two forget corpora and measures one
coefficient on each corpus's first batch (the second one after one update); a kuda run has one
corpus. Everything else is RMU's: the target c * u, the retain MSE with weight alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kuda_cli.config import bounded
from kuda_cli.unlearn.batches import batch_indices
from kuda_cli.unlearn.methods import counted_tokens, register_method
from kuda_cli.unlearn.methods.rmu import Rmu, SteeringConfig


def mean_token_norm(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the mean over their tokens where `mask` is 1 of ||h_t||
    (float32)."""
    norms = h.float().norm(dim=-1)
    weights = mask.to(norms.dtype)
    return ((norms * weights).sum(1) / weights.sum(1).clamp_min(1)).mean()


@dataclass
class AdaptiveRmuMethod(SteeringConfig):
    method: str = "adaptive_rmu"
    beta: float = bounded(5.0, gt=0)  # c = beta x the forget activations' mean norm


@register_method("adaptive_rmu", AdaptiveRmuMethod)
class AdaptiveRmu(Rmu):
    display_name = "Adaptive RMU"
    coefficient: float | None = None  # set in prepare

    @torch.no_grad()
    def steering_coefficient(self) -> float:
        """beta x the mean token norm at `steer_layer` of the first forget batch the trainer
        draws, on the starting weights (`prepare` runs before a resumed run loads its
        checkpoint)."""
        ctx = self.ctx
        first = batch_indices(len(ctx.forget), self.cfg.batch_size, 0, ctx.seed)
        batch = ctx.forget.batch(first, next(ctx.model.parameters()).device)
        norm = mean_token_norm(self.activations(batch), counted_tokens(batch))
        self.coefficient = self.cfg.beta * float(norm)
        return self.coefficient

    def diagnostics(self, params) -> dict[str, Any]:
        return {"steering_coefficient": self.coefficient}
