"""Membership-inference attacks on MUSE's texts and TOFU's answers (members: the forget set;
non-members: the holdout set): Min-K% Prob, LOSS, zlib, Min-K%++, gradient norm and a
reference-model attack. A text is scored whole, or, given its prompt (TOFU's question), over
its own tokens after the prompt's, as open-unlearning scores a TOFU answer.

Every score is oriented so that higher means "member" (as open-unlearning orients its AUCs), so
each attack's AUC is the probability that a forget text outscores a holdout text: 0.5 is
chance, 1.0 means the forget set is still told apart from unseen text. Re-implemented from the
papers' definitions (Yeom et al. 2018; Carlini et al. 2021; Shi et al. 2023; Zhang et al. 2024).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from kuda_cli.errors import ConfigError
from kuda_cli.evaluate.muse_scoring import auc, min_k_score
from kuda_cli.evaluate.scoring import (
    _eval_mode,
    continuation_logits,
    encoded_pair,
    pad_id,
    text_logits,
)

# the names eval.muse.mia_attacks takes; min_k always runs (PrivLeak is built from it)
ATTACKS = ("min_k", "loss", "zlib", "min_k_plus_plus", "gradnorm", "reference")


@dataclass
class TextStats:
    """One text under one model, over its tokens t >= 1 (the first has no prefix)."""

    logprobs: torch.Tensor  # log p(x_t | x_<t)
    # mean and standard deviation of log p(v | x_<t) over the vocabulary v, weighted by
    # p(v | x_<t) (Min-K%++); None when not asked for
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    @property
    def nll(self) -> float:
        return -self.logprobs.double().mean().item()


def check_attack_names(key: str, names: Sequence[str]) -> None:
    """A metric's `mia_attacks` setting (config key `key`) names only known attacks."""
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise ConfigError(
            f"{key} has {unknown[0]!r}, not a membership attack; choose one of: "
            f"{', '.join(ATTACKS)}"
        )


def without_reference(settings):
    """A metric's settings for the starting model: no reference attack (its reference model
    would be the starting model itself)."""
    return replace(settings, mia_attacks=[a for a in settings.mia_attacks if a != "reference"])


def _row_stats(logits: torch.Tensor, targets: torch.Tensor, moments: bool) -> TextStats:
    """Stats of one text from its next-token logits [T, V] and the tokens that followed [T]."""
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not moments:
        return TextStats(picked.cpu())
    p = logp.exp()
    mu = (p * logp).sum(-1)
    # a floor on the variance: a near one-hot distribution would otherwise divide by ~0
    var = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=1e-6)
    return TextStats(picked.cpu(), mu.cpu(), var.sqrt().cpu())


@torch.no_grad()
def text_stats(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    moments: bool = False,
    max_length: int = 2048,
    batch_size: int = 4,
    desc: str = "mia",
    prompts: Sequence[str] | None = None,
) -> list[TextStats]:
    """Per text, its token log-probabilities (and with `moments`, the vocabulary's mean and
    standard deviation of log p at each position); with `prompts`, those of its own tokens
    after its prompt's (`prompted_stats`). Texts are cut to `max_length` tokens."""
    if prompts is not None:
        return prompted_stats(
            model, tokenizer, prompts, texts, moments, max_length, batch_size, desc
        )
    out: list[TextStats | None] = [None] * len(texts)
    for batch, logits, ids, lengths in text_logits(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, desc=desc
    ):
        for row, i in enumerate(batch):
            n = max(int(lengths[row]) - 1, 0)
            out[i] = _row_stats(logits[row, :n], ids[row, 1 : n + 1], moments)
    return out  # type: ignore[return-value]


def prompted_tokens(
    tokenizer, prompt: str, text: str, max_length: int
) -> tuple[list[int], list[int]]:
    """(the prompt's tokens, the text's) as the TOFU answer figures encode them
    (`scoring.encoded_pair`), the text cut so that both fit `max_length` tokens (one of its
    tokens kept at least)."""
    context, tokens = encoded_pair(tokenizer, prompt, text)
    return context, tokens[: max(max_length - len(context), 1)]


def prompted_stats(
    model, tokenizer, prompts, texts, moments: bool, max_length: int, batch_size: int, desc: str
) -> list[TextStats]:
    """Per (prompt, text): the stats of the text's tokens, each given the prompt and the text's
    earlier tokens (`scoring.continuation_logits`)."""
    pairs = zip(prompts, texts, strict=True)
    encoded = [prompted_tokens(tokenizer, p, t, max_length) for p, t in pairs]
    out: list[TextStats | None] = [None] * len(texts)
    found = continuation_logits(model, encoded, pad_id(tokenizer), batch_size=batch_size, desc=desc)
    for i, logits, tokens in found:
        out[i] = _row_stats(logits, tokens, moments)
    return out  # type: ignore[return-value]


def loss_score(stats: TextStats) -> float:
    """LOSS (Yeom et al.): minus the mean token NLL; a seen text has a lower loss."""
    return -stats.nll


