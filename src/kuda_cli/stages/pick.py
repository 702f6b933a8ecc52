"""kuda pick: two-stage tuning's choice. Among the runs of a sweep (`tune.runs`), keep those whose
utility (`tune.utility`, higher is better) is within `tune.tolerance` of the starting model's, and
choose the one with the largest change (`tune.objective`, or the smallest with
`tune.direction=min`). The choice goes to `choice.yaml`: the chosen run's values of `tune.carry`,
which `tune.choice=FILE` turns into overrides of the next sweep. Failed and unfinished runs are
ignored with a warning; when no run qualifies the stage stops with one line (exit status 2).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from kuda_cli.errors import UserError
from kuda_cli.run import Run, find_runs, lookup, read_meta

log = logging.getLogger(__name__)
CHOICE_FILE = "choice.yaml"
CANDIDATES_FILE = "candidates.csv"


@dataclass
class Candidate:
    run: Path
    objective: float
    utility: float
    baseline: float
    settings: dict[str, Any]

    @property
    def ratio(self) -> float:
        return self.utility / self.baseline if self.baseline else float("inf")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_candidates(run_dirs: list[Path], tune) -> tuple[list[Candidate], list[str]]:
    """A candidate per completed run that reports the objective, the utility and its baseline,
    and sets every key of `tune.carry`; a warning for each other run."""
    found, ignored = [], []
    for run_dir in run_dirs:
        meta = read_meta(run_dir) or {}
        if meta.get("status") != "completed":
            ignored.append(f"{run_dir} (status {meta.get('status', 'unknown')})")
            continue
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
            config = OmegaConf.load(run_dir / "config.yaml")
        except (OSError, ValueError, yaml.YAMLError) as err:
            ignored.append(f"{run_dir} (unreadable metrics.json or config.yaml: {err})")
            continue
        objective = _number(lookup(metrics, tune.objective))
        utility = _number(lookup(metrics, tune.utility))
        baseline = (
            tune.baseline
            if tune.baseline is not None
            else _number(lookup(metrics, f"before.{tune.utility}"))
        )
        missing = [
            key
            for key, value in (
                (tune.objective, objective),
                (tune.utility, utility),
                (f"before.{tune.utility} (or tune.baseline)", baseline),
            )
            if value is None
        ]
        settings = {key: OmegaConf.select(config, key, default=None) for key in tune.carry}
        missing += [f"config {k}" for k, v in settings.items() if v is None]
        if missing:
            ignored.append(f"{run_dir} (no {', '.join(missing)})")
            continue
        settings = {
            k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
            for k, v in settings.items()
        }
        found.append(Candidate(run_dir, objective, utility, float(baseline), settings))
    return found, ignored


def qualifies(candidate: Candidate, tolerance: float) -> bool:
    return candidate.utility >= (1.0 - tolerance) * candidate.baseline


def choose(candidates: list[Candidate], tune) -> Candidate:
    """The qualifying candidate with the largest (or smallest) objective; ties: higher utility,
    then the first run."""
    if not candidates:
        raise UserError(
            f"no completed run under tune.runs={list(tune.runs)} reports {tune.objective} and "
            f"{tune.utility}; check the sweep's directory and the metric keys"
        )
    sign = 1.0 if tune.direction == "max" else -1.0
    good = [c for c in candidates if qualifies(c, tune.tolerance)]
    if not good:
        best = max(candidates, key=lambda c: c.ratio)
        raise UserError(
            f"none of the {len(candidates)} runs keeps {tune.utility} within "
            f"{tune.tolerance:.0%} of the starting model's (best: {best.utility:.4g} of "
            f"{best.baseline:.4g}, run {best.run}); sweep gentler settings (a lower lr, a larger "
            "tau) or raise tune.tolerance"
        )
    return max(enumerate(good), key=lambda ic: (sign * ic[1].objective, ic[1].utility, -ic[0]))[1]


def write_candidates(candidates: list[Candidate], tune, path: Path) -> None:
    keys = list(tune.carry)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *keys, tune.objective, tune.utility, "baseline", "qualifies"])
        for c in candidates:
            writer.writerow(
                [
                    str(c.run),
                    *(c.settings[k] for k in keys),
                    c.objective,
                    c.utility,
                    c.baseline,
                    qualifies(c, tune.tolerance),
                ]
            )


def choice_record(chosen: Candidate, tune, candidates: list[Candidate]) -> dict[str, Any]:
    return {
        "overrides": dict(chosen.settings),
        "run": str(chosen.run.resolve()),
        "objective": {
            "key": tune.objective,
            "direction": tune.direction,
            "value": chosen.objective,
        },
        "utility": {
            "key": tune.utility,
            "value": chosen.utility,
            "baseline": chosen.baseline,
            "ratio": chosen.ratio,
            "tolerance": tune.tolerance,
        },
        "candidates": len(candidates),
        "qualified": sum(qualifies(c, tune.tolerance) for c in candidates),
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
    candidates, ignored = read_candidates(run_dirs, tune)
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
        "kuda pick: %s (%s=%.4g, %s=%.4g of %.4g) from %s; %d of %d runs qualify, %d ignored; "
        "choice in %s",
        shown,
        tune.objective,
        chosen.objective,
        tune.utility,
        chosen.utility,
        chosen.baseline,
        chosen.run,
        record["qualified"],
        len(candidates),
        len(ignored),
        run.dir / CHOICE_FILE,
    )
