"""Metrics, registered by name: `eval.metrics` lists the ones a run computes.

A metric is one module of `evaluate/metrics/` (or, outside kuda, a module named by an entry point
of the group `kuda_cli.metrics`) defining a `Metric` subclass with `@register_metric(name,
Settings)`, where `Settings` is the dataclass of its options under `eval.<section>` (the section
is the name unless the class says otherwise). The class owns everything about the metric: how it
computes, what it reads from the data group, the local files it needs checked, how the starting
and the unlearned model are scored, the headline figures it adds to a run's summary and the hub
datasets it would fetch. The eval group's schema is built from the registered metrics'
settings (`eval_schema`); the rest of kuda loops over the metrics and never names one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, make_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from kuda_cli.config import choice, listed
from kuda_cli.errors import UserError
from kuda_cli.hub import HubSource
from kuda_cli.plugins import Registry
from kuda_cli.run import lookup

REGISTRY = Registry("metric", f"{__name__}.metrics", "kuda_cli.metrics", "eval.metrics")
# what each column `kuda report` shows by default tells, in the order its table reads them: how
# much of the forget set is gone, what the rest of the model lost (unlearn runs), the figures a
# benchmark scores any model on (accuracy, perplexity: eval runs and the starting model too), how
# fluent the answers to forget prompts stay
REPORT_ROLES = ("removed", "damage", "benchmark", "fluency")
COMPLEMENT = "1 - "  # a report column "1 - KEY": 1 minus the share at KEY
STARTING_JUDGE = "starting model"  # the name of the judge `kuda unlearn` lends
log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What a metric may use: the loaded model, the eval and data configs, the run directory."""

    loaded: Any  # kuda_cli.models.loading.LoadedModel
    eval: Any  # the eval group's dataclass (eval_schema())
    data: Any  # the data group's dataclass
    out_dir: Path | None = None
    cache_dir: str | None = None
    # a context manager yielding (model, tokenizer, name) that scores fluency; `kuda unlearn`
    # lends the starting model this way (its original weights swapped in, no second copy),
    # named STARTING_JUDGE
    judge: Any = None
    # what an attack changes about the evaluated sets (evaluate/attacks): a metric that reads
    # sets applies it, the others score as usual; None: the sets as configured
    view: Any = None


class Metric:
    """Base class: a metric without settings, summary figures or data of its own."""

    name = ""
    schema: type | None = None  # its settings, under eval.<section>; set by register_metric
    section = ""  # the key of its settings under eval (register_metric: the name by default)
    reads_data = False  # reads its sets from the data group: the data kind must list it
    # config keys (from the root) of local files or directories it reads: checked before any work
    local_paths: tuple[str, ...] = ()
    # settings that change only what the unlearned model is scored on: they leave the starting
    # model's cached evaluation valid
    after_only: tuple[str, ...] = ()
    # the columns `kuda report` shows of it by default, as (role of REPORT_ROLES, column): a
    # dotted key of a run's flattened metrics, an fnmatch pattern of them, or COMPLEMENT + a key
    report_columns: tuple[tuple[str, str], ...] = ()

    @classmethod
    def compute(cls, ctx: EvalContext) -> dict[str, Any]:
        """Nested results, keyed at the top by what they are (metrics.json's keys)."""
        raise NotImplementedError

    @classmethod
    def settings(cls, eval_cfg) -> Any:
        return getattr(eval_cfg, cls.section) if cls.schema is not None else None

    @classmethod
    def check(cls, cfg) -> None:
        """Checks before any model loads (`cfg`: the whole config), a UserError of one line."""

    @classmethod
    def for_starting_model(cls, settings):
        """The settings the starting model is scored with (`kuda unlearn`'s before/)."""
        return settings

    @classmethod
    def for_unlearned_model(cls, settings, before_dir: Path | None):
        """The settings the unlearned model is scored with, given the starting model's
        evaluation directory (None when there is none)."""
        return settings

    @classmethod
    def summarise(cls, before: dict, after: dict, settings) -> dict[str, Any]:
        """Headline figures of the comparison with the starting model (metrics.json summary)."""
        return {}

    @classmethod
    def scored_texts(cls, cfg) -> list[str]:
        """The general texts it scores (`cfg`: the whole config), which training must never
        read: KUDA's general null-space keys leave them out."""
        return []

    @classmethod
    def hub_sources(cls, cfg) -> list[HubSource]:
        """Each hub dataset it would fetch for `cfg` (none where a local path is given): checked
        before any work against the local cache and a hub that answers."""
        return []


