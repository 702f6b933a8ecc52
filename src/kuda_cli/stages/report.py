"""kuda report: one row per run directory (globs in report.runs), its status, the method and its
key hyper-parameters, and the flattened metrics, written as report.md, report.csv and report.tex
(booktabs). The starting model of the unlearn runs comes first (one row per model and data, from
the `before` metrics every unlearn run keeps). Failed and unfinished runs are listed with their
status, never dropped. `report.columns` narrows the markdown and LaTeX tables to some metrics;
the CSV keeps them all."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from kuda_cli.cache import write_json_atomic
from kuda_cli.errors import UserError
from kuda_cli.evaluate.tradeoff import Point, compare, markdown_table, plot_frontier, points_table
from kuda_cli.run import Run, find_runs, flatten, read_meta

log = logging.getLogger(__name__)


# the trainer's knobs a table names for every method; a method's own fields are added to them
COMMON_SETTINGS = ("lr", "steps", "optimizer")
START = "starting model"


def settings(unlearn: dict[str, Any]) -> str:
    """The key hyper-parameters of an unlearn run as one short cell: the common knobs, then the
    scalar fields the method's schema adds to the shared trainer's (beta, c, alpha, ...)."""
    from dataclasses import fields

    from kuda_cli.config import UnlearnConfig
    from kuda_cli.unlearn.methods import get_method, method_modules

    name = str(unlearn.get("method"))
    method = get_method(name) if name in method_modules() else None
    shared = {f.name for f in fields(UnlearnConfig)}
    own = [f.name for f in fields(method.schema) if f.name not in shared] if method else []
    parts = [f"{k}={_cell(unlearn[k])}" for k in (*COMMON_SETTINGS, *own) if _scalar(unlearn, k)]
    if method is not None:
        parts += [f"{label}={_cell(value)}" for label, value in method.report_settings(unlearn)]
    if (unlearn.get("auto_tune") or {}).get("enabled"):
        parts.append("auto_tune")
    return " ".join(parts)


def _layers(metrics: dict[str, Any]) -> str | None:
    """The layers an unlearn run located (traced, reused or fixed), as `2,3,4`."""
    layers = (metrics.get("locate") or {}).get("layers")
    return ",".join(str(layer) for layer in layers) if isinstance(layers, list) else None


def _scalar(d: dict[str, Any], key: str) -> bool:
    return key in d and isinstance(d[key], (int, float, str, bool))


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


def data_label(data: dict[str, Any]) -> str | None:
    """The data of a run as a table names it: `facts:capitals` for the facts set with capitals
    forgotten (each forget set has its own starting-model row), else the data option's name."""
    name = data.get("name")
    forget = data.get("forget_domains")
    if isinstance(forget, list) and forget:
        return f"{name}:{'+'.join(str(d) for d in forget)}"
    return name


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


ROW_NAMES = ("run", "stage", "status", "model", "method", "settings", "layers", "data")


def write_tables(rows: list[dict[str, Any]], out_dir: Path, shown: list[str] | None = None) -> None:
    """report.csv with every column; report.md and report.tex with the row names and the metrics
    in `shown` (dotted keys or prefixes, in that order; None: all)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if shown:
        metrics = [
            c
            for want in shown
            for c in columns
            if c not in ROW_NAMES and (c == want or c.startswith(want + "."))
        ]
        columns = [c for c in columns if c in ROW_NAMES] + list(dict.fromkeys(metrics))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    tex = [
        "\\begin{tabular}{" + "l" * len(columns) + "}",
        "\\toprule",
        " & ".join(_tex(c) for c in columns) + " \\\\",
        "\\midrule",
        *(" & ".join(_tex(_cell(row.get(c))) for c in columns) + " \\\\" for row in rows),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    (out_dir / "report.tex").write_text("\n".join(tex) + "\n")


TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
}


def _tex(text: str) -> str:
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in text)


# the damage figures of the trade-off curves: (panel title, row key, transform, the starting
# model's damage: every method's curve starts there, its learning rate 0)
DAMAGE = (
    ("perplexity ratio", "summary.perplexity_ratio", lambda v: v, 1.0),
    (
        "1 - other-subject token agreement",
        "summary.retain_other_token_agreement",
        lambda v: 1 - v,
        0.0,
    ),
)


def display_name(method: str) -> str:
    """A method's name in tables and plots, as its class says (a name no longer registered: in
    capitals)."""
    from kuda_cli.unlearn.methods import get_method, method_modules

    return get_method(method).display_name if method in method_modules() else method.upper()


def frontier_curves(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[Point]]]]:
    """Per forget set (the data label), per damage figure, per method: the starting model (x 0,
    its damage; labelled `start`), then one point per completed unlearn run, x =
    summary.forget_removed, labelled with the run's learning rate."""
    out: dict[str, dict[str, dict[str, list[Point]]]] = {}
    for row in rows:
        x = row.get("summary.forget_removed")
        if row.get("stage") != "unlearn" or row.get("status") != "completed" or x is None:
            continue
        method = display_name(str(row["method"]))
        lr = re.search(r"\blr=(\S+)", row.get("settings") or "")
        for panel, key, transform, start in DAMAGE:
            if row.get(key) is not None:
                curves = out.setdefault(str(row["data"]), {}).setdefault(panel, {})
                points = curves.setdefault(method, [Point(0.0, start, "start")])
                points.append(
                    Point(float(x), float(transform(row[key])), lr.group(1) if lr else "")
                )
    return out


def write_frontier(rows: list[dict[str, Any]], out_dir: Path, lo: float, hi: float) -> dict:
    """frontier_<forget set>.png, frontier.md (points and pairwise comparisons) and the
    comparison rows (returned, and in frontier.json)."""
    found: dict[str, Any] = {}
    lines = ["# Trade-off curves", ""]
    for data, panels in sorted(frontier_curves(rows).items()):
        name = data.split(":", 1)[-1]
        png = out_dir / f"frontier_{re.sub(r'[^A-Za-z0-9_+-]', '_', name)}.png"
        plot_frontier(png, f"forget {name}: forget removed against damage", panels, lo=lo, hi=hi)
        lines += [f"## {data}", "", f"![{name}]({png.name})", ""]
        for panel, curves in panels.items():
            lines += [f"### {panel}", "", points_table(curves, panel)]
        lines += [markdown_table(panels, lo=lo, hi=hi), ""]
        found[data] = {panel: compare(curves, lo=lo, hi=hi) for panel, curves in panels.items()}
    (out_dir / "frontier.md").write_text("\n".join(lines))
    write_json_atomic(out_dir / "frontier.json", found)
    return found


def main(cfg: DictConfig, run: Run) -> None:
    run_dirs = find_runs(list(cfg.report.runs), exclude=run.dir)
    if not run_dirs:
        raise UserError(
            f"report.runs={list(cfg.report.runs)} matches no run directory (none holds meta.json); "
            "pass report.runs=[DIR_OR_GLOB,...]"
        )
    rows = collect_rows(run_dirs, cfg.report.metric_prefix)
    write_tables(rows, run.dir, list(cfg.report.columns) if cfg.report.columns else None)
    if cfg.report.frontier:
        lo, hi = (float(v) for v in cfg.report.frontier_range)
        write_frontier(rows, run.dir, lo, hi)
        log.info("trade-off curves: %s", run.dir / "frontier.md")
    run.log_metrics(
        {"report": {"runs": len(rows), "failed": sum(r["status"] != "completed" for r in rows)}}
    )
    log.info("report of %d runs: %s", len(rows), run.dir / "report.md")
