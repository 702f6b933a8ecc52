"""Experiment trackers, registered by name: `logger=<name>` (conf/logger/) picks one.

A tracker mirrors a run into TensorBoard, Weights & Biases, MLflow or a CSV file: the run's
resolved config as its parameters, each row of train_log.jsonl at its step (`train/<figure>`),
and every numeric figure of metrics.json as it is written (dotted keys, at the last training step:
0 before training and for the stages that do not train). The run directory stays the record; a
tracker is a copy, so one that fails mid-run is a warning and the run goes on without it.

A tracker is one module of this package (or a module outside kuda named by an entry point of the
group `kuda_cli.trackers`) defining its config schema and a `Tracker` subclass with
`@register_tracker(name, Schema)`, plus one YAML in conf/logger/ starting from
`/schema/logger/<name>`. Its packages (`packages`) are imported only when it opens, and checked
before any work: a missing one stops the command with one line naming the fix.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

from kuda_cli.errors import ConfigError
from kuda_cli.plugins import Registry

log = logging.getLogger(__name__)

REGISTRY = Registry("logger", __name__, "kuda_cli.trackers", "logger.name")
EXTRA = "pip install 'kuda-cli[trackers]'"  # installs every shipped tracker's packages
TRAIN_PREFIX = "train/"  # train_log.jsonl's figures, apart from metrics.json's `train.*`


class Tracker:
    """One tracked run: opened with the run (`settings`: its schema's values), given the
    parameters once, then figures at steps, then closed with the run's final status."""

    name: str = ""  # set by register_tracker
    schema: type = object  # set by register_tracker
    packages: tuple[str, ...] = ()  # modules it imports (checked before any work)
    install: str = EXTRA  # the command that installs them

    def __init__(self, settings: Any, run_dir: Path):
        self.settings, self.run_dir = settings, Path(run_dir)

    @classmethod
    def check(cls, settings: Any) -> None:
        """Before any work: its packages are installed (one line with the fix otherwise)."""
        missing = [p for p in cls.packages if not installed(p)]
        if missing:
            raise ConfigError(
                f"logger={cls.name} needs the {', '.join(missing)} package, which is not "
                f"installed; run: {cls.install} (or pip install {' '.join(missing)}), or pass "
                "logger=none"
            )

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's flattened resolved config (dotted keys; scalars, lists as text)."""

    def log_figures(self, figures: dict[str, float], step: int) -> None:
        """Numeric figures at one step."""

    def close(self, status: str) -> None:
        """The run ended with `status` (kuda_cli.run.STATUSES)."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def register_tracker(name: str, schema: type):
    """A class decorator: the class becomes tracker `name`, its settings following `schema`."""
    return REGISTRY.register(name, schema)


def get_tracker(name: str) -> type[Tracker]:
    return REGISTRY.get(str(name))


def tracker_schemas() -> dict[str, type]:
    """Tracker name -> its config schema (imports every tracker module, not their packages)."""
    return {name: tracker.schema for name, tracker in REGISTRY.all().items()}


def check_logger(logger: Any) -> None:
    """Before any work: a registered tracker whose packages are installed."""
    if logger is not None:
        get_tracker(logger.name).check(logger)


def params_of(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved config as a tracker's parameters: dotted keys, scalars as they are, null and
    lists as JSON text (no tracker takes them as values)."""
    found: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found |= params_of(value, name + ".")
        elif isinstance(value, (int, float, str, bool)):
            found[name] = value
        else:
            found[name] = json.dumps(value, default=str)
    return found


def figures(flat: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat dict (booleans and text are not figures)."""
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Tracking:
    """The run's tracker, opened at its first figure (a run refused before any result leaves no
    tracker files behind). Any failure of the tracker is logged once and ends tracking, never
    the run."""

    def __init__(self, logger: Any, run_dir: Path, params: dict[str, Any]):
        self.logger, self.run_dir, self.params = logger, Path(run_dir), params
        self.step = 0  # the last training step logged: where metrics.json's figures go
        self.tracker: Tracker | None = None
        self.stopped = logger is None

    def log_step(self, row: dict[str, Any]) -> None:
        """One row of train_log.jsonl."""
        self.step = int(row["step"])
        found = figures({k: v for k, v in row.items() if k != "step"})
        self._call("log_figures", {TRAIN_PREFIX + k: v for k, v in found.items()}, self.step)

    def log_metrics(self, flat: dict[str, Any]) -> None:
        """Figures just written to metrics.json (flattened)."""
        found = figures(flat)
        if found:
            self._call("log_figures", found, self.step)

    def close(self, status: str) -> None:
        if self.tracker is not None:
            self._call("close", status)
        self.stopped = True

    def _call(self, what: str, *args: Any) -> None:
        if self.stopped:
            return
        try:
            if self.tracker is None:
                self.tracker = get_tracker(self.logger.name)(self.logger, self.run_dir)
                self.tracker.log_params(self.params)
            getattr(self.tracker, what)(*args)
        except Exception as err:  # a copy of the run failing must not fail the run
            self.stopped = True
            log.warning(
                "logger=%s failed (%s: %s); the run goes on without it, its results stay in %s",
                self.logger.name,
                type(err).__name__,
                err,
                self.run_dir,
            )
