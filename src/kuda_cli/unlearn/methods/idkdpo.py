"""IdkDPO: direct preference optimisation (Rafailov et al. 2023) with an "I don't know" answer
preferred to the forget answer after the same prompt (TOFU's IDK preference, open-unlearning's
`DPO` trainer with `unlearn/tofu/idk.yaml`), plus a retain term:

    -forget_weight * (2/beta) * mean_i logsigmoid(beta * (r_i(a_i) - r_i(y_i)))
      + retain_weight * NLL_retain,    r_i(z) = log p(z | x_i) - log p_ref(z | x_i)

with x_i the prompt of forget item i, y_i its own answer (dispreferred), a_i an "I don't know"
answer (preferred) and log p(z | x) the summed log-probability of an answer's tokens after the
prompt. At the reference (the starting model) the forget term is (2/beta) log 2. As
open-unlearning's `compute_dpo_loss` (src/trainer/utils.py, called by
src/trainer/unlearn/dpo.py).

Where the data has prompts (TOFU's questions, `data.loss_tokens: answer`) an item's prompt is
its question and its forget answer the answer's tokens. Other forget items are passages: the
prompt is the first `prompt_share` of a passage's tokens (at least one; at least one left for
the answer), the forget answer the rest. The preferred answer is the prompt followed by one of
`idk_answers` (tokenised after a space, no special tokens). Each item's answer is drawn once from
(seed, item index), so its reference log-probabilities are computed once in `prepare`, for every
forget item the trainer will draw, and kept by item index as NPO's: no second model copy.
(open-unlearning draws a new one each time an item is read.) `retain_loss: kl`: as GradDiff's
(retain_kl.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kuda_cli.config import UnlearnConfig, bounded, choice, listed
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate.scoring import right_padded
from kuda_cli.unlearn.batches import TokenSet
from kuda_cli.unlearn.methods import Method, register_method, token_logprobs
from kuda_cli.unlearn.retain_kl import RetainKl, retain_reference, with_retain_term

# kuda's own list: short, plain refusals of knowledge, none naming a topic
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I can't answer that.",
    "That is something I don't know.",
    "I don't have that information.",
    "I'm afraid I can't say.",
    "I really couldn't tell you.",
    "No idea, sorry.",
    "I'm unable to answer that.",
    "That's beyond what I know.",
    "I don't know the answer to that.",
    "Sorry, I can't help with that.",
    "I couldn't say.",
    "I have no information about that.",
    "I'm not able to tell you that.",
)


def dpo_loss(
    preferred_logratio: torch.Tensor, dispreferred_logratio: torch.Tensor, beta: float
) -> torch.Tensor:
    """-(2/beta) * mean logsigmoid(beta * (preferred - dispreferred)), each a log-ratio of the
    model to the reference."""
    return -(2.0 / beta) * F.logsigmoid(beta * (preferred_logratio - dispreferred_logratio)).mean()


def prompt_length(tokens: int, share: float) -> int:
    """Tokens of an item's prompt: `share` of them, at least one, at most all but one."""
    return min(max(int(tokens * share), 1), tokens - 1)


def answer_position(tokens: TokenSet, index: int, share: float) -> int:
    """The first token of item `index`'s answer: its first counted token where the set marks
    answers after a prompt (`label_mask`), else its `prompt_length` (`share` of its tokens)."""
    labels = None if tokens.label_mask is None else tokens.label_mask[index]
    if labels is not None and not all(labels):  # a prompt, then the answer
        return labels.index(1)
    return prompt_length(len(tokens.ids[index]), share)


def idk_choice(seed: int, index: int, choices: int) -> int:
    """The "I don't know" answer of forget item `index`: a function of (seed, index) alone."""
    return int(np.random.default_rng([seed, index]).integers(choices))


def answer_logprobs(model, rows: list[list[int]], starts: list[int], pad: int, device):
    """Per row: the summed log-probability of its tokens from position `starts[r]` on, each
    given the ones before it (one right-padded forward over every row)."""
    input_ids, mask = right_padded(rows, pad)
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    logp = token_logprobs(model, batch)
    position = torch.arange(1, input_ids.shape[1], device=device)  # of each predicted token
    first = torch.tensor(starts, device=device)[:, None]
    answer = batch["attention_mask"][:, 1:].bool() & (position[None] >= first)
    return logp.masked_fill(~answer, 0.0).sum(1)


