"""Evaluating a model on `cfg.eval`'s metrics: the unlearned model against its starting model,
and the starting model itself (scored on every reference figure, cached per model, data and
evaluation settings)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from shutil import ignore_patterns
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kuda_cli import distributed
from kuda_cli.cache import (
    MANIFEST,
    entry_lock,
    publish,
    staging_dir,
    verify_manifest,
    write_json_atomic,
)
from kuda_cli.evaluate import EvalContext, compute_metrics
from kuda_cli.models.loading import resolve_cache_root
from kuda_cli.run import Run

log = logging.getLogger(__name__)
BEFORE = "before"
# eval.facts settings that change only what the unlearned model is scored on
AFTER_ONLY = ("floors", "retain_greedy")


def evaluate(cfg, loaded, out_dir: Path, before, *, judge=None, starting=False):
    """The metrics of `cfg.eval` on the loaded model. The starting model (`starting`) is
    scored on every figure a comparison needs (floors, retain answers: the reference); the
    unlearned one against it, without the floors (they belong to the starting model)."""
    eval_cfg = OmegaConf.to_object(cfg.eval)
    if starting:
        eval_cfg.facts = replace(eval_cfg.facts, floors=True, retain_greedy=True)
    else:
        eval_cfg.facts = replace(eval_cfg.facts, floors=False)
    if before is not None and before.get("reference") and not eval_cfg.facts.reference:
        eval_cfg.facts = replace(eval_cfg.facts, reference=before["reference"])
    ctx = EvalContext(
        loaded=loaded,
        eval=eval_cfg,
        data=OmegaConf.to_object(cfg.data),
        out_dir=out_dir,
        cache_dir=cfg.cache_dir,
        judge=judge,
    )
    results: dict[str, Any] = {}
    for _, found in compute_metrics(ctx):
        results.update(found)
    return results


def _before_key(cfg: DictConfig, model_key: str) -> str:
    evaluation = OmegaConf.to_container(cfg.eval, resolve=True)
    for key in AFTER_ONLY:  # the starting model is scored on all of them whatever they say
        evaluation["facts"].pop(key, None)
    blob = json.dumps(
        {
            "model": model_key,
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "eval": evaluation,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_before(cfg: DictConfig, loaded, run: Run, model_key: str) -> dict[str, Any] | None:
    """The starting model's metrics, in `before/` of the run directory and under `before` in
    metrics.json; cached under the cache root per (model, data, eval settings)."""
    if not cfg.eval.before or not distributed.is_main():
        return None
    out = run.dir / BEFORE
    key = _before_key(cfg, model_key)
    cached = resolve_cache_root(cfg.cache_dir) / "evals" / key
    # one process evaluates, the others sharing the cache wait and read its checked copy
    with entry_lock(cached):
        problem = verify_manifest(cached) if cached.exists() else "absent"
        if problem is None:
            log.info("starting model's evaluation from the cache %s", cached)
            shutil.copytree(cached, out, dirs_exist_ok=True, ignore=ignore_patterns(MANIFEST))
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            if problem != "absent":
                log.warning("cached evaluation %s cannot be trusted (%s): redone", cached, problem)
            shutil.rmtree(out, ignore_errors=True)  # nothing of an earlier attempt is cached
            out.mkdir(parents=True)
            metrics = evaluate(cfg, loaded, out, None, starting=True)
            write_json_atomic(out / "metrics.json", metrics)
            tmp = staging_dir(cached)
            shutil.copytree(out, tmp, dirs_exist_ok=True)
            publish(tmp, cached, {"key": key, "model": cfg.model.name, "data": cfg.data.name})
    run.log_metrics({"before": metrics})
    answers = out / "facts_answers.jsonl"
    return {**metrics, "reference": str(answers) if answers.exists() else None}
