"""UNDIAL (Dong et al. 2024, self-distillation with adjusted logits): the model is trained
towards its own starting distribution with the logit of each forget token lowered by beta,

    forget_weight * mean_t CE(softmax(z_ref_t - beta * onehot(x_t+1)), softmax(z_t))
      + retain_weight * NLL_retain

with z_t and z_ref_t the current and the starting model's logits after the tokens x_<=t, over
the positions t whose next token counts (`counted_tokens`: not padding; on TOFU with
`data.loss_tokens: answer`, the answer's tokens) (CE(q, p) = -sum_v q_v log p_v: the
soft-label cross-entropy, the KL from the target plus the target's entropy). The target puts
less mass on the token that came next and spreads it over the others in the starting model's
proportions: unlike GA's, the loss has a minimum (the target itself). As open-unlearning's
`UNDIAL` (src/trainer/unlearn/undial.py, `compute_undial_loss` in src/trainer/utils.py), which
averages over every position of the batch, padding included, and at a position whose label is
-100 (padding, a question's tokens) lowers the logit of the token vocab_size - 100 (a negative
index): kuda counts only the positions whose next token is a label.

The teacher is the starting model, without a second copy of it: `prepare` records the final
norm's output at every forget item the trainer will draw and keeps the LM head's starting
weights (`retain_kl.ReferenceLogits`, as the KL retain term's reference); one vocabulary-wide
row per token is never stored. With `retain_loss: kl` the retain term is the KL to the starting
model on the retain batch (unlearn/retain_kl.py), sharing the copy of the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuda_cli.config import UnlearnConfig, bounded, choice, listed
from kuda_cli.unlearn.methods import Method, counted_tokens, register_method
from kuda_cli.unlearn.retain_kl import ReferenceLogits, RetainKl, retain_reference, with_retain_term


def undial_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean over the positions whose next token counts (`mask`: the counted tokens, 0 at
    padding) of the cross-entropy from softmax(ref_logits - beta * onehot(next token)) to
    softmax(logits), in float32; the others contribute nothing, not even a gradient."""
    targets = input_ids[:, 1:, None]
    ref = ref_logits[:, :-1].float()
    adjusted = ref.scatter(-1, targets, ref.gather(-1, targets) - beta)
    per_token = -(adjusted.softmax(-1) * logits[:, :-1].float().log_softmax(-1)).sum(-1)
    weights = mask[:, 1:].to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


@dataclass
class UndialMethod(UnlearnConfig):
    method: str = "undial"
    trainable: list[str] = listed("all", distinct=True)
    beta: float = bounded(10.0, gt=0)  # how far the forget token's logit is lowered
    forget_weight: float = bounded(1.0, gt=0)  # open-unlearning's gamma
    # open-unlearning's alpha: 0 as its UNDIAL config and the paper (no retain set)
    retain_weight: float = bounded(0.0, ge=0)
    retain_loss: str = choice("nll", "nll", "kl")  # kl: to the starting model (retain_kl.py)


@register_method("undial", UndialMethod)
class Undial(RetainKl, Method):
    display_name = "UNDIAL"
    teacher: ReferenceLogits | None = None  # built in prepare

    def prepare(self) -> None:
        ctx = self.ctx
        self.teacher = ReferenceLogits(
            ctx, ctx.forget, ctx.forget_used, self.cfg.originals, "forget"
        )
        self.retain_reference = retain_reference(ctx, self.cfg, self.teacher.head)

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = forget["input_ids"], forget["attention_mask"]
        logits = self.ctx.model(input_ids=ids, attention_mask=mask).logits
        teacher = self.teacher.logits(forget)
        forget_term = undial_loss(logits, teacher, ids, counted_tokens(forget), self.cfg.beta)
        terms = {"undial": float(forget_term.detach())}
        loss = self.cfg.forget_weight * forget_term
        weight, reference = self.cfg.retain_weight, self.retain_reference
        return with_retain_term(self.ctx.model, loss, retain, weight, terms, reference), terms

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
        super().close()

    @property
    def recorded_sites(self) -> int:  # the memory plan's view (unlearn/memory_plan.py)
        """The starting model's final-norm states of the forget items, and of the retain items
        for `retain_loss: kl`."""
        return 1 + self.retain_kl_sites
