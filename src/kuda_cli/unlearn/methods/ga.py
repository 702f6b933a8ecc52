"""Gradient ascent (GA): maximise the forget NLL. The loss is the mean log-probability of the
forget tokens (= -NLL, averaged over non-padding tokens); it has no lower bound, so GA runs until
it is stopped, usually into gibberish."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuda_cli.config import UnlearnConfig, bounded, listed
from kuda_cli.unlearn.methods import Method, register_method, sequence_logprob


def ga_loss(logp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """-NLL of a batch from per-sequence summed log-probs and token counts (token average)."""
    return logp.sum() / lengths.sum().clamp_min(1)


@dataclass
class GaMethod(UnlearnConfig):
    method: str = "ga"
    lr: float = bounded(1e-5, gt=0)
    trainable: list[str] = listed("all", distinct=True)


@register_method("ga", GaMethod)
class Ga(Method):
    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        logp, lengths = sequence_logprob(self.ctx.model, forget)
        loss = ga_loss(logp, lengths)
        return loss, {"forget_nll": -float(loss.detach())}
