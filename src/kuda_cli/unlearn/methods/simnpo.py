"""SimNPO (Fan et al. 2024): NPO without a reference model, length-normalised, with a margin:

    -(2/beta) * mean_i log sigmoid(-(beta/|y_i|) * log p_theta(y_i) - gamma)
      + retain_weight * NLL_retain

with log p(y) the summed log-probability of a forget sequence's |y| non-padding tokens. The loss
falls towards 0 (never below) as the forget log-probability falls. (The authors' code writes
the margin as `delta` inside the product with beta: gamma = beta * delta.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kuda_cli.config import UnlearnConfig, bounded, listed
from kuda_cli.unlearn.methods import Method, register_method, sequence_logprob, with_retain_nll


def simnpo_loss(
    logp: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    per_token = logp / lengths.clamp_min(1)
    return -(2.0 / beta) * F.logsigmoid(-beta * per_token - gamma).mean()


@dataclass
class SimNpoMethod(UnlearnConfig):
    method: str = "simnpo"
    trainable: list[str] = listed("all", distinct=True)
    beta: float = bounded(2.5, gt=0)
    gamma: float = bounded(0.0, ge=0)  # margin (the authors' code: delta = gamma / beta)
    retain_weight: float = bounded(1.0, ge=0)


@register_method("simnpo", SimNpoMethod)
class SimNpo(Method):
    display_name = "SimNPO"

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        logp, lengths = sequence_logprob(self.ctx.model, forget)
        forget_term = simnpo_loss(logp, lengths, self.cfg.beta, self.cfg.gamma)
        terms = {
            "simnpo": float(forget_term.detach()),
            "forget_nll": -float((logp.sum() / lengths.sum().clamp_min(1)).detach()),
        }
        return with_retain_nll(
            self.ctx.model, forget_term, retain, self.cfg.retain_weight, terms
        ), terms
