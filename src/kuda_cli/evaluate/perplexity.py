"""Perplexity of a text set under a causal LM: exp of the mean next-token NLL over all tokens."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kuda_cli.config import EvalConfig
from kuda_cli.data.texts import load_texts
from kuda_cli.evaluate import register_metric


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 4,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Token-weighted perplexity. Texts are batched by length (less padding); padding is masked;
    texts longer than `max_length` tokens are truncated."""
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    total_nll, total_tokens = 0.0, 0
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            batch = [texts[i] for i in order[start : start + batch_size]]
            enc = tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            ).to(device)
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
            targets = enc.input_ids[:, 1:]
            mask = enc.attention_mask[:, 1:].bool()
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
            total_nll += nll[mask].sum().item()
            total_tokens += int(mask.sum())
    finally:
        tokenizer.padding_side = padding_side
    mean_nll = total_nll / max(total_tokens, 1)
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "texts": len(texts),
    }


@register_metric("perplexity")
def perplexity_metric(loaded, eval_cfg: EvalConfig) -> dict[str, Any]:
    ppl = eval_cfg.perplexity
    texts = load_texts(
        source=ppl.source,
        builtin=ppl.builtin,
        path=ppl.path,
        hub_id=ppl.hub_id,
        hub_config=ppl.hub_config,
        split=ppl.split,
        text_field=ppl.text_field,
        max_items=ppl.max_texts,
    )
    result = perplexity(
        loaded.model, loaded.tokenizer, texts, max_length=ppl.max_length, batch_size=ppl.batch_size
    )
    source = {"builtin": f"builtin:{ppl.builtin}", "path": ppl.path, "hub": ppl.hub_id}[ppl.source]
    return {"perplexity": {**result, "source": source}}
