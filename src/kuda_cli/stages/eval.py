"""kuda eval: load a model (hub id, local path, a run's checkpoint) and compute eval.metrics."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from kuda_cli.evaluate import EvalContext, compute_metrics
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
