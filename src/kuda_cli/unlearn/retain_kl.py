"""The KL retain term (`unlearn.retain_loss=kl`: GradDiff, NPO, UNDIAL, IdkDPO): the KL
divergence from the starting model's next-token distributions to the current model's on the
retain batch, in place of the retain NLL, as open-unlearning's `retain_loss_type: KL`
(src/trainer/utils.py, `compute_kl_divergence`):

    mean over the non-padding positions t of  KL(p_ref(. | x_<=t) || p_theta(. | x_<=t))

`F.kl_div(log p_theta, log p_ref, log_target=True)` there, with `reduction="batchmean"` over the
(batch x positions) rows: the mean over every position, padding included, the last one too. kuda
masks padding, so the two agree on a batch without padding. Its KL covers a TOFU item's question as
well as its answer (it reads no labels), and so does kuda's, whatever `data.loss_tokens`. MUSE's
`GA_KLR` / `NPO_KLR` (baselines/baselines/iterative.py) take the same direction, but on the raw
logits as if they were log-probabilities (no log-softmax: not a divergence between distributions)
and sum over the positions before the mean over the batch.

The reference is the starting model, without a second copy of it (`ReferenceLogits`, also
UNDIAL's teacher on the forget items): `prepare` records its final norm's output (the LM head's
input, hidden size per token) at every item the trainer will draw, in a `RepresentationStore`
(`unlearn.originals`: memory or disk), and keeps a copy of the LM head's starting weights; its
logits are the head applied to the stored rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kuda_cli.unlearn.batches import TokenSet
from kuda_cli.unlearn.methods import MethodContext, with_retain_nll
from kuda_cli.unlearn.representations import RepresentationStore, record_sites


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` is 1 of KL(softmax(ref_logits) || softmax(logits)),
    in float32; padding contributes nothing, not even a gradient."""
    logq = logits.float().log_softmax(-1)
    logp = ref_logits.float().log_softmax(-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def whole(param: torch.Tensor) -> torch.Tensor:
    """A detached copy of a parameter, gathered whole when FSDP2 shards it (a DTensor)."""
    value = param.detach()
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()


class ReferenceLogits:
    """The starting model's logits on the items of a token set, as its final norm's output and
    its LM head's weights. Built in a method's `prepare` (on the starting weights, under the
    loss's autocast); `head`: another one's `head`, so that one copy of the LM head serves
    both."""

    def __init__(
        self,
        ctx: MethodContext,
        tokens: TokenSet,
        indices: list[int],
        originals: str,
        name: str,
        head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ):
        self.site = ctx.adapter.final_norm
        directory = ctx.work_dir / f"{name}_reference" if ctx.work_dir else None
        self.store = RepresentationStore(originals, directory)
        record_sites(
            ctx.model, tokens, indices, [self.site], self.store, desc=f"reference {name} states"
        )
        if head is None:
            module = ctx.model.get_submodule(ctx.adapter.lm_head)
            head = whole(module.weight), None if module.bias is None else whole(module.bias)
        self.head = head

    def logits(self, batch: dict) -> torch.Tensor:
        """(batch, width, vocab): the starting model's logits on a batch of the token set's
        items (any value at padding)."""
        mask = batch["attention_mask"]
        states = self.store.padded(batch["index"], self.site, mask.shape[1], mask.device)
        weight, bias = self.head
        return F.linear(states.to(weight.dtype), weight, bias)

    def close(self) -> None:
        self.store.close()


def retain_kl(model, reference: ReferenceLogits, retain: dict) -> torch.Tensor:
    """The KL retain term on a retain batch (see the module's docstring)."""
    logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    return token_kl(logits, reference.logits(retain), retain["attention_mask"])


def with_retain_term(
    model,
    loss: torch.Tensor,
    retain: dict | None,
    weight: float,
    terms: dict[str, float],
    reference: ReferenceLogits | None,
) -> torch.Tensor:
    """`loss + weight * retain term`: the KL to `reference` (logging `retain_kl`) when there is
    one, else the retain NLL; `loss` alone without a retain batch."""
    if reference is None:
        return with_retain_nll(model, loss, retain, weight, terms)
    if retain is None or weight == 0:
        return loss
    kl = retain_kl(model, reference, retain)
    terms["retain_kl"] = float(kl.detach())
    return loss + weight * kl


class RetainKl:
    """Mixed into a method with `retain_loss: nll|kl` (before `Method`): the reference that
    `retain_reference` builds in `prepare`, closed at the end, and the memory plan's count of
    the sites it records."""

    retain_reference = None  # built in prepare for retain_loss: kl

    def close(self) -> None:
        if self.retain_reference is not None:
            self.retain_reference.close()

    @property
    def retain_kl_sites(self) -> int:
        """The reference's final-norm states of the retain items, for `retain_loss: kl`."""
        return int(self.cfg.retain_loss == "kl" and self.needs_retain)

    @property
    def recorded_sites(self) -> int:  # the memory plan's view (unlearn/memory_plan.py)
        return self.retain_kl_sites


def retain_reference(
    ctx: MethodContext, cfg, head: tuple[torch.Tensor, torch.Tensor | None] | None = None
) -> ReferenceLogits | None:
    """The reference a method with `cfg.retain_loss` builds in `prepare`: one on the retain
    items for `kl` with a retain term, else None (`head`: as `ReferenceLogits`)."""
    if cfg.retain_loss != "kl" or cfg.retain_weight == 0:
        return None
    return ReferenceLogits(ctx, ctx.retain, ctx.retain_used, cfg.originals, "retain", head)
