"""Perplexity of a text set under a causal LM: exp of the mean next-token NLL over all tokens."""

from __future__ import annotations

import math
from typing import Any

from kuda_cli.data.texts import load_texts
from kuda_cli.evaluate import EvalContext, register_metric
from kuda_cli.evaluate.scoring import token_logprobs


def perplexity(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 4,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Token-weighted perplexity: every token but each text's first is scored; texts longer than
    `max_length` tokens are truncated."""
    per_text = token_logprobs(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, desc=desc
    )
    tokens = sum(len(t) for t in per_text)
    mean_nll = -sum(float(t.sum()) for t in per_text) / max(tokens, 1)
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": tokens,
        "texts": len(texts),
    }


@register_metric("perplexity")
def perplexity_metric(ctx: EvalContext) -> dict[str, Any]:
    ppl, loaded = ctx.eval.perplexity, ctx.loaded
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
