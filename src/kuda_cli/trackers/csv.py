"""logger=csv: the figures as rows of one CSV file, the parameters in another, under the run
directory (no package needed)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuda_cli.trackers import Tracker, register_tracker

METRICS_FILE = "metrics.csv"  # step,key,value: one row per figure, appended as they come
PARAMS_FILE = "params.csv"  # key,value: the flattened resolved config


@dataclass
class CsvLogger:
    name: str = "csv"
    save_dir: str = "csv"  # relative to the run directory (or absolute)


@register_tracker("csv", CsvLogger)
class CsvTracker(Tracker):
    def __init__(self, settings: CsvLogger, run_dir):
        super().__init__(settings, run_dir)
        self.dir = self.run_dir / Path(settings.save_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.dir / METRICS_FILE
        if not self.metrics.exists():  # a resumed run appends to its earlier attempt's rows
            self._append([("step", "key", "value")])

    def _append(self, rows: list[tuple[Any, ...]]) -> None:
        with open(self.metrics, "a", newline="") as f:
            csv.writer(f).writerows(rows)

    def log_params(self, params: dict[str, Any]) -> None:
        with open(self.dir / PARAMS_FILE, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("key", "value"))
            writer.writerows(params.items())

    def log_figures(self, figures: dict[str, float], step: int) -> None:
        self._append([(step, key, value) for key, value in figures.items()])
