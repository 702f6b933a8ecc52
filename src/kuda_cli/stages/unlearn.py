"""kuda unlearn: locate the layers, evaluate the starting model (cached), unlearn with the chosen
method on the shared trainer, compute the diagnostics, evaluate the result; one run directory."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig, OmegaConf

from kuda_cli.cache import model_fingerprint
from kuda_cli.evaluate import summarise
from kuda_cli.evaluate.runner import (
    Starting,
    attack_unlearned,
    evaluate_starting,
    evaluate_unlearned,
)
from kuda_cli.evaluate.side_by_side import write_side_by_side
from kuda_cli.locate.pipeline import find_layers
from kuda_cli.run import Run, set_seed
from kuda_cli.stages.common import load_configured_model, recorded
from kuda_cli.unlearn.methods import get_method
from kuda_cli.unlearn.session import UnlearnSession, tokenized_data
from kuda_cli.validate import validate_layers_against

log = logging.getLogger(__name__)


def main(cfg: DictConfig, run: Run) -> None:
    get_method(cfg.unlearn.method)  # an unimplemented method stops before any work
    loaded = load_configured_model(cfg, run)
    model_key = model_fingerprint(loaded.model)
    layers = recorded(run, find_layers(cfg, loaded, run.dir, model_key))
    validate_layers_against(OmegaConf.merge(cfg, {"locate": {"layers": layers}}), loaded.num_layers)
    run.log_metrics({"locate": {"method": cfg.locate.method, "layers": layers}})
    data = tokenized_data(cfg, loaded.tokenizer)

    starting = evaluate_starting(cfg, loaded, run.dir, model_key) if cfg.eval.metrics else None
    if starting is not None:
        run.log_metrics({"before": starting.metrics})

    session = UnlearnSession(cfg, loaded, layers, data, run.dir, model_key, on_step=run.log_step)
    if session.ucfg.auto_tune.enabled:  # trials from the starting weights choose the lr
        run.log_metrics({"auto_tune": session.auto_tune()})
        set_seed(cfg.seed)
    trained = session.train()
    if trained is None:  # several processes: process 0 evaluates and writes the rest
        return
    run.log_metrics(trained)
    session.close()
    if cfg.eval.metrics:
        after = evaluate_unlearned(
            cfg, session.loaded, run.dir, starting, judge=session.starting_judge()
        )
        run.log_metrics(after)
        if starting is not None:
            compare(cfg, run, starting, after)
        for name, found in attack_unlearned(
            cfg, session.loaded, run.dir, starting, judge=session.starting_judge()
        ):
            run.log_metrics({"attacks": {name: found}})


def compare(cfg: DictConfig, run: Run, starting: Starting, after: dict) -> None:
    """The summary against the starting model (metrics.json's `summary`) and, for the facts,
    the greedy answers before and after side by side (answers.md, printed)."""
    summary = summarise(starting.metrics, after, OmegaConf.to_object(cfg.eval))
    run.log_metrics({"summary": summary})
    log.info("summary: %s", json.dumps(run.metrics["summary"]))
    table = write_side_by_side(run.dir)
    if table is not None:
        print(f"\nGreedy answers before and after ({run.dir / 'answers.md'}):\n{table}\n")
