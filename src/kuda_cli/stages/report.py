"""kuda report: one row per run directory (globs in report.runs), its status and flattened metrics,
written as report.md, report.csv and report.tex (booktabs). Failed and unfinished runs are
listed with their status, never dropped."""

from __future__ import annotations

import csv
import glob
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kuda_cli.errors import UserError
from kuda_cli.run import Run, read_meta

log = logging.getLogger(__name__)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def find_runs(patterns: list[str], exclude: Path) -> list[Path]:
    found = set()
    for pattern in patterns:
        for match in glob.glob(str(Path(pattern).expanduser()), recursive=True):
            for meta in Path(match).glob("**/meta.json"):  # "**" includes `match` itself
                if meta.is_file() and meta.parent.resolve() != exclude.resolve():
                    found.add(meta.parent)
    return sorted(found)


def collect_rows(run_dirs: list[Path], metric_prefix: str | None) -> list[dict[str, Any]]:
    rows = []
    for run_dir in run_dirs:
        meta = read_meta(run_dir) or {}
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        flat = flatten(metrics)
        if metric_prefix:
            flat = {k: v for k, v in flat.items() if k.startswith(metric_prefix)}
        rows.append(
            {
                "run": str(run_dir),
                "stage": meta.get("stage"),
                "status": meta.get("status", "unknown"),
                "model": (meta.get("model") or {}).get("name"),
                **flat,
            }
        )
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
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


def run(cfg: DictConfig, run: Run) -> None:
    run_dirs = find_runs(list(cfg.report.runs), exclude=run.dir)
    if not run_dirs:
        raise UserError(
            f"report.runs={list(cfg.report.runs)} matches no run directory (none holds meta.json); "
            "pass report.runs=[DIR_OR_GLOB,...]"
        )
    rows = collect_rows(run_dirs, cfg.report.metric_prefix)
    write_tables(rows, run.dir)
    run.log_metrics(
        {"report": {"runs": len(rows), "failed": sum(r["status"] != "completed" for r in rows)}}
    )
    log.info("report of %d runs: %s", len(rows), run.dir / "report.md")
