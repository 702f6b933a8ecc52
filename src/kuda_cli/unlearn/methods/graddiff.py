"""Gradient difference (GradDiff): ascent on the forget NLL, descent on the retain NLL,
`-forget_weight * NLL_forget + retain_weight * NLL_retain` (token averages)."""

from __future__ import annotations

import torch

from kuda_cli.unlearn.methods import Method, register_method, sequence_logprob, with_retain_nll
from kuda_cli.unlearn.methods.ga import ga_loss


@register_method("graddiff")
class GradDiff(Method):
    @property
    def needs_retain(self) -> bool:  # type: ignore[override]
        return self.cfg.retain_weight > 0

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        logp, lengths = sequence_logprob(self.ctx.model, forget)
        forget_term = ga_loss(logp, lengths)
        terms = {"forget_nll": -float(forget_term.detach())}
        loss = self.cfg.forget_weight * forget_term
        return with_retain_nll(self.ctx.model, loss, retain, self.cfg.retain_weight, terms), terms
