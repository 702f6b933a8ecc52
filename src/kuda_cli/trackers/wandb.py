"""logger=wandb: a Weights & Biases run (its local files under RUN_DIR/wandb/). `mode: offline`
(or WANDB_MODE=offline) needs no network: `wandb sync RUN_DIR/wandb/offline-run-*` uploads it
later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuda_cli.config import choice, listed
from kuda_cli.trackers import Tracker, register_tracker


@dataclass
class WandbLogger:
    name: str = "wandb"
    project: str = "kuda"
    entity: str | None = None  # a team or user; null: the logged-in user's default
    # null: WANDB_MODE, else wandb's own default (online)
    mode: str | None = choice(None, None, "online", "offline", "disabled")
    run_name: str | None = None  # null: the run directory's name
    group: str | None = None  # e.g. a sweep's name
    tags: list[str] = listed()
    save_dir: str = "."  # where wandb/ goes, relative to the run directory (or absolute)


@register_tracker("wandb", WandbLogger)
class WandbTracker(Tracker):
    packages = ("wandb",)

    def __init__(self, settings: WandbLogger, run_dir):
        super().__init__(settings, run_dir)
        import wandb

        save_dir = self.run_dir / Path(settings.save_dir).expanduser()
        save_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            mode=settings.mode,
            name=settings.run_name or self.run_dir.name,
            group=settings.group,
            tags=list(settings.tags) or None,
            dir=str(save_dir),
            reinit="create_new",  # a process running several jobs opens one run per job
        )

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_figures(self, figures: dict[str, float], step: int) -> None:
        self.run.log(figures, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)