def zlib_score(stats: TextStats, text: str) -> float:
    """zlib (Carlini et al. 2021): minus NLL over the zlib-compressed length of the text in
    bytes, so a text that is merely repetitive (low NLL, compresses well) is not taken for a
    member."""
    return -stats.nll / len(zlib.compress(text.encode("utf-8")))


def min_k_plus_plus_score(stats: TextStats, k: float) -> float:
    """Min-K%++ (Zhang et al. 2024): per token (log p(x_t) - mu_t) / sigma_t, mu_t and sigma_t
    the mean and std of log p over the model's next-token distribution; then the mean of the
    lowest k-fraction, as Min-K% does with the raw log-probabilities."""
    if stats.mu is None or stats.sigma is None:
        raise ValueError("min_k_plus_plus_score needs text_stats(..., moments=True)")
    return min_k_score((stats.logprobs - stats.mu) / stats.sigma, k)


def reference_score(stats: TextStats, reference_nll: float) -> float:
    """Reference attack: the reference model's NLL minus the evaluated model's, i.e. minus
    (NLL under the model - NLL under the reference); text the model knows better than the
    reference scores high."""
    return reference_nll - stats.nll


@contextmanager
def _all_parameters_trainable(model) -> Iterator[list[torch.nn.Parameter]]:
    """Every parameter with requires_grad on while gradients are taken; the flags given back."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def gradnorm_scores(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 2048,
    prompts: Sequence[str] | None = None,
) -> list:
    """Gradient norm (Wang et al. 2024): per text, minus the L2 norm of the gradient of its mean
    token NLL (with `prompts`: of its tokens after its prompt's) with respect to all the model's
    parameters (one norm over them all); a seen text sits near a minimum, so its gradient is
    small. One backward pass per text: costly on a 7B model, and it holds a second model's
    worth of gradients at once. Parameters' .grad are left untouched, and dropout is off."""
    device = next(model.parameters()).device
    scores = []
    with _eval_mode(model), _all_parameters_trainable(model) as params:
        for i, text in enumerate(tqdm(texts, desc="gradnorm", unit="text")):
            if prompts is None:
                enc = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                labels = enc
            else:
                context, tokens = prompted_tokens(tokenizer, prompts[i], text, max_length)
                enc, labels = context + tokens, [-100] * len(context) + tokens
            ids = torch.tensor([enc], device=device)
            labels = torch.tensor([labels], device=device)
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            grads = torch.autograd.grad(loss, [p for p in params if p.is_floating_point()])
            norm = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt()
            scores.append(-norm.item())
    return scores


def attack_scores(
    model,
    tokenizer,
    texts: Sequence[str],
    attacks: Sequence[str],
    *,
    k: float = 0.4,
    reference_nlls: Sequence[float] | None = None,
    max_length: int = 2048,
    batch_size: int = 4,
    prompts: Sequence[str] | None = None,
) -> dict[str, list[float]]:
    """Each attack's score per text (higher: more likely a member); with `prompts`, of the
    text's tokens given its prompt (zlib compresses the text alone). min_k always; "reference"
    only with `reference_nlls` (the reference model's NLL of each text)."""
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    stats = text_stats(
        model,
        tokenizer,
        texts,
        moments="min_k_plus_plus" in attacks,
        max_length=max_length,
        batch_size=batch_size,
        prompts=prompts,
    )
    scores: dict[str, list[float]] = {"min_k": [min_k_score(s.logprobs, k) for s in stats]}
    if "loss" in attacks:
        scores["loss"] = [loss_score(s) for s in stats]
    if "zlib" in attacks:
        scores["zlib"] = [zlib_score(s, t) for s, t in zip(stats, texts, strict=True)]
    if "min_k_plus_plus" in attacks:
        scores["min_k_plus_plus"] = [min_k_plus_plus_score(s, k) for s in stats]
    if "gradnorm" in attacks:
        scores["gradnorm"] = gradnorm_scores(
            model, tokenizer, texts, max_length=max_length, prompts=prompts
        )
    if "reference" in attacks and reference_nlls is not None:
        scores["reference"] = [
            reference_score(s, r) for s, r in zip(stats, reference_nlls, strict=True)
        ]
    return scores


def text_nlls(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 2048,
    batch_size: int = 4,
    prompts: Sequence[str] | None = None,
) -> list[float]:
    """Mean token NLL of each text (with `prompts`: of its tokens given its prompt), the
    reference model's side of the reference attack."""
    stats = text_stats(
        model,
        tokenizer,
        texts,
        max_length=max_length,
        batch_size=batch_size,
        desc="reference",
        prompts=prompts,
    )
    return [s.nll for s in stats]


def attack_aucs(
    member: dict[str, list[float]], nonmember: dict[str, list[float]]
) -> dict[str, dict[str, Any]]:
    """Per attack scored on both sides: its AUC (members above non-members) and mean scores."""
    return {
        name: {
            "auc": auc(member[name], nonmember[name]),
            "member_mean": sum(member[name]) / len(member[name]),
            "nonmember_mean": sum(nonmember[name]) / len(nonmember[name]),
        }
        for name in member
        if name in nonmember
    }
