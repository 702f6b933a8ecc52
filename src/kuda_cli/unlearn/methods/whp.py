"""Who's Harry Potter (WHP, Eldan & Russinovich 2023): fine-tune towards the predictions of a
model that has not read the forget texts, estimated from one that has read them more.

1. Reinforce (in `prepare`): float32 copies of the trained tensors are fine-tuned on the forget
   texts, gradient descent on NLL_forget, `reinforce_steps` steps at `reinforce_lr` (the
   trainer's data order, optimiser, schedule shape and clipping). They stand in for the model's
   own tensors in the forward (`torch.func.functional_call`, cast to the model's dtype): the
   model keeps its starting weights and no second model is built.
2. Generic predictions: at each position of each forget item the trainer will draw, the
   starting model's logits `v_b` and the reinforced ones `v_r` give
   `v_generic = v_b - alpha * relu(v_r - v_b)`: the tokens the reinforcement made more likely are
   pushed down. Their argmax, one token id per position, is kept on the host (no vocabulary-wide
   row is stored); the reinforced copies are freed.
3. Fine-tune (the trainer's steps): the trained tensors, from their starting values, by gradient
   descent on the NLL of those generic labels, the mean over the positions whose next token
   counts (`predicted_tokens`: not padding; on TOFU's answer tokens, the answer's). The
   reinforcement's NLL counts the same tokens.

`prepare` runs on the starting weights, also on resume, and reinforces deterministically: a
resumed run trains towards the same labels. MUSE (swj0419/muse_bench,
baselines/baselines/whos_harry_potter.py) runs WHP at inference time only: a wrapper holding the
base and the reinforced model whose output logits are `v_generic`; it fine-tunes nothing. kuda
fine-tunes towards the generic labels as the paper does (an ordinary model comes out,
checkpointed and evaluated like every method's), without the paper's anchored-term translation
(a dictionary of the forget texts' idiosyncratic names and generic stand-ins, written by GPT-4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.func import functional_call

from kuda_cli import distributed
from kuda_cli.config import MAX_STEPS, STEPS_WHY, UnlearnConfig, bounded, listed
from kuda_cli.errors import ConfigError, UserError
from kuda_cli.unlearn import sharding
from kuda_cli.unlearn.batches import TokenSet, batch_indices
from kuda_cli.unlearn.methods import Method, predicted_tokens, register_method, sequence_nll
from kuda_cli.unlearn.trainer import make_optimizer, make_schedule


def generic_logits(base: torch.Tensor, reinforced: torch.Tensor, alpha: float) -> torch.Tensor:
    """`v_b - alpha * relu(v_r - v_b)` (the paper's v_generic, MUSE's WHP logits)."""
    return base - alpha * F.relu(reinforced - base)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of `targets` under `logits` (float32) over the positions where `mask` is set."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    per_token = per_token.view_as(targets).masked_fill(~mask, 0.0)
    return per_token.sum() / mask.sum().clamp_min(1)


def substituted(model, tensors: dict[str, torch.Tensor]):
    """`model` as a callable with `tensors` in place of its parameters of those names, each
    cast (differentiably) to the dtype of the one it replaces."""
    dtypes = {name: param.dtype for name, param in model.named_parameters()}

    def forward(**inputs):
        cast = {name: t.to(dtypes[name]) for name, t in tensors.items()}
        return functional_call(model, cast, args=(), kwargs=inputs)

    return forward


def reinforce(model, params: dict, forget: TokenSet, cfg, seed: int) -> dict[str, torch.Tensor]:
    """Float32 copies of `params` after `cfg.reinforce_steps` steps of gradient descent on the
    forget NLL, the model's own tensors untouched."""
    device = next(model.parameters()).device
    copies = {n: p.detach().float().clone().requires_grad_(True) for n, p in params.items()}
    settings = replace(cfg, lr=cfg.reinforce_lr, steps=cfg.reinforce_steps)
    optimizer = make_optimizer(settings, list(copies.values()))
    schedule = make_schedule(settings, optimizer)
    forward = substituted(model, copies)
    for step in range(cfg.reinforce_steps):
        optimizer.zero_grad(set_to_none=True)
        for a in range(cfg.grad_accum):
            indices = batch_indices(len(forget), cfg.batch_size, step * cfg.grad_accum + a, seed)
            nll = sequence_nll(forward, forget.batch(indices, device))
            if not torch.isfinite(nll):
                raise UserError(
                    f"the reinforcement diverged at step {step + 1} (forget NLL {float(nll)}); "
                    "lower unlearn.reinforce_lr"
                )
            (nll / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(list(copies.values()), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        schedule.step()
    return {n: t.detach() for n, t in copies.items()}


@torch.no_grad()
def generic_labels(
    model, reinforced, tokens: TokenSet, indices: list[int], alpha: float, batch_size: int
) -> dict[int, torch.Tensor]:
    """Per item of `indices`: the argmax of the generic logits at each position but the last
    (the label of the next token), from `model` and the callable `reinforced`, on the host."""
    device = next(model.parameters()).device
    order = sorted(dict.fromkeys(indices), key=lambda i: len(tokens.ids[i]))
    labels: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokens.batch(chunk, device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        base = model(**inputs).logits[:, :-1].float()
        generic = generic_logits(base, reinforced(**inputs).logits[:, :-1].float(), alpha)
        best = generic.argmax(-1).cpu()
        for row, i in enumerate(chunk):
            labels[i] = best[row, : len(tokens.ids[i]) - 1].clone()
    return labels


@dataclass
class WhpMethod(UnlearnConfig):
    method: str = "whp"
    lr: float = bounded(1e-5, gt=0)
    trainable: list[str] = listed("all", distinct=True)
    alpha: float = bounded(1.0, gt=0)  # MUSE's default
    reinforce_steps: int = bounded(40, ge=1, le=MAX_STEPS, why=STEPS_WHY)
    reinforce_lr: float = bounded(1e-5, gt=0)  # MUSE fine-tunes its reinforced models at 1e-5


@register_method("whp", WhpMethod)
class Whp(Method):
    display_name = "WHP"
    supports_lora = False
    lora_refusal = "reinforces copies of the model's own weights, by name"

    @classmethod
    def check_config(cls, cfg) -> None:
        """The reinforced copies replace whole tensors in the forward: FSDP2's shards, gathered
        by its own hooks, cannot be replaced so."""
        if sharding.wanted(cfg.unlearn):
            raise ConfigError(
                f"unlearn=whp cannot reinforce parameters sharded over the "
                f"{distributed.world_size()} processes (FSDP2): set unlearn.shard=none, or train "
                "module kinds (e.g. unlearn.trainable=[mlp])"
            )

    def prepare(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        with torch.enable_grad():
            reinforced = reinforce(
                ctx.model, self.trainable_parameters(), ctx.forget, cfg, ctx.seed
            )
        self.labels = generic_labels(
            ctx.model,
            substituted(ctx.model, reinforced),
            ctx.forget,
            ctx.forget_used,
            cfg.alpha,
            cfg.batch_size,
        )

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = forget["input_ids"], predicted_tokens(forget)
        logits = self.ctx.model(input_ids=ids, attention_mask=forget["attention_mask"]).logits
        logits = logits[:, :-1]
        targets = torch.zeros_like(ids[:, 1:])
        for row, i in enumerate(forget["index"]):
            targets[row, : len(self.labels[i])] = self.labels[i].to(ids.device)
        loss = token_nll(logits, targets, mask)
        with torch.no_grad():
            forget_nll = token_nll(logits, ids[:, 1:], mask)
        return loss, {"generic_nll": float(loss.detach()), "forget_nll": float(forget_nll)}

    def close(self) -> None:
        self.labels = {}

    @property
    def precomputes_reference(self) -> bool:  # the memory plan's view (unlearn/memory_plan.py)
        """`prepare` runs no-grad forwards to the logits over the forget items (and, before
        them, the reinforcement's steps)."""
        return True
