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


def make_unlearn_run(directory, status, unlearn, metrics=None):
    make_run(directory, status, metrics)
    config = {"model": {"name": "tiny"}, "data": {"name": "facts"}, "unlearn": unlearn}
    (directory / "config.yaml").write_text(json.dumps(config))  # JSON is YAML


def test_starting_model_comes_first_with_method_settings_per_run(tmp_path):
    before = {"facts": {"forget": {"mc_acc": 1.0}}}
    make_unlearn_run(
        tmp_path / "sweep" / "0",
        "completed",
        {
            "method": "npo",
            "lr": 1e-5,
            "steps": 40,
            "optimizer": "adamw",
            "beta": 0.1,
            "retain_weight": 1.0,
            "batch_size": 4,
        },
        {"before": before, "facts": {"forget": {"mc_acc": 0.5}}},
    )
    make_unlearn_run(
        tmp_path / "sweep" / "1",
        "completed",
        {
            "method": "kuda",
            "lr": 3e-3,
            "steps": 40,
            "optimizer": "adamw",
            "beta": 5.0,
            "nullspace": {
                "enabled": True,
                "form": "relaxed",
                "tau": 0.01,
                "tau_mode": "p99",
                "project_on": "update",
            },
        },
        {"before": before, "facts": {"forget": {"mc_acc": 0.3}}, "locate": {"layers": [2, 3]}},
    )
    make_unlearn_run(tmp_path / "sweep" / "2", "failed", {"method": "rmu", "lr": 1e-3, "c": 300})
    rows = collect_rows(find_runs([str(tmp_path / "sweep")], exclude=tmp_path / "x"), None)
    assert [(r["method"], r["status"], r.get("facts.forget.mc_acc")) for r in rows] == [
        ("starting model", "completed", 1.0),  # once, though two runs carry it
        ("npo", "completed", 0.5),
        ("kuda", "completed", 0.3),
        ("rmu", "failed", None),
    ]
    assert rows[1]["settings"] == "lr=1e-05 steps=40 optimizer=adamw beta=0.1 retain_weight=1"
    assert (
        "beta=5 " in rows[2]["settings"]
        and "ns.form=relaxed ns.tau=0.01 ns.tau_mode=p99" in rows[2]["settings"]
    )
    assert rows[3]["settings"] == "lr=0.001 c=300"
    assert rows[2]["layers"] == "2,3" and rows[3]["layers"] is None
    assert not any(k.startswith("before.") or k == "_before" for r in rows for k in r)


def test_columns_narrow_markdown_but_not_csv(tmp_path):
    from kuda_cli.stages.report import write_tables

    rows = [
        {
            "run": "r",
            "method": "ga",
            "facts.forget.mc_acc": 0.5,
            "train.seconds": 3.0,
            "diagnostics.krd.mean": 0.4,
            "diagnostics.krd.l1": 0.3,
        }
    ]
    write_tables(rows, tmp_path, ["diagnostics.krd.mean", "facts.forget"])
    header = (tmp_path / "report.md").read_text().splitlines()[0]
    assert header == "| run | method | diagnostics.krd.mean | facts.forget.mc_acc |"
    assert "train.seconds" in (tmp_path / "report.csv").read_text()
