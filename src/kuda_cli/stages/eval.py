"""kuda eval: load a model (hub id, local path, a run's checkpoint), compute eval.metrics, then
apply eval.attacks (against the starting model's evaluation in the run's before/ when the model
is a `kuda unlearn` run's checkpoint)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kuda_cli.evaluate import EvalContext, compute_metrics
from kuda_cli.evaluate.attacks import run_attacks
from kuda_cli.evaluate.runner import BEFORE
from kuda_cli.run import Run
from kuda_cli.stages.common import load_configured_model

log = logging.getLogger(__name__)


def main(cfg: DictConfig, run: Run) -> None:
    loaded = load_configured_model(cfg, run)
    ctx = EvalContext(
        loaded=loaded,
        eval=OmegaConf.to_object(cfg.eval),
        data=OmegaConf.to_object(cfg.data),
        out_dir=run.dir,
        cache_dir=cfg.cache_dir,
    )
    for name, results in compute_metrics(ctx):
        run.log_metrics(results)
        log.info("%s: %s", name, results)
    for name, results in run_attacks(ctx, starting_evaluation(cfg), cfg.seed):
        run.log_metrics({"attacks": {name: results}})
        log.info("attack %s: %s", name, results)


def starting_evaluation(cfg: DictConfig) -> Path | None:
    """The starting model's evaluation of the `kuda unlearn` run whose checkpoint is loaded
    (RUN/before/ beside RUN/checkpoint/), or None."""
    if not cfg.model.get("path"):
        return None
    before = Path(str(cfg.model.path)).expanduser().resolve().parent / BEFORE
    return before if (before / "metrics.json").is_file() else None
