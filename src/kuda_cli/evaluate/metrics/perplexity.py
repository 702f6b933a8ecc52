"""Perplexity of a text set under a causal LM: exp of the mean next-token NLL over all tokens;
writes each text's summed NLL and token count to perplexity_items.jsonl (what a resample of the
texts re-aggregates)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuda_cli.config import bounded, choice
from kuda_cli.data.texts import load_texts, refuse_blank_file
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate import EvalContext, Metric, ratio, register_metric
from kuda_cli.evaluate.scoring import token_logprobs
from kuda_cli.hub import HubSource

ITEMS_FILE = "perplexity_items.jsonl"


def text_nlls(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 4,
    desc: str = "perplexity",
) -> list[tuple[float, int]]:
    """Per text, (summed next-token NLL, tokens scored): every token but the text's first;
    texts longer than `max_length` tokens are truncated."""
    per_text = token_logprobs(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, desc=desc
    )
    return [(-float(t.sum()), len(t)) for t in per_text]


def perplexity_of(nlls: list[tuple[float, int]]) -> dict[str, Any]:
    """Token-weighted perplexity of texts' `text_nlls`."""
    tokens = sum(n for _, n in nlls)
    mean_nll = sum(nll for nll, _ in nlls) / max(tokens, 1)
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": tokens,
        "texts": len(nlls),
    }


def perplexity(model, tokenizer, texts: list[str], **scoring) -> dict[str, Any]:
    """Token-weighted perplexity of `texts` (`text_nlls`' options)."""
    return perplexity_of(text_nlls(model, tokenizer, texts, **scoring))


@dataclass
class PerplexityConfig:
    """Perplexity of a text set: the built-in passages, a local file, or a hub dataset."""

    source: str = choice("builtin", "builtin", "path", "hub")
    builtin: str = "general"  # name of a JSONL file under kuda_cli/data/builtin/texts/
    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "test"
    text_field: str = "text"
    max_texts: int | None = bounded(None, ge=1)
    max_length: int = bounded(512, ge=8)
    batch_size: int = bounded(4, ge=1)


@register_metric("perplexity", PerplexityConfig)
class Perplexity(Metric):
    report_columns = (
        ("damage", "summary.perplexity_ratio"),
        ("benchmark", "perplexity.perplexity"),
    )

    @classmethod
    def compute(cls, ctx: EvalContext) -> dict[str, Any]:
        return {"perplexity": text_perplexity(ctx.eval.perplexity, ctx.loaded, ctx.out_dir)}

    @classmethod
    def check(cls, cfg) -> None:
        ppl = cfg.eval.perplexity
        if ppl.source != "path":
            return
        if not ppl.path:
            raise ConfigError("eval.perplexity.source=path needs eval.perplexity.path=FILE")
        if not Path(ppl.path).expanduser().exists():
            raise ConfigError(
                f"eval.perplexity.path={ppl.path} does not exist; pass a JSONL, JSON, parquet "
                "or txt file (or a directory of them)"
            )
        refuse_blank_file("eval.perplexity.path", ppl.path)

    @classmethod
    def summarise(cls, before: dict, after: dict, settings) -> dict[str, Any]:
        return {"perplexity_ratio": ratio(before, after, "perplexity.perplexity")}

    @classmethod
    def scored_texts(cls, cfg) -> list[str]:
        return perplexity_texts(cfg.eval.perplexity, every=True)

    @classmethod
    def hub_sources(cls, cfg) -> list[HubSource]:
        ppl = cfg.eval.perplexity
        local = "eval.perplexity.source=path eval.perplexity.path=FILE"
        return [HubSource("eval.perplexity", ppl.hub_id, local)] if ppl.source == "hub" else []


def text_perplexity(ppl: PerplexityConfig, loaded, out_dir: Path | None = None) -> dict[str, Any]:
    """The perplexity of the text set `ppl` names, and where it came from; each text's figures
    go to `out_dir`/perplexity_items.jsonl."""
    texts = perplexity_texts(ppl)
    nlls = text_nlls(
        loaded.model, loaded.tokenizer, texts, max_length=ppl.max_length, batch_size=ppl.batch_size
    )
    if out_dir is not None:
        with open(Path(out_dir) / ITEMS_FILE, "w") as f:
            for i, (nll, tokens) in enumerate(nlls):
                f.write(json.dumps({"text": i, "nll": nll, "tokens": tokens}) + "\n")
    source = {"builtin": f"builtin:{ppl.builtin}", "path": ppl.path, "hub": ppl.hub_id}[ppl.source]
    return {**perplexity_of(nlls), "source": source}


def perplexity_texts(ppl: PerplexityConfig, every: bool = False) -> list[str]:
    """The texts `ppl` names: the first `max_texts` (the ones scored), or `every` one."""
    return load_texts(
        source=ppl.source,
        builtin=ppl.builtin,
        path=ppl.path,
        hub_id=ppl.hub_id,
        hub_config=ppl.hub_config,
        split=ppl.split,
        text_field=ppl.text_field,
        max_items=None if every else ppl.max_texts,
    )
