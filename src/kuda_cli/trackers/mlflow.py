"""logger=mlflow: an MLflow run, by default in a local store under the run directory (a SQLite
file: MLflow 3 refuses its older directory store unless MLFLOW_ALLOW_FILE_STORE=true), seen with
`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow/mlflow.db`; `tracking_uri` names a server
or a shared store instead."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuda_cli.trackers import Tracker, register_tracker

STORE_FILE = "mlflow.db"
BATCH = 100  # MLflow's limit of params per log_batch call (1000 for metrics)
MAX_PARAM = 6000  # MLflow's limit of a param value's length


@dataclass
class MlflowLogger:
    name: str = "mlflow"
    experiment_name: str = "kuda"
    run_name: str | None = None  # null: the run directory's name
    # null: RUN_DIR/<save_dir>/mlflow.db; else any MLflow tracking URI (http://, sqlite:, file:)
    tracking_uri: str | None = None
    save_dir: str = "mlflow"  # relative to the run directory (or absolute)


def key_of(name: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . space /)."""
    return re.sub(r"[^\w\-. /]", "_", name)


@register_tracker("mlflow", MlflowLogger)
class MlflowTracker(Tracker):
    packages = ("mlflow",)

    def __init__(self, settings: MlflowLogger, run_dir):
        super().__init__(settings, run_dir)
        from mlflow.tracking import MlflowClient

        store = (self.run_dir / Path(settings.save_dir).expanduser()).resolve()
        uri = settings.tracking_uri
        if uri is None:
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / STORE_FILE}"
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(settings.experiment_name)
        experiment = (
            found.experiment_id
            if found is not None
            # artifacts beside the store, not in ./mlruns of whatever directory kuda runs from
            else self.client.create_experiment(
                settings.experiment_name, artifact_location=(store / "artifacts").as_uri()
            )
        )
        name = settings.run_name or self.run_dir.name
        self.run_id = self.client.create_run(experiment, run_name=name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        found = [Param(key_of(k), str(v)[:MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(found), BATCH):
            self.client.log_batch(self.run_id, params=found[i : i + BATCH])

    def log_figures(self, figures: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        found = [Metric(key_of(k), v, now, step) for k, v in figures.items()]
        for i in range(0, len(found), 10 * BATCH):
            self.client.log_batch(self.run_id, metrics=found[i : i + 10 * BATCH])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")
