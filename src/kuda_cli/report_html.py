"""kuda report's one-page summary, report.html: how many runs, which commit, dates and commands
made them and the report, the table of report.md, and every PNG the report wrote, embedded.
One self-contained file: no script, no stylesheet or image fetched from anywhere."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from kuda_cli.report_tables import cell_text, cell_value

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f0f0f0; }
tr.failed td { color: #a00; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
dt { font-weight: bold; margin-top: 0.5em; }
"""
MAX_COMMANDS = 8  # distinct run commands listed; the rest counted


def table_html(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """An HTML table of `rows` in `columns` (as report.md's), rows not completed marked."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = cell_value(row, column)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            kind = ' class="number"' if number else ""
            cells.append(f"<td{kind}>{escape(cell_text(value))}</td>")
        marked = ' class="failed"' if row.get("status") != "completed" else ""
        body.append(f"<tr{marked}>{''.join(cells)}</tr>")
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def provenance(metas: list[dict[str, Any]]) -> dict[str, list[str]]:
    """What made runs, from their meta.json: each commit (dirty marked, with its number of
    runs), the span of their dates, each distinct command."""
    commits: dict[str, int] = {}
    for meta in metas:
        git = meta.get("git") or {}
        commit = str(git.get("commit") or "unknown") + (" (dirty)" if git.get("dirty") else "")
        commits[commit] = commits.get(commit, 0) + 1
    dates = sorted({str(m[k]) for m in metas for k in ("start_time", "end_time") if m.get(k)})
    commands = list(dict.fromkeys(str(m["command"]) for m in metas if m.get("command")))
    if len(commands) > MAX_COMMANDS:
        more = len(commands) - MAX_COMMANDS
        commands = [*commands[:MAX_COMMANDS], f"... and {more} more"]
    counted = len(metas) > 1
    return {
        "commit": [f"{c}: {n} run{'s' * (n != 1)}" if counted else c for c, n in commits.items()],
        "date": [" to ".join(dict.fromkeys((dates[0], dates[-1])))] if dates else [],
        "command": commands,
    }


def facts_html(found: dict[str, list[str]]) -> str:
    """A definition list: each name with its values (none: left out)."""
    items = []
    for name, values in found.items():
        if values:
            items.append(f"<dt>{escape(name)}</dt>")
            items += [f"<dd><code>{escape(v)}</code></dd>" for v in values]
    return "<dl>\n" + "\n".join(items) + "\n</dl>"


def images_html(out_dir: Path) -> str:
    """Each PNG of `out_dir` as a heading and an <img> with the image inline (base64)."""
    parts = []
    for png in sorted(out_dir.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        name = escape(png.name)
        parts.append(f'<h3>{name}</h3>\n<img alt="{name}" src="data:image/png;base64,{data}">')
    return "\n".join(parts)


def write_html(
    out_dir: Path,
    rows: list[dict[str, Any]],
    columns: list[str],
    run_metas: list[dict[str, Any]],
    own_meta: dict[str, Any],
) -> Path:
    """report.html in `out_dir`: the runs (`run_metas`: their meta.json), the report itself
    (`own_meta`), the table of `rows` in `columns` and the PNGs already in `out_dir`."""
    unfinished = sum(m.get("status") != "completed" for m in run_metas)
    starting = len(rows) - len(run_metas)
    count = (
        f"{len(run_metas)} runs ({unfinished} failed or unfinished), {starting} starting-model rows"
    )
    images = images_html(out_dir)
    beside = sorted(p.name for p in out_dir.glob("*") if p.suffix in (".md", ".csv", ".tex"))
    page = [
        "<!DOCTYPE html>",
        '<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>kuda report: {len(run_metas)} runs</title>",
        f"<style>{STYLE}</style>\n</head>\n<body>",
        "<h1>kuda report</h1>",
        f"<p>{escape(count)}. Beside this page: {escape(', '.join(beside))} (report.csv: every "
        "metric).</p>",
        "<h2>Runs</h2>",
        facts_html(provenance(run_metas)),
        "<h2>This report</h2>",
        facts_html(provenance([own_meta])),
        "<h2>Table</h2>",
        table_html(rows, columns),
        *(["<h2>Plots</h2>", images] if images else []),
        "</body>\n</html>\n",
    ]
    path = out_dir / "report.html"
    path.write_text("\n".join(page), encoding="utf-8")
    return path
