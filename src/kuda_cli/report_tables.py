"""The tables and trade-off curves of `kuda report`, from its rows (one per run directory): a
run's settings cell and data label, report.md / report.csv / report.tex, and the frontier
curves of forget removed against damage (frontier_<forget set>.png, frontier.md, frontier.json)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from kuda_cli.cache import write_json_atomic
from kuda_cli.config import ALL_COLUMNS
from kuda_cli.evaluate import bootstrap
from kuda_cli.evaluate.tradeoff import Point, markdown_table, plot_frontier, points_table

# the trainer's knobs a table names for every method; a method's own fields are added to them
COMMON_SETTINGS = ("lr", "steps", "optimizer")


def settings(unlearn: dict[str, Any]) -> str:
    """The key hyper-parameters of an unlearn run as one short cell: the common knobs, then the
    scalar fields the method's schema adds to the shared trainer's (beta, c, alpha, ...)."""
    from dataclasses import fields

    from kuda_cli.config import UnlearnConfig

    method = _method(str(unlearn.get("method")))
    shared = {f.name for f in fields(UnlearnConfig)}
    own = [f.name for f in fields(method.schema) if f.name not in shared] if method else []
    parts = [
        f"{k}={cell_text(unlearn[k])}" for k in (*COMMON_SETTINGS, *own) if _scalar(unlearn, k)
    ]
    if method is not None:
        parts += [f"{label}={cell_text(value)}" for label, value in method.report_settings(unlearn)]
    if (unlearn.get("auto_tune") or {}).get("enabled"):
        parts.append("auto_tune")
    return " ".join(parts)


def _method(name: str):
    """The registered method `name`, None for a name no longer registered (an old run)."""
    from kuda_cli.unlearn.methods import REGISTRY

    return REGISTRY.get(name) if REGISTRY.known(name) else None


def display_name(method: str) -> str:
    """A method's name in tables and plots, as its class says (an unregistered one in capitals)."""
    found = _method(method)
    return found.display_name if found is not None else method.upper()


def _scalar(d: dict[str, Any], key: str) -> bool:
    return key in d and isinstance(d[key], (int, float, str, bool))


def data_label(data: dict[str, Any]) -> str | None:
    """The data of a run as a table names it: as its kind says (the facts set with capitals
    forgotten: `facts:capitals`), else the data option's name."""
    from kuda_cli.data.kinds import kind_of_record

    kind = kind_of_record(data)
    return kind.label(data) if kind is not None else data.get("name")


def cell_text(value: Any) -> str:
    """A value as a table cell: floats to 4 significant digits, None empty."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


ROW_NAMES = ("run", "stage", "status", "model", "method", "settings", "layers", "data")


def chosen_columns(setting: list[str] | None, rows: list[dict[str, Any]]) -> list[str] | None:
    """The metrics report.md shows for `report.columns`: null (or empty) the default columns,
    [all] every one (None), else the list as given."""
    if not setting:
        return default_columns(rows)
    return None if list(setting) == [ALL_COLUMNS] else list(setting)


def default_columns(rows: list[dict[str, Any]]) -> list[str]:
    """What a reader looks at first, as each metric's `report_columns` name it (forget removed,
    damage, benchmark figures, fluency): the ones at least one row has a value of."""
    from fnmatch import fnmatchcase

    from kuda_cli.evaluate import COMPLEMENT, report_columns

    present = list(dict.fromkeys(k for row in rows for k, v in row.items() if v is not None))
    found: list[str] = []
    for pattern in report_columns():
        if pattern.startswith(COMPLEMENT):
            found += [pattern] if pattern.removeprefix(COMPLEMENT) in present else []
        else:
            found += [c for c in present if c not in ROW_NAMES and fnmatchcase(c, pattern)]
    return list(dict.fromkeys(found))


def table_columns(rows: list[dict[str, Any]], shown: list[str] | None) -> list[str]:
    """The row names, then the metrics in `shown` (dotted keys or prefixes, in that order, or
    `1 - KEY`; None: every metric)."""
    from kuda_cli.evaluate import COMPLEMENT

    columns = list(dict.fromkeys(k for row in rows for k in row))
    if shown is None:
        return columns
    metrics = []
    for want in shown:
        if want.startswith(COMPLEMENT) and want.removeprefix(COMPLEMENT) in columns:
            metrics.append(want)
        metrics += [
            c for c in columns if c not in ROW_NAMES and (c == want or c.startswith(want + "."))
        ]
    return [c for c in columns if c in ROW_NAMES] + list(dict.fromkeys(metrics))


def cell_value(row: dict[str, Any], column: str) -> Any:
    """A row's value in a column; `1 - KEY`: 1 minus the row's number at KEY."""
    from kuda_cli.evaluate import COMPLEMENT

    if column.startswith(COMPLEMENT) and column not in row:
        value = row.get(column.removeprefix(COMPLEMENT))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return 1 - value if number else None
    return row.get(column)


def write_tables(
    rows: list[dict[str, Any]], out_dir: Path, shown: list[str] | None = None
) -> list[str]:
    """report.csv with every column; report.md and report.tex with the row names and the metrics
    in `shown` (table_columns; None: all). Returns the columns of report.md."""
    every = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=every)
        writer.writeheader()
        writer.writerows(rows)
    columns = table_columns(rows, shown)
    cells = [[cell_text(cell_value(row, c)) for c in columns] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    tex = [
        "\\begin{tabular}{" + "l" * len(columns) + "}",
        "\\toprule",
        " & ".join(_tex(c) for c in columns) + " \\\\",
        "\\midrule",
        *(" & ".join(_tex(cell) for cell in row) + " \\\\" for row in cells),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    (out_dir / "report.tex").write_text("\n".join(tex) + "\n")
    return columns


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
                    Point(
                        float(x), float(transform(row[key])), lr.group(1) if lr else "", row["run"]
                    )
                )
    return out


def write_frontier(
    rows: list[dict[str, Any]], out_dir: Path, lo: float, hi: float, resamples: int, seed: int
) -> dict:
    """frontier_<forget set>.png, frontier.md (points and pairwise comparisons, with a bootstrap
    of `resamples` draws over the facts) and the comparison rows (returned, in frontier.json)."""
    found: dict[str, Any] = {}
    lines = ["# Trade-off curves", ""]
    for data, panels in sorted(frontier_curves(rows).items()):
        name = data.split(":", 1)[-1]
        png = out_dir / f"frontier_{re.sub(r'[^A-Za-z0-9_+-]', '_', name)}.png"
        plot_frontier(png, f"forget {name}: forget removed against damage", panels, lo=lo, hi=hi)
        lines += [f"## {data}", "", f"![{name}]({png.name})", ""]
        for panel, curves in panels.items():
            lines += [f"### {panel}", "", points_table(curves, panel)]
        keys = {panel: (key, transform) for panel, key, transform, _ in DAMAGE}
        found[data], notes = bootstrap.compare_with_noise(panels, keys, lo, hi, resamples, seed)
        extra = bootstrap.columns(found[data])
        table = markdown_table(panels, lo=lo, hi=hi, compared=found[data], extra=extra)
        lines += [table, *(f"{note}\n" for note in notes)]
    (out_dir / "frontier.md").write_text("\n".join(lines))
    write_json_atomic(out_dir / "frontier.json", found)
    return found
