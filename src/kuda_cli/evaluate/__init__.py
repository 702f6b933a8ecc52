"""Metrics, registered by name: `eval.metrics` lists the ones a run computes.

A metric is a function (loaded model, eval config) -> nested dict of results, registered with
`@register_metric(name)` in its module; `METRIC_MODULES` says which module defines each name, so
config validation knows the names without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

METRIC_MODULES = {
    "perplexity": "kuda_cli.evaluate.perplexity",
}
METRICS: dict[str, Callable[..., dict[str, Any]]] = {}


def register_metric(name: str):
    def wrap(fn):
        METRICS[name] = fn
        return fn

    return wrap


def get_metric(name: str) -> Callable[..., dict[str, Any]]:
    importlib.import_module(METRIC_MODULES[name])
    return METRICS[name]