def register_metric(name: str, schema: type | None = None):
    """Register a Metric subclass as `name`, with the dataclass of its settings."""

    def wrap(cls):
        cls.section = cls.__dict__.get("section") or name
        return REGISTRY.register(name, schema)(cls)

    return wrap


def get_metric(name: str) -> type[Metric]:
    return REGISTRY.get(name)


def report_columns() -> list[str]:
    """The columns of every registered metric's `report_columns`, role by role (REPORT_ROLES),
    the metrics in registry order within a role."""
    metrics = REGISTRY.all().values()
    for metric in metrics:
        unknown = {role for role, _ in metric.report_columns} - set(REPORT_ROLES)
        if unknown:
            raise UserError(
                f"metric {metric.name}: report_columns role {sorted(unknown)[0]!r} is not one of "
                f"{', '.join(REPORT_ROLES)}"
            )
    return [
        column
        for role in REPORT_ROLES
        for metric in metrics
        for own_role, column in metric.report_columns
        if own_role == role
    ]


def metric_names() -> list[str]:
    """The registered metrics' names (no module imported)."""
    return list(REGISTRY.modules())


@cache
def eval_schema() -> type:
    """The eval group's schema: its own keys, then one section per metric with settings, and
    the attacks' settings under `attack`."""
    from kuda_cli.evaluate.attacks import attack_schema

    sections = [
        (m.section, m.schema, field(default_factory=m.schema))
        for m in REGISTRY.all().values()
        if m.schema is not None
    ]
    return make_dataclass(
        "EvalConfig",
        [
            ("name", str, field(default=MISSING)),
            # metric names (metric_names())
            ("metrics", list[str], listed("perplexity", distinct=True)),
            # kuda unlearn: evaluate the starting model too (cached per model, data and eval
            # settings), for the comparison and the retain agreement
            ("before", bool, field(default=True)),
            # attacks on the evaluated model, each scored on the metrics again (evaluate/attacks)
            ("attacks", list[str], listed(distinct=True)),
            ("attack", attack_schema(), field(default_factory=attack_schema())),
            # what an attacked model is scored on: every figure of the metrics, or the forget
            # figures alone (facts: forget MC and greedy answers, without the retain split,
            # fluency and perplexity), a robustness sweep's cost
            ("attack_figures", str, choice("all", "all", "forget")),
            *sections,
        ],
    )


def metrics_of(eval_cfg) -> list[type[Metric]]:
    return [get_metric(name) for name in eval_cfg.metrics]


def scored_texts(cfg) -> list[str]:
    """The general texts the metrics of `cfg.eval` score (the perplexity set): never keys."""
    return [text for metric in metrics_of(cfg.eval) for text in metric.scored_texts(cfg)]


def compute_metrics(ctx: EvalContext) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, results) of each metric of `ctx.eval.metrics`, in order, as it finishes."""
    for metric in metrics_of(ctx.eval):
        log.info("metric %s", metric.name)
        yield metric.name, metric.compute(ctx)


def settings_for(eval_cfg, *, starting: bool, before_dir: Path | None = None):
    """`eval_cfg` (a dataclass) with each metric's settings as the starting model (`starting`)
    or the unlearned model is scored with."""
    for metric in metrics_of(eval_cfg):
        own = metric.settings(eval_cfg)
        if own is None:
            continue
        if starting:
            own = metric.for_starting_model(own)
        else:
            own = metric.for_unlearned_model(own, before_dir)
        eval_cfg = replace(eval_cfg, **{metric.section: own})
    return eval_cfg


def ratio(before: dict[str, Any], after: dict[str, Any], dotted: str) -> float | None:
    """after / before at a dotted metrics key, None where either is missing (or before is 0)."""
    a, b = lookup(after, dotted), lookup(before, dotted)
    return a / b if a is not None and b else None


def summarise(before: dict[str, Any], after: dict[str, Any], eval_cfg) -> dict[str, Any]:
    """The headline comparison with the starting model: each metric's figures, in the order of
    eval.metrics, the ones without a value left out."""
    found: dict[str, Any] = {}
    for metric in metrics_of(eval_cfg):
        found.update(metric.summarise(before, after, metric.settings(eval_cfg)))
    return {k: v for k, v in found.items() if v is not None}
