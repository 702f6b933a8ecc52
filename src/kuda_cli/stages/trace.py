"""kuda trace: causal tracing on the data's probes. Writes trace/effects.npz, ROME-style heatmaps,
trace/effect_by_layer.png and trace/layers.json (the selected window of layers)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from kuda_cli.cache import model_fingerprint
from kuda_cli.locate.pipeline import trace_layers
from kuda_cli.run import Run
from kuda_cli.stages.common import load_configured_model, recorded

log = logging.getLogger(__name__)


def main(cfg: DictConfig, run: Run) -> None:
    loaded = load_configured_model(cfg, run)
    if cfg.locate.method == "fixed" or cfg.locate.from_run:
        log.info("kuda trace always traces: locate=fixed and locate.from_run apply to kuda unlearn")
    recorded(run, trace_layers(cfg, loaded, run.dir, model_fingerprint(loaded.model)))
