"""Evaluating a model on `cfg.eval`'s metrics: the starting model of `kuda unlearn` (scored on
every figure a comparison needs, in the run's before/ and cached per model, data and evaluation
settings), and the unlearned model against it."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
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
from kuda_cli.evaluate import REGISTRY, EvalContext, compute_metrics, settings_for
from kuda_cli.evaluate.attacks import run_attacks
from kuda_cli.models.loading import resolve_cache_root

log = logging.getLogger(__name__)
BEFORE = "before"
# what a starting model's evaluation writes beside its metrics, in the cache key: an entry cached
# before a change lacks the new files (2: the per-item figures the report's bootstrap resamples)
WRITTEN = 2


@dataclass(frozen=True)
class Starting:
    """The starting model's evaluation."""

    metrics: dict[str, Any]  # before/metrics.json, and metrics.json's `before`
    directory: Path  # before/: what it wrote (the answers the unlearned model's are compared with)


def evaluate_unlearned(
    cfg: DictConfig, loaded, out_dir: Path, starting: Starting | None, *, judge=None
) -> dict[str, Any]:
    """The metrics of `cfg.eval` on the unlearned model, each with the settings it scores an
    unlearned model with, against what the starting model's evaluation wrote; `judge` scores
    fluency."""
    before_dir = starting.directory if starting is not None else None
    return _evaluate(cfg, loaded, out_dir, before_dir, judge=judge, starting=False)


def attack_unlearned(
    cfg: DictConfig, loaded, out_dir: Path, starting: Starting | None, *, judge=None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, results) of each attack of `cfg.eval.attacks` on the unlearned model, scored with
    the settings its evaluation had (after `evaluate_unlearned` wrote its answers in
    `out_dir`); `judge` lends the starting model."""
    before_dir = starting.directory if starting is not None else None
    ctx = _context(cfg, loaded, out_dir, before_dir, judge=judge, starting=False)
    yield from run_attacks(ctx, before_dir, cfg.seed)


def _context(cfg, loaded, out_dir, before_dir, *, judge, starting: bool) -> EvalContext:
    """The evaluation context with each metric's settings for the starting model (`starting`:
    every figure a comparison needs) or an unlearned one."""
    eval_cfg = settings_for(OmegaConf.to_object(cfg.eval), starting=starting, before_dir=before_dir)
    return EvalContext(
        loaded=loaded,
        eval=eval_cfg,
        data=OmegaConf.to_object(cfg.data),
        out_dir=out_dir,
        cache_dir=cfg.cache_dir,
        judge=judge,
    )


def _evaluate(cfg, loaded, out_dir: Path, before_dir: Path | None, *, judge=None, starting: bool):
    """The metrics of `cfg.eval` on the loaded model, each with the settings it scores the
    starting model (`starting`: every figure a comparison needs) or an unlearned one with."""
    ctx = _context(cfg, loaded, out_dir, before_dir, judge=judge, starting=starting)
    results: dict[str, Any] = {}
    for _, found in compute_metrics(ctx):
        results.update(found)
    return results


def _before_key(cfg: DictConfig, model_key: str) -> str:
    evaluation = OmegaConf.to_container(cfg.eval, resolve=True)
    for key in ("attacks", "attack"):  # attacks apply to the unlearned model only
        evaluation.pop(key, None)
    for metric in REGISTRY.all().values():  # the starting model is scored whatever they say
        for key in metric.after_only:
            evaluation[metric.section].pop(key, None)
    blob = json.dumps(
        {
            "model": model_key,
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "eval": evaluation,
            "written": WRITTEN,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_starting(cfg: DictConfig, loaded, run_dir: Path, model_key: str) -> Starting | None:
    """The starting model's metrics, in `before/` of the run directory; cached under the cache
    root per (model, data, eval settings). None with eval.before=false and on every process
    but the first."""
    if not cfg.eval.before or not distributed.is_main():
        return None
    out = Path(run_dir) / BEFORE
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
            metrics = _evaluate(cfg, loaded, out, None, starting=True)
            write_json_atomic(out / "metrics.json", metrics)
            tmp = staging_dir(cached)
            shutil.copytree(out, tmp, dirs_exist_ok=True)
            publish(tmp, cached, {"key": key, "model": cfg.model.name, "data": cfg.data.name})
    return Starting(metrics, out)
