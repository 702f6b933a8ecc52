"""Relearning attacks' fine-tuning: the evaluated model fine-tuned in place on a few texts (the
causal-LM loss on every token, AdamW on every weight, as Unlearn-Simple's relearning attack),
stopping at each requested step count for the caller to score it; or LoRA adapters trained
instead (Łucki et al.'s relearning), removed afterwards. Plain PyTorch and peft."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from kuda_cli.evaluate.scoring import pad_id, right_padded

log = logging.getLogger(__name__)
# the linear projections of a Llama-style decoder block (Łucki et al.'s LoRA relearning trains
# adapters on all of them)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
) -> Iterator[tuple[int, list[float]]]:
    """Fine-tune `model` in place on `texts` (every weight, or LoRA adapters of `lora_rank`
    removed afterwards); after each step count of `steps` (sorted, one trajectory: 25 steps
    continue the first 10) yield it and the losses of the steps taken."""
    with ExitStack() as stack:
        if lora_rank:
            params, frozen = stack.enter_context(lora_adapters(model, lora_rank, lora_alpha)), []
        else:
            params = list(model.parameters())
            frozen = [p for p in params if not p.requires_grad]  # an unlearning run froze them
        yield from _train(
            model, tokenizer, texts, steps, params, frozen, lr, batch_size, max_length, seed
        )


@contextmanager
def lora_adapters(model, rank: int, alpha: float) -> Iterator[list[torch.nn.Parameter]]:
    """LoRA adapters of `rank` (peft) on every projection of the decoder blocks, their
    parameters; the model's own modules are put back afterwards."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS), bias="none"
    )
    dtype = next(model.parameters()).dtype
    inject_adapter_in_model(config, model, adapter_name="relearn")
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:  # in the model's dtype, like the weights they add to
        p.data = p.data.to(dtype)
    try:
        yield params
    finally:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, module.get_base_layer())


def _train(model, tokenizer, texts, steps, params, frozen, lr, batch_size, max_length, seed):
    """fine_tune's loop over `params` (`frozen`: those to unfreeze while it runs)."""
    device = next(model.parameters()).device
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
