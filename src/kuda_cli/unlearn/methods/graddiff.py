"""Gradient difference (GradDiff): ascent on the forget NLL, descent on the retain NLL,
`-forget_weight * NLL_forget + retain_weight * NLL_retain` (token averages)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuda_cli.config import UnlearnConfig, bounded, listed
from kuda_cli.unlearn.methods import Method, register_method, sequence_logprob, with_retain_nll
from kuda_cli.unlearn.methods.ga import ga_loss


@dataclass
class GradDiffMethod(UnlearnConfig):
    method: str = "graddiff"
    lr: float = bounded(1e-5, gt=0)
    trainable: list[str] = listed("all", distinct=True)
    forget_weight: float = bounded(1.0, ge=0)
    retain_weight: float = bounded(1.0, ge=0)


@register_method("graddiff", GradDiffMethod)
class GradDiff(Method):
    display_name = "GradDiff"

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        logp, lengths = sequence_logprob(self.ctx.model, forget)
        forget_term = ga_loss(logp, lengths)
        terms = {"forget_nll": -float(forget_term.detach())}
        loss = self.cfg.forget_weight * forget_term
        return with_retain_nll(self.ctx.model, loss, retain, self.cfg.retain_weight, terms), terms
