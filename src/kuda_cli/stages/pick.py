"""kuda pick: two-stage tuning's choice. Among the runs of a sweep (`tune.runs`), keep those whose
utility (`tune.utility`, higher is better) is within `tune.tolerance` of the starting model's, and
choose the one with the largest change (`tune.objective`, or the smallest with
`tune.direction=min`). The choice goes to `choice.yaml`: the chosen run's values of `tune.carry`,
which `tune.choice=FILE` turns into overrides of the next sweep. Failed and unfinished runs are
ignored with a warning; when no run qualifies the stage stops with one line (exit status 2).
What stable and strongest mean is unlearn/tuning.py's, shared with unlearn.auto_tune.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from kuda_cli.errors import UserError
from kuda_cli.run import Run, find_runs, lookup, read_meta
from kuda_cli.unlearn import tuning
from kuda_cli.unlearn.tuning import Candidate

log = logging.getLogger(__name__)
CHOICE_FILE = "choice.yaml"
CANDIDATES_FILE = "candidates.csv"


def read_candidate(run_dir: Path, tune) -> Candidate | str:
    """The run's candidate: a completed run that reports the objective, the utility and its
    baseline, and sets every key of `tune.carry`; else why it is ignored."""
    meta = read_meta(run_dir) or {}
    if meta.get("status") != "completed":
        return f"{run_dir} (status {meta.get('status', 'unknown')})"
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        config = OmegaConf.load(run_dir / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError) as err:
        return f"{run_dir} (unreadable metrics.json or config.yaml: {err})"
    objective = tuning.figure(lookup(metrics, tune.objective))
    utility = tuning.figure(lookup(metrics, tune.utility))
    before = f"before.{tune.utility}"
    baseline = (
        tune.baseline if tune.baseline is not None else tuning.figure(lookup(metrics, before))
    )
    settings = {key: OmegaConf.select(config, key, default=None) for key in tune.carry}
    figures = (
        (tune.objective, objective),
        (tune.utility, utility),
        (f"{before} (or tune.baseline)", baseline),
    )
    missing = [key for key, value in figures if value is None]
    missing += [f"config {k}" for k, v in settings.items() if v is None]
    if missing:
        return f"{run_dir} (no {', '.join(missing)})"
    settings = {
        k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in settings.items()
    }
    return Candidate(objective, utility, float(baseline), settings=settings, source=run_dir)


def limits(tune) -> tuning.Limits:
    """Stable, for kuda pick: the utility within `tune.tolerance` of its baseline."""
    return tuning.Limits(tolerance=tune.tolerance)


def choose(candidates: list[Candidate], tune) -> Candidate:
    """The qualifying candidate with the largest (or smallest) objective; ties: higher utility,
    then the first run."""
    if not candidates:
        raise UserError(
            f"no completed run under tune.runs={list(tune.runs)} reports {tune.objective} and "
            f"{tune.utility}; check the sweep's directory and the metric keys"
        )
    chosen, how = tuning.choose(candidates, limits(tune), direction=tune.direction)
    if how == tuning.NONE_STABLE:
        best = max(candidates, key=lambda c: c.ratio)
        raise UserError(
            f"none of the {len(candidates)} runs keeps {tune.utility} within "
            f"{tune.tolerance:.0%} of the starting model's (best: {best.utility:.4g} of "
            f"{best.baseline:.4g}, run {best.source}); sweep gentler settings (a lower lr, a "
            "larger tau) or raise tune.tolerance"
        )
    return chosen


def write_candidates(candidates: list[Candidate], tune, path: Path) -> None:
    keys = list(tune.carry)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *keys, tune.objective, tune.utility, "baseline", "qualifies"])
        for c in candidates:
            row = [c.source, *(c.settings[k] for k in keys), c.forgetting, c.utility, c.baseline]
            writer.writerow([*row, tuning.stable(c, limits(tune))])


def choice_record(chosen: Candidate, tune, candidates: list[Candidate]) -> dict[str, Any]:
    objective = {"key": tune.objective, "direction": tune.direction, "value": chosen.forgetting}
    return {
        "overrides": dict(chosen.settings),
        "run": str(chosen.source.resolve()),
        "objective": objective,
        "utility": {
            "key": tune.utility,
            "value": chosen.utility,
            "baseline": chosen.baseline,
            "ratio": chosen.ratio,
            "tolerance": tune.tolerance,
        },
        "candidates": len(candidates),
        "qualified": sum(tuning.stable(c, limits(tune)) for c in candidates),
    }


def main(cfg: DictConfig, run: Run) -> None:
    tune = cfg.tune
    run_dirs = find_runs(list(tune.runs), exclude=run.dir)
    run_dirs = [d for d in run_dirs if (read_meta(d) or {}).get("stage") != "pick"]
    if not run_dirs:
        raise UserError(
            f"tune.runs={list(tune.runs)} matches no run directory (none holds meta.json); "
            "pass the sweep's directory, e.g. tune.runs=[outputs/unlearn/multirun/DATE_TIME]"
        )
    read = [read_candidate(d, tune) for d in run_dirs]
    candidates = [c for c in read if isinstance(c, Candidate)]
    ignored = [why for why in read if isinstance(why, str)]
    for why in ignored:
        log.warning("kuda pick: ignoring %s", why)
    if candidates:
        write_candidates(candidates, tune, run.dir / CANDIDATES_FILE)
    chosen = choose(candidates, tune)
    record = choice_record(chosen, tune, candidates)
    header = (
        f"# kuda pick: the run with the {'largest' if tune.direction == 'max' else 'smallest'} "
        f"{tune.objective} keeping {tune.utility} within {tune.tolerance:.0%} of the starting "
        "model.\n# Start the next sweep from it: tune.choice=THIS_FILE\n"
    )
    (run.dir / CHOICE_FILE).write_text(header + yaml.safe_dump(record, sort_keys=False))
    run.log_metrics({"pick": {**record, "ignored": len(ignored)}})
    shown = " ".join(f"{k}={v}" for k, v in chosen.settings.items())
    log.info(
        f"kuda pick: {shown} ({tune.objective}={chosen.forgetting:.4g}, {tune.utility}="
        f"{chosen.utility:.4g} of {chosen.baseline:.4g}) from {chosen.source}; "
        f"{record['qualified']} of {len(candidates)} runs qualify, {len(ignored)} ignored; "
        f"choice in {run.dir / CHOICE_FILE}"
    )
