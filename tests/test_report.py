"""kuda report lists every run, failed ones included, with flattened metrics."""

from __future__ import annotations

import csv
import json

from kuda_cli.run import find_runs, flatten
from kuda_cli.stages.report import collect_rows

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
    from kuda_cli.report_tables import write_tables

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
    from kuda_cli.report_tables import write_tables

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


def test_each_forget_set_has_its_own_starting_row_and_old_runs_still_load(tmp_path):
    """Runs on different forget domains are different data; a metrics.json written before the
    floors and subject split existed loads with those figures blank."""
    from kuda_cli.report_tables import data_label, write_tables

    for i, domain in enumerate(["chemistry", "capitals"]):
        run_dir = tmp_path / "sweep" / str(i)
        make_run(run_dir, "completed", {"before": {"facts": {"forget": {"mc_acc": 1.0}}}})
        config = {
            "model": {"name": "tiny"},
            "data": {"name": "facts", "forget_domains": [domain]},
            "unlearn": {"method": "kuda", "lr": 1e-3},
        }
        (run_dir / "config.yaml").write_text(json.dumps(config))
    rows = collect_rows(find_runs([str(tmp_path / "sweep")], exclude=tmp_path / "x"), None)
    assert [(r["method"], r["data"]) for r in rows] == [
        ("starting model", "facts:chemistry"),
        ("starting model", "facts:capitals"),
        ("kuda", "facts:chemistry"),
        ("kuda", "facts:capitals"),
    ]
    assert data_label({"name": "wmdp_bio"}) == "wmdp_bio"
    write_tables(rows, tmp_path, ["summary.forget_removed", "facts.forget.mc_acc"])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0].endswith("| facts.forget.mc_acc |")  # the missing figure is no column
    write_tables(rows, tmp_path)
    assert "facts.floor" not in (tmp_path / "report.md").read_text()


def test_report_frontier_plots_and_compares_the_methods_curves(kuda, tmp_path):
    def run(i, method, lr, removed, ppl, agreement):
        run_dir = tmp_path / "runs" / f"{method}{i}"
        summary = {
            "forget_removed": removed,
            "perplexity_ratio": ppl,
            "retain_other_token_agreement": agreement,
        }
        make_run(run_dir, "completed", {"summary": summary})
        config = {
            "model": {"name": "tiny"},
            "data": {"name": "facts", "forget_domains": ["capitals"]},
            "unlearn": {"method": method, "lr": lr},
        }
        (run_dir / "config.yaml").write_text(json.dumps(config))

    # KUDA's curve is RMU's with half the damage: KUDA lower everywhere both cover
    for i, (removed, ppl, agreement) in enumerate(
        [(0.2, 1.1, 0.98), (0.6, 1.4, 0.9), (1.0, 3.0, 0.7)]
    ):
        run(i, "rmu", 10.0**-i, removed, ppl, agreement)
        run(i, "kuda", 10.0**-i, removed, 1 + (ppl - 1) / 2, 1 - (1 - agreement) / 2)
    done = kuda(
        "report", f"report.runs=[{tmp_path / 'runs'}]", "report.frontier=true", "hydra.run.dir=rep"
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "rep"
    assert (out / "frontier_capitals.png").stat().st_size > 10_000
    found = read_json(out / "frontier.json")["facts:capitals"]
    for panel in ("perplexity ratio", "1 - other-subject token agreement"):
        (row,) = found[panel]
        assert {row["a"], row["b"]} == {"RMU", "KUDA"} and row["lower"] == "KUDA"
        assert row["shared"] == [0.5, 0.9]
    text = (out / "frontier.md").read_text()
    assert "| KUDA | 0.1 | 0.600 |" in text and "| KUDA | start | 0.000 | 1.000 |" in text
    bad = kuda("report", "report.frontier_range=[0.9,0.5]")
    assert bad.returncode == 2 and "report.frontier_range" in bad.stderr


def test_report_robustness_names_each_methods_strongest_attack(kuda, tmp_path):
    def run(method, relearned, quant4, lens):
        run_dir = tmp_path / "runs" / method
        steps = {
            f"steps_{n}": {"forget_removed": {"attacked": {"forget_removed": v}}}
            for n, v in zip((0, 10, 25), relearned, strict=True)
        }
        attacks = {
            "relearn": steps,
            "quant4": {"forget_removed": {"against_quantized_start": {"forget_removed": quant4}}},
            "logit_lens": {"forget_removed": {"mc": lens}},
        }
        make_run(run_dir, "completed", {"summary": {"forget_removed": 0.9}, "attacks": attacks})
        config = {
            "model": {"name": "tiny"},
            "data": {"name": "facts", "forget_domains": ["capitals"]},
            "unlearn": {"method": method, "lr": 1e-3},
        }
        (run_dir / "config.yaml").write_text(json.dumps(config))
        attacked = {"rmu": ("relearn/steps_25", "Paris again", True), "kuda": ("quant4", "Nice", 0)}
        where, answer, correct = attacked[method]
        for directory, said, right in (
            ("before", "Paris", True),
            (".", "Lyon", False),
            (f"attacks/{where}", answer, correct),
        ):
            row = {"split": "forget", "fact": "c1", "prompt": "The capital of X is"}
            row.update(target="Paris", answer=said, gen_correct=right)
            (run_dir / directory).mkdir(parents=True, exist_ok=True)
            (run_dir / directory / "facts_answers.jsonl").write_text(json.dumps(row) + "\n")

    run("rmu", (0.9, 0.5, 0.2), 0.8, 0.6)  # relearning brings most back
    run("kuda", (0.9, 0.8, 0.7), 0.3, 0.6)  # quantization does
    make_run(tmp_path / "runs" / "plain", "completed", {"summary": {"forget_removed": 0.5}})
    runs = f"report.runs=[{tmp_path / 'runs'}]"
    done = kuda("report", runs, "report.robustness=true", "hydra.run.dir=rep")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "rep"
    found = read_json(out / "robustness.json")["facts:capitals"]
    assert set(found) == {"RMU", "KUDA"}  # a run without attacks is no row
    assert (found["RMU"]["strongest_attack"], found["RMU"]["weakest"]) == ("relearn", 0.2)
    assert (found["KUDA"]["strongest_attack"], found["KUDA"]["weakest"]) == ("quant4", 0.3)
    assert found["KUDA"]["relearn_curve"] == [[0, 0.9], [10, 0.8], [25, 0.7]]
    assert (
        "| RMU | 0.90 | - | 0.80 | 0.60 | - | 0.20 | - | 0.20 | relearn |"
        in (out / "robustness.md").read_text()
    )
    assert (out / "robustness_capitals.png").stat().st_size > 10_000
    answers = (out / "robustness_answers.md").read_text()
    assert "### RMU, under relearn" in answers  # its last step count's answers
    assert "| The capital of X is | Paris | ✓ Paris | ✗ Lyon | ✓ Paris again |" in answers
    assert "### KUDA, under quant4" in answers
    assert "| The capital of X is | Paris | ✓ Paris | ✗ Lyon | ✗ Nice |" in answers


def test_a_sweeps_jobs_are_found_in_their_numbered_order(tmp_path):
    for job in range(12):
        (tmp_path / "sweep" / str(job)).mkdir(parents=True)
        (tmp_path / "sweep" / str(job) / "meta.json").write_text("{}")
    found = find_runs([str(tmp_path / "sweep")], exclude=tmp_path / "x")
    assert [p.name for p in found] == [str(job) for job in range(12)]
