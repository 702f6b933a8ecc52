"""kuda trace: placeholder until causal tracing lands (issue #4). It loads the model, checks the
layer settings against the model's depth and writes the run directory; it computes nothing yet."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from kuda_cli.run import Run
from kuda_cli.stages.common import load_configured_model

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run: Run) -> None:
    load_configured_model(cfg, run)
    log.warning(
        "kuda trace: causal tracing is not implemented yet (issue #4); this run only loaded "
        "the model and wrote the run directory"
    )
