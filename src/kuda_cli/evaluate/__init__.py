"""Metrics, registered by name: `eval.metrics` lists the ones a run computes.

A metric is a function (EvalContext) -> nested dict of results, registered with
`@register_metric(name)` in its module `evaluate/metrics/<name>.py`; `METRIC_MODULES` lists
them by file name, so config validation knows the names without importing a metric.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# metric name -> the module registering it: one module per metric in evaluate/metrics/, found
# by name (as unlearn/methods/ holds one module per method)
METRIC_MODULES = {
    m.name: f"{__name__}.metrics.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).with_name("metrics"))])
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
