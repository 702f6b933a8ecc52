"""Metrics, registered by name: `eval.metrics` lists the ones a run computes.

A metric is a function (EvalContext) -> nested dict of results, registered with
`@register_metric(name)` in its module; `METRIC_MODULES` says which module defines each name, so
config validation knows the names without importing torch.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRIC_MODULES = {
    "perplexity": "kuda_cli.evaluate.perplexity",
    "facts": "kuda_cli.evaluate.facts_metric",
    "muse": "kuda_cli.evaluate.muse_metric",
    "lm_eval": "kuda_cli.evaluate.lm_eval_metric",
}
# the data kind a metric reads its sets from (validated before the run)
METRIC_DATA_KIND = {"facts": "facts", "muse": "muse"}
METRICS: dict[str, Callable[[EvalContext], dict[str, Any]]] = {}
STARTING_JUDGE = "starting model"  # the name of the judge `kuda unlearn` lends
log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What a metric may use: the loaded model, the eval and data configs, the run directory."""

    loaded: Any  # kuda_cli.models.loading.LoadedModel
    eval: Any  # kuda_cli.config.EvalConfig
    data: Any  # the data group's dataclass
    out_dir: Path | None = None
    cache_dir: str | None = None
    # a context manager yielding (model, tokenizer, name) that scores fluency; `kuda unlearn`
    # lends the starting model this way (its original weights swapped in, no second copy),
    # named STARTING_JUDGE
    judge: Any = None


def register_metric(name: str):
    def wrap(fn):
        METRICS[name] = fn
        return fn

    return wrap


def compute_metrics(ctx: EvalContext) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, results) of each metric of `ctx.eval.metrics`, in order, as it finishes."""
    for name in ctx.eval.metrics:
        log.info("metric %s", name)
        yield name, get_metric(name)(ctx)


def get_metric(name: str) -> Callable[[EvalContext], dict[str, Any]]:
    importlib.import_module(METRIC_MODULES[name])
    return METRICS[name]
