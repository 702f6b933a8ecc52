"""Relearning attacks' fine-tuning: the evaluated model fine-tuned in place on a few texts (the
causal-LM loss on every token, AdamW on every weight, as Unlearn-Simple's relearning attack),
stopping at each requested step count for the caller to score it. Plain PyTorch."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import torch

from kuda_cli.evaluate.scoring import pad_id, right_padded

log = logging.getLogger(__name__)


def _batch(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    """Right-padded ids and labels of `texts` (padding not learned)."""
    enc = tokenizer(texts, max_length=max_length, truncation=True)
    ids, mask = right_padded(enc["input_ids"], pad_id(tokenizer))
    labels = ids.masked_fill(mask == 0, -100)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def batches(texts: list[str], batch_size: int, seed: int) -> Iterator[list[str]]:
    """Batches of `texts`, each pass over them in a new seeded order, for ever."""
    rng = random.Random(seed)
    while True:
        order = list(texts)
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


def fine_tune(
    model,
    tokenizer,
    texts: list[str],
    steps: list[int],
    *,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
) -> Iterator[tuple[int, list[float]]]:
    """Fine-tune `model` in place on `texts`; after each step count of `steps` (sorted, one
    trajectory: 25 steps continue the first 10) yield it and the losses of the steps taken."""
    device = next(model.parameters()).device
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad]  # an unlearning run froze them
    for p in frozen:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    stream = batches(texts, batch_size, seed)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        for target in sorted(set(steps)):
            while len(losses) < target:
                batch = _batch(tokenizer, next(stream), max_length, device)
                loss = model(**batch, use_cache=False).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            model.eval()
            yield target, list(losses)
            model.train()
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
