"""kuda report lists every run, failed ones included, with flattened metrics."""

from __future__ import annotations

import csv
import json

from kuda_cli.stages.report import collect_rows, find_runs, flatten

from conftest import FAST_EVAL, read_json


def make_run(directory, status, metrics=None):
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"status": status, "stage": "unlearn"}))
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics))


def test_flatten_nested_metrics():
    assert flatten({"a": {"b": 1, "c": {"d": 2.5}}, "e": "x", "f": [1]}) == {
        "a.b": 1,
        "a.c.d": 2.5,
        "e": "x",
    }


def test_failed_runs_are_listed_not_dropped(tmp_path):
    make_run(tmp_path / "runs" / "ok", "completed", {"ppl": {"perplexity": 3.0}})
    make_run(tmp_path / "runs" / "bad", "failed")
    rows = collect_rows(find_runs([str(tmp_path / "runs" / "*")], exclude=tmp_path / "x"), None)
    assert [(r["status"], r.get("ppl.perplexity")) for r in rows] == [
        ("failed", None),
        ("completed", 3.0),
    ]


def test_report_stage_writes_markdown_and_csv(kuda, tmp_path):
    sweep = tmp_path / "sweep"
    kuda("eval", "-m", "seed=1,2", *FAST_EVAL, f"hydra.sweep.dir={sweep}", check=True)
    out = tmp_path / "report"
    kuda("report", f"report.runs=[{sweep}]", f"hydra.run.dir={out}", check=True)
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    assert float(rows[0]["perplexity.perplexity"]) > 1
    assert "perplexity.perplexity" in (out / "report.md").read_text()
    assert r"perplexity.perplexity" in (out / "report.tex").read_text()
    assert read_json(out / "metrics.json")["report"] == {"runs": 2, "failed": 0}


def test_report_with_no_runs_is_a_user_error(kuda, tmp_path):
    done = kuda("report", f"report.runs=[{tmp_path}/nothing*]")
    assert done.returncode == 2 and "matches no run directory" in done.stderr


def test_latex_cells_are_escaped(tmp_path):
    from kuda_cli.stages.report import write_tables

    write_tables([{"run": "a_b", "metric": 0.5, "note": "50% & {x} \\"}], tmp_path)
    tex = (tmp_path / "report.tex").read_text()
    assert r"a\_b" in tex and r"50\% \& \{x\} \textbackslash{}" in tex
    assert "\\toprule" in tex and tex.strip().endswith("\\end{tabular}")
