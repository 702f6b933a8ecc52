"""kuda eval: load a model (hub id, local path, a run's checkpoint) and compute eval.metrics."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from kuda_cli.evaluate import get_metric
from kuda_cli.run import Run
from kuda_cli.stages.common import load_configured_model

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run: Run) -> None:
    loaded = load_configured_model(cfg, run)
    eval_cfg = OmegaConf.to_object(cfg.eval)
    for name in eval_cfg.metrics:
        log.info("metric %s", name)
        results = get_metric(name)(loaded, eval_cfg)
        run.log_metrics(results)
        log.info("%s: %s", name, results)
