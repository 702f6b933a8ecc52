"""Metrics, registered by name: `eval.metrics` lists the ones a run computes.

A metric is a function (loaded model, eval config) -> nested dict of results; registering one is
one decorator in one module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

METRICS: dict[str, Callable[..., dict[str, Any]]] = {}


def register_metric(name: str):
    def wrap(fn):
        METRICS[name] = fn
        return fn

    return wrap


from kuda_cli.evaluate import perplexity as _perplexity  # noqa: E402,F401  (registers)
