"""kuda report shows the headline figures by default ([all]: every metric; a list: as given) and
writes report.html, one self-contained page with the table and the plots."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest

from kuda_cli.errors import UserError
from kuda_cli.report_tables import chosen_columns, default_columns, write_tables
from kuda_cli.run import find_runs
from kuda_cli.stages.report import collect_rows

AGREEMENT = "facts.retain.other_subjects.token_agreement"
DEEP = "diagnostics.projector.l3.threshold"  # a metric nobody reads first


def facts_metrics(removed: float, agreement: float) -> dict:
    """An unlearn run's metrics.json as a facts run writes it (some of it)."""
    return {
        "before": {
            "facts": {"forget": {"mc_acc": 1.0}},
            "fluency": {"forget": {"repetition": 0.3}},
        },
        "diagnostics": {"projector": {"l3": {"threshold": 1e-3}}, "krd": {"mean": 0.5}},
        "facts": {
            "forget": {"mc_acc": 0.4, "domains": {"chemistry": {"mc_acc": 0.4}}},
            "retain": {"other_subjects": {"token_agreement": agreement}},
        },
        "fluency": {"forget": {"nll_vs_fluent_wrong": 1.2, "repetition": 0.25, "entropy": 5.0}},
        "summary": {
            "forget_removed": removed,
            "forget_removed_mc": removed,
            "forget_mc": 0.4,
            "perplexity_ratio": 1.1,
            "fluency_entropy_ratio": 0.9,
        },
    }


def make_unlearn_run(directory, method: str, metrics: dict, status: str = "completed") -> None:
    directory.mkdir(parents=True)
    meta = {"status": status, "stage": "unlearn", "command": f"kuda unlearn unlearn={method}"}
    meta["git"] = {"commit": "abc123", "dirty": False}
    (directory / "meta.json").write_text(json.dumps(meta))
    (directory / "metrics.json").write_text(json.dumps(metrics))
    config = {
        "model": {"name": "tiny"},
        "data": {"name": "facts", "forget_domains": ["capitals"]},
        "unlearn": {"method": method, "lr": 1e-3, "steps": 40},
    }
    (directory / "config.yaml").write_text(json.dumps(config))  # JSON is YAML


def sweep_rows(tmp_path):
    make_unlearn_run(tmp_path / "sweep" / "0", "ga", facts_metrics(0.5, 0.9))
    make_unlearn_run(tmp_path / "sweep" / "1", "kuda", facts_metrics(0.8, 0.96))
    return collect_rows(find_runs([str(tmp_path / "sweep")], exclude=tmp_path / "x"), None)


