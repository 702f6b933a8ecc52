"""kuda report: one row per run directory (globs in report.runs), its status, the method and its
key hyper-parameters, and the flattened metrics, written as report.md, report.csv and report.tex
(booktabs). The starting model of the unlearn runs comes first (one row per model and data, from
the `before` metrics every unlearn run keeps). Failed and unfinished runs are listed with their
status, never dropped. The markdown and LaTeX tables show what a reader looks at first (each
metric's `report_columns`), `report.columns` other metrics or all of them; the CSV keeps them
all. `report.frontier` adds the trade-off curves, `report.robustness` what stays removed under
each attack; report.html puts the table and every plot on one self-contained page."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from kuda_cli.errors import UserError
from kuda_cli.report_html import write_html
from kuda_cli.report_robustness import write_robustness
from kuda_cli.report_tables import (
    chosen_columns,
    data_label,
    settings,
    write_frontier,
    write_tables,
)
from kuda_cli.run import Run, find_runs, flatten, read_meta

log = logging.getLogger(__name__)
START = "starting model"


def _layers(metrics: dict[str, Any]) -> str | None:
    """The layers an unlearn run located (traced, reused or fixed), as `2,3,4`."""
    layers = (metrics.get("locate") or {}).get("layers")
    return ",".join(str(layer) for layer in layers) if isinstance(layers, list) else None


def _flat(metrics: dict[str, Any], metric_prefix: str | None) -> dict[str, Any]:
    flat = flatten(metrics)
    return {k: v for k, v in flat.items() if not metric_prefix or k.startswith(metric_prefix)}


def starting_rows(
    runs: list[tuple[dict[str, Any], dict[str, Any]]], metric_prefix: str | None
) -> list[dict[str, Any]]:
    """One row per (model, data) of the unlearn runs (`(row, before)` pairs): the starting
    model's metrics, which every unlearn run evaluated (or took from the cache) under `before`."""
    out: dict[tuple, dict[str, Any]] = {}
    for row, before in runs:
        key = (row["model"], row["data"])
        if key not in out:
            out[key] = {
                "run": str(Path(row["run"]) / "before"),
                "stage": "eval",
                "status": "completed",
                "model": row["model"],
                "method": START,
                "settings": "",
                "layers": "",
                "data": row["data"],
                **_flat(before, metric_prefix),
            }
    return list(out.values())


def collect_rows(run_dirs: list[Path], metric_prefix: str | None) -> list[dict[str, Any]]:
    """The rows of the table: the starting models first, then one per run directory."""
    rows, started = [], []
    for run_dir in run_dirs:
        meta = read_meta(run_dir) or {}
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        before = metrics.pop("before", None)  # the starting model: a row of its own
        config = _config(run_dir)
        unlearn = config.get("unlearn") or {}
        tuned = (metrics.get("auto_tune") or {}).get("lr")
        if tuned is not None:  # unlearn.auto_tune: the learning rate the run chose
            unlearn = {**unlearn, "lr": tuned}
        is_unlearn = meta.get("stage") == "unlearn"
        row = {
            "run": str(run_dir),
            "stage": meta.get("stage"),
            "status": meta.get("status", "unknown"),
            "model": (meta.get("model") or {}).get("name")
            or (config.get("model") or {}).get("name"),
            # a table's row names: the method and its settings (unlearn runs), the data
            "method": unlearn.get("method") if is_unlearn else None,
            "settings": settings(unlearn) if is_unlearn else None,
            "layers": _layers(metrics) if is_unlearn else None,
            "data": data_label(config.get("data") or {}),
            **_flat(metrics, metric_prefix),
        }
        rows.append(row)
        if is_unlearn and before:
            started.append((row, before))
    return starting_rows(started, metric_prefix) + rows


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def main(cfg: DictConfig, run: Run) -> None:
    run_dirs = find_runs(list(cfg.report.runs), exclude=run.dir)
    if not run_dirs:
        raise UserError(
            f"report.runs={list(cfg.report.runs)} matches no run directory (none holds meta.json); "
            "pass report.runs=[DIR_OR_GLOB,...]"
        )
    rows = collect_rows(run_dirs, cfg.report.metric_prefix)
    columns = write_tables(rows, run.dir, chosen_columns(cfg.report.columns, rows))
    if cfg.report.frontier:
        lo, hi = (float(v) for v in cfg.report.frontier_range)
        write_frontier(rows, run.dir, lo, hi, cfg.report.bootstrap, cfg.seed)
        log.info("trade-off curves: %s", run.dir / "frontier.md")
    if cfg.report.robustness:
        write_robustness(rows, run.dir)
        log.info("forget removed under attack: %s", run.dir / "robustness.md")
    metas = [read_meta(run_dir) or {} for run_dir in run_dirs]
    log.info("summary page: %s", write_html(run.dir, rows, columns, metas, run.meta))
    run.log_metrics(
        {"report": {"runs": len(rows), "failed": sum(r["status"] != "completed" for r in rows)}}
    )
    log.info("report of %d runs: %s", len(rows), run.dir / "report.md")
