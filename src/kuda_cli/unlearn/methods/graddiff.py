"""Gradient difference (GradDiff): ascent on the forget NLL, descent on the retain NLL,
`-forget_weight * NLL_forget + retain_weight * NLL_retain` (token averages). With
`retain_loss: kl` the retain term is the KL from the starting model's next-token distributions
to the current model's on the retain batch (open-unlearning's `retain_loss_type: KL`, MUSE's
`GA_KLR`; unlearn/retain_kl.py says where the two differ)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuda_cli.config import UnlearnConfig, bounded, choice, listed
from kuda_cli.unlearn.methods import Method, register_method, sequence_logprob
from kuda_cli.unlearn.methods.ga import ga_loss
from kuda_cli.unlearn.retain_kl import RetainKl, retain_reference, with_retain_term


@dataclass
class GradDiffMethod(UnlearnConfig):
    method: str = "graddiff"
    lr: float = bounded(1e-5, gt=0)
    trainable: list[str] = listed("all", distinct=True)
    forget_weight: float = bounded(1.0, ge=0)
    retain_weight: float = bounded(1.0, ge=0)
    retain_loss: str = choice("nll", "nll", "kl")  # kl: to the starting model (retain_kl.py)


@register_method("graddiff", GradDiffMethod)
class GradDiff(RetainKl, Method):
    display_name = "GradDiff"

    def prepare(self) -> None:
        self.retain_reference = retain_reference(self.ctx, self.cfg)

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        logp, lengths = sequence_logprob(self.ctx.model, forget)
        forget_term = ga_loss(logp, lengths)
        terms = {"forget_nll": -float(forget_term.detach())}
        loss = self.cfg.forget_weight * forget_term
        return with_retain_term(
            self.ctx.model, loss, retain, self.cfg.retain_weight, terms, self.retain_reference
        ), terms