def md_table(path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_default_columns_are_the_headline_figures_in_reading_order(tmp_path):
    rows = sweep_rows(tmp_path)
    assert default_columns(rows) == [
        "summary.forget_removed",
        "summary.forget_removed_mc",  # no run has forget_removed_gen: no column
        f"1 - {AGREEMENT}",
        "summary.perplexity_ratio",
        "facts.forget.mc_acc",  # the starting model's too
        "fluency.forget.nll_vs_fluent_wrong",
        "summary.fluency_entropy_ratio",
        "fluency.forget.repetition",
    ]
    write_tables(rows, tmp_path, chosen_columns(None, rows))
    header, cells = md_table(tmp_path / "report.md")
    assert header[:8] == ["run", "stage", "status", "model", "method", "settings", "layers", "data"]
    assert DEEP not in header and "summary.forget_mc" not in header
    damage = [row[header.index(f"1 - {AGREEMENT}")] for row in cells]
    assert damage == ["", "0.1", "0.04"]  # the starting model first: no agreement of its own
    assert DEEP in (tmp_path / "report.csv").read_text()


def test_all_columns_show_every_metric_and_a_list_only_its_own(tmp_path):
    rows = sweep_rows(tmp_path)
    write_tables(rows, tmp_path, chosen_columns(["all"], rows))
    header, _ = md_table(tmp_path / "report.md")
    assert DEEP in header and "facts.forget.domains.chemistry.mc_acc" in header
    write_tables(rows, tmp_path, chosen_columns(["diagnostics.krd", "summary.forget_mc"], rows))
    header, _ = md_table(tmp_path / "report.md")
    assert header[8:] == ["diagnostics.krd.mean", "summary.forget_mc"]


def test_default_columns_take_each_benchmarks_headline_figures(tmp_path):
    rows = [
        {"run": "w", "lm_eval.wmdp_bio.acc": 0.3, "lm_eval.mmlu.acc": 0.5},
        {"run": "w2", "lm_eval.mmlu_anatomy.acc": 0.4, "lm_eval.wmdp_bio.acc_stderr": 0.01},
        {
            "run": "t",
            "tofu.model_utility": 0.6,
            "tofu.forget_quality": 0.01,
            "tofu.forget.prob": 0.2,
            "tofu.retain.prob": 0.9,
            "tofu.mia.loss.auc": 1,
        },
        {"run": "m", "muse.knowmem_forget.rougeL_f1": 0.2, "muse.privleak.privleak": -5.0},
    ]
    assert default_columns(rows) == [
        "lm_eval.wmdp_bio.acc",
        "lm_eval.mmlu.acc",
        "muse.knowmem_forget.rougeL_f1",
        "muse.privleak.privleak",
        "tofu.forget_quality",
        "tofu.model_utility",
        "tofu.forget.prob",
    ]


def test_a_metric_with_an_unknown_report_role_is_named(monkeypatch):
    from kuda_cli.evaluate import report_columns
    from kuda_cli.evaluate.metrics.perplexity import Perplexity

    monkeypatch.setattr(Perplexity, "report_columns", (("harm", "summary.perplexity_ratio"),))
    with pytest.raises(UserError, match="metric perplexity: report_columns role 'harm'"):
        report_columns()


class Page(HTMLParser):
    """What report.html holds: its tags, table headers, image sources and any external link."""

    def __init__(self):
        super().__init__()
        self.tags, self.headers, self.images, self.external = [], [], [], []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_th = tag == "th"
        for name, value in attrs:
            if name == "src" and tag == "img":
                self.images.append(value)
            if name in ("src", "href") and not (value or "").startswith("data:"):
                self.external.append(value)

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data)

    def handle_endtag(self, tag):
        self._in_th = False


def test_report_html_holds_the_table_and_the_plots_inline(kuda, tmp_path):
    for i, (removed, agreement) in enumerate([(0.3, 0.95), (0.7, 0.9)]):
        make_unlearn_run(tmp_path / "runs" / f"ga{i}", "ga", facts_metrics(removed, agreement))
    make_unlearn_run(tmp_path / "runs" / "bad", "rmu", {}, status="failed")
    done = kuda(
        "report", f"report.runs=[{tmp_path / 'runs'}]", "report.frontier=true", "hydra.run.dir=rep"
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "rep"
    page = Page()
    page.feed((out / "report.html").read_text())
    page.close()
    header, _ = md_table(out / "report.md")
    assert "table" in page.tags and page.headers == header  # report.md's table, default columns
    assert "summary.forget_removed" in header and DEEP not in header
    (image,) = page.images  # the frontier PNG, inline
    prefix = "data:image/png;base64,"
    assert image.startswith(prefix)
    assert base64.b64decode(image[len(prefix) :]) == (out / "frontier_capitals.png").read_bytes()
    assert page.external == [] and "script" not in page.tags
    text = (out / "report.html").read_text()
    assert "3 runs (1 failed or unfinished)" in text
    assert "abc123: 3 runs" in text and "kuda unlearn unlearn=rmu" in text
    assert "kuda report report.runs=" in text  # the report's own command


def test_all_beside_other_columns_is_refused(kuda, tmp_path):
    done = kuda("report", "report.columns=[all,summary.forget_removed]")
    assert done.returncode == 2 and "report.columns=" in done.stderr
    assert "report.columns=[all]" in done.stderr and "Traceback" not in done.stderr
