"""logger=tensorboard: TensorBoard event files under the run directory (`tensorboard --logdir
RUN_DIR/tensorboard`); the parameters go to the HPARAMS tab."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuda_cli.trackers import Tracker, register_tracker


@dataclass
class TensorBoardLogger:
    name: str = "tensorboard"
    save_dir: str = "tensorboard"  # relative to the run directory (or absolute)


@register_tracker("tensorboard", TensorBoardLogger)
class TensorBoardTracker(Tracker):
    packages = ("tensorboard",)

    def __init__(self, settings: TensorBoardLogger, run_dir):
        super().__init__(settings, run_dir)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(self.run_dir / Path(settings.save_dir).expanduser())
        )

    def log_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # written into this run's own event file (SummaryWriter.add_hparams would make a run
        # of its own beside it)
        shown = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()
        }
        writer = self.writer._get_file_writer()
        for summary in hparams(shown, {}):
            writer.add_summary(summary)

    def log_figures(self, figures: dict[str, float], step: int) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()