@dataclass
class IdkDpoMethod(UnlearnConfig):
    method: str = "idkdpo"
    trainable: list[str] = listed("all", distinct=True)
    beta: float = bounded(0.1, gt=0)
    forget_weight: float = bounded(1.0, gt=0)  # open-unlearning's gamma
    retain_weight: float = bounded(1.0, ge=0)  # open-unlearning's alpha
    retain_loss: str = choice("nll", "nll", "kl")  # kl: to the starting model (retain_kl.py)
    # the share of a forget passage's tokens its prompt takes; the rest is the forget answer
    # (data with prompts, TOFU's questions, splits at the answer instead)
    prompt_share: float = bounded(0.5, gt=0, lt=1)
    idk_answers: list[str] = listed(*IDK_ANSWERS, min_items=1)  # the preferred answers


@register_method("idkdpo", IdkDpoMethod)
class IdkDpo(RetainKl, Method):
    display_name = "IdkDPO"

    @classmethod
    def check_config(cls, cfg) -> None:
        """Every preferred answer has a word: an empty one would have no tokens to score."""
        for answer in cfg.unlearn.idk_answers:
            if not str(answer).strip():
                raise ConfigError(
                    "unlearn.idk_answers holds an empty answer; give each answer a few words "
                    "(e.g. 'I don't know.')"
                )

    def prepare(self) -> None:
        """Each forget item's prompt length and "I don't know" sequence, and the reference's
        log-probabilities of both answers (the starting model's)."""
        ctx, cfg = self.ctx, self.cfg
        answers = [
            ctx.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            for text in cfg.idk_answers
        ]
        self.starts: dict[int, int] = {}
        self.preferred: dict[int, list[int]] = {}
        for index in dict.fromkeys(ctx.forget_used):
            ids = ctx.forget.ids[index]
            start = answer_position(ctx.forget, index, cfg.prompt_share)
            self.starts[index] = start
            self.preferred[index] = ids[:start] + answers[idk_choice(ctx.seed, index, len(answers))]
        self.reference: dict[int, tuple[float, float]] = {}
        order = sorted(self.starts, key=lambda i: len(ctx.forget.ids[i]))
        per_forward = max(cfg.batch_size // 2, 1)  # two rows an item: a batch's rows a forward
        with torch.no_grad():
            for first in range(0, len(order), per_forward):
                chunk = order[first : first + per_forward]
                preferred, dispreferred = self.pair_logprobs(chunk)
                pairs = zip(preferred.tolist(), dispreferred.tolist(), strict=True)
                self.reference.update(zip(chunk, pairs, strict=True))
        self.retain_reference = retain_reference(ctx, cfg)

    def pair_logprobs(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(a_i | x_i) and log p(y_i | x_i) of the items `indices` under the model as it
        is now, in one forward."""
        ctx = self.ctx
        rows = [self.preferred[i] for i in indices] + [ctx.forget.ids[i] for i in indices]
        starts = [self.starts[i] for i in indices] * 2
        device = next(ctx.model.parameters()).device
        logp = answer_logprobs(ctx.model, rows, starts, ctx.forget.pad_id, device)
        return logp[: len(indices)], logp[len(indices) :]

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        indices = forget["index"]
        preferred, dispreferred = self.pair_logprobs(indices)
        ref = torch.tensor([self.reference[i] for i in indices], device=preferred.device)
        idk_logratio, forget_logratio = preferred - ref[:, 0], dispreferred - ref[:, 1]
        forget_term = dpo_loss(idk_logratio, forget_logratio, self.cfg.beta)
        terms = {
            "dpo": float(forget_term.detach()),
            "idk_logratio": float(idk_logratio.detach().mean()),
            "forget_logratio": float(forget_logratio.detach().mean()),
        }
        loss = self.cfg.forget_weight * forget_term
        weight, reference = self.cfg.retain_weight, self.retain_reference
        return with_retain_term(self.ctx.model, loss, retain, weight, terms, reference), terms

    def forget_reach(self, num_layers: int) -> Method.LossReach:  # the memory plan's view
        """Every layer to the logits, over two sequences per forget item: the preferred "I don't
        know" answer and the forget answer (`pair_logprobs`, one forward)."""
        return self.LossReach(num_layers - 1, logits=True, rows=2)

    @property
    def precomputes_reference(self) -> bool:  # the memory plan's view (unlearn/memory_plan.py)
        """`prepare` computes the reference log-probabilities of both answers of each item."""
        return True
