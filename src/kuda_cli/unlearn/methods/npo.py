"""Negative preference optimisation (NPO, Zhang et al. 2024) with a retain NLL term:

    -(2/beta) * mean_i log sigmoid(-beta * (log p_theta(y_i) - log p_ref(y_i)))
      + retain_weight * NLL_retain

with log p(y) the summed log-probability of a forget sequence's non-padding tokens. The loss is
(2/beta) log 2 at the reference and falls to 0 (never below) as the forget log-probability
falls: unlike GA it is bounded. The reference is the starting model; its log-probabilities are
computed once in `prepare`, for every forget item the trainer will draw, and kept by item index:
no second model copy. `prepare` runs in `Trainer.setup`, before a resumed run loads its
checkpoint, so on resume they come from the original weights again. With `retain_loss: kl` the
retain term is the KL from the starting model's next-token distributions to the current model's
on the retain batch (open-unlearning's `retain_loss_type: KL`, MUSE's `NPO_KLR`; unlearn/
retain_kl.py says where the two differ), its reference recorded in `prepare` as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kuda_cli.config import UnlearnConfig, bounded, choice, listed
from kuda_cli.models.precision import autocast
from kuda_cli.unlearn.batches import TokenSet
from kuda_cli.unlearn.methods import Method, register_method, sequence_logprob
from kuda_cli.unlearn.retain_kl import RetainKl, retain_reference, with_retain_term


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


@torch.no_grad()
def reference_logprobs(
    model, tokens: TokenSet, indices: list[int], precision: str, batch_size: int
) -> dict[int, float]:
    """Summed log-probability of each item `indices` under `model` as it is now."""
    device = next(model.parameters()).device
    order = sorted(dict.fromkeys(indices), key=lambda i: len(tokens.ids[i]))
    out: dict[int, float] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        with autocast(precision, device):
            logp, _ = sequence_logprob(model, tokens.batch(chunk, device))
        out.update(zip(chunk, logp.tolist(), strict=True))
    return out


@dataclass
class NpoMethod(UnlearnConfig):
    method: str = "npo"
    trainable: list[str] = listed("all", distinct=True)
    beta: float = bounded(0.1, gt=0)
    retain_weight: float = bounded(1.0, ge=0)
    retain_loss: str = choice("nll", "nll", "kl")  # kl: to the starting model (retain_kl.py)


@register_method("npo", NpoMethod)
class Npo(RetainKl, Method):
    def prepare(self) -> None:
        ctx = self.ctx
        self.reference = reference_logprobs(
            ctx.model, ctx.forget, ctx.forget_used, self.cfg.precision, self.cfg.batch_size
        )
        self.retain_reference = retain_reference(ctx, self.cfg)

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        logp, _ = sequence_logprob(self.ctx.model, forget)
        ref = torch.tensor([self.reference[i] for i in forget["index"]], device=logp.device)
        forget_term = npo_loss(logp, ref, self.cfg.beta)
        terms = {
            "npo": float(forget_term.detach()),
            "forget_logratio": float((logp - ref).detach().mean()),
        }
        weight, reference = self.cfg.retain_weight, self.retain_reference
        return with_retain_term(
            self.ctx.model, forget_term, retain, weight, terms, reference
        ), terms

    @property
    def precomputes_reference(self) -> bool:  # the memory plan's view (unlearn/memory_plan.py)
        """`prepare` computes the reference log-probabilities of the forget items."""
        return True
