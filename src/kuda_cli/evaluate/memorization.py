"""Exact memorisation and extraction strength of a model on (prompt, answer) pairs, as
open-unlearning reports them on MUSE's VerbMem forget set: both read the model's greedy next
token at each answer position given the true prefix (prompt and the answer so far)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kuda_cli.evaluate.scoring import _batches, _eval_mode, pad_id, right_padded


def exact_memorization(predicted: torch.Tensor, answer: torch.Tensor) -> float:
    """Fraction of answer tokens the greedy next token gets right given the true prefix."""
    if answer.numel() == 0:
        raise ValueError("exact_memorization needs at least one answer token")
    return (predicted == answer).double().mean().item()


def extraction_strength(predicted: torch.Tensor, answer: torch.Tensor) -> float:
    """1 - k/n, k the smallest number of answer tokens that, given after the prompt, make the
    greedy continuation reproduce the rest of the answer exactly (n tokens in all). 1.0: the
    prompt alone extracts the whole answer; 0.0: not even the last token follows (k = n).
    open-unlearning stops its search at k = n - 1, so it gives 1/n where this gives 0."""
    n = answer.numel()
    if n == 0:
        raise ValueError("extraction_strength needs at least one answer token")
    wrong = (predicted != answer).nonzero().flatten()
    # the suffix from k on is reproduced exactly once k is past the last wrong prediction
    k = 0 if wrong.numel() == 0 else int(wrong[-1]) + 1
    return 1 - k / n


def _pair_ids(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """Prompt and answer tokenized apart (so the answer's tokens do not depend on where the
    prompt ends), joined and cut to `max_length`; and the prompt's length in tokens."""
    prompt_ids = tokenizer(prompt).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    # the first token has no prefix to be predicted from: it counts as prompt
    return (prompt_ids + answer_ids)[:max_length], max(len(prompt_ids), 1)


@torch.no_grad()
def greedy_answer_tokens(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int = 2048,
    batch_size: int = 4,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, (the greedy next token at each answer position given the true prefix, the
    answer's tokens), both cut where prompt + answer reaches `max_length` tokens."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pairs = [_pair_ids(tokenizer, p, a, max_length) for p, a in zip(prompts, answers, strict=True)]
    device = next(model.parameters()).device
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pairs)
    with _eval_mode(model):
        for batch in tqdm(
            _batches([len(ids) for ids, _ in pairs], batch_size), desc="memorization"
        ):
            ids, mask = right_padded([pairs[i][0] for i in batch], pad_id(tokenizer))
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits
            predicted = logits.argmax(-1).cpu()
            for row, i in enumerate(batch):
                full, start = pairs[i]
                answer = torch.tensor(full[start:], dtype=torch.long)
                # the logits at position t predict token t + 1
                out[i] = (predicted[row, start - 1 : len(full) - 1], answer)
    return out  # type: ignore[return-value]


def memorization(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int = 2048,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Mean exact memorisation and extraction strength over the pairs with an answer token left
    after the cut (high on a forget set: it is still reproduced)."""
    scored = [
        (predicted, answer)
        for predicted, answer in greedy_answer_tokens(
            model, tokenizer, prompts, answers, max_length=max_length, batch_size=batch_size
        )
        if answer.numel()
    ]
    if not scored:
        return {"exact_memorization": None, "extraction_strength": None, "n": 0}
    return {
        "exact_memorization": sum(exact_memorization(p, a) for p, a in scored) / len(scored),
        "extraction_strength": sum(extraction_strength(p, a) for p, a in scored) / len(scored),
        "n": len(scored),
    }
