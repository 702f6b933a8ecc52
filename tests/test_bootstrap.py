"""The bootstrap of trade-off comparisons: per-item figures a facts run records re-aggregate to
its metrics.json, and resampling the facts and texts, the same for every run, tells a method
that is lower beyond noise from one that is not."""

from __future__ import annotations

import json
import math
import random

import numpy as np

from kuda_cli.evaluate import bootstrap
from kuda_cli.evaluate.floors import forget_removed
from kuda_cli.report_tables import write_frontier
from kuda_cli.run import find_runs
from kuda_cli.stages.report import collect_rows

from conftest import read_json

FACTS, FLOOR_FACTS, OTHER_FACTS, TEXTS = 30, 30, 30, 24
STRENGTHS = (0.2, 0.4, 0.6, 0.75)
PERPLEXITY, AGREEMENT = "perplexity ratio", "1 - other-subject token agreement"


def _lines(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(split, fact, prompt, mc, gen, agree=None, subsets=()):
    return {
        "split": split,
        "fact": fact,
        "domain": "d",
        "prompt": f"{fact} #{prompt}",
        "target": "t",
        "answer": "a",
        "mc_correct": mc,
        "gen_correct": gen,
        "agreeing_tokens": agree,
        "reference_tokens": None if agree is None else 10,
        "subsets": list(subsets),
    }


def before_rows() -> list[dict]:
    """The starting model knows every forget fact; its floor is 20% MC, 10% greedy."""
    rows = [_row("forget", f"f{i}", p, True, True) for i in range(FACTS) for p in range(2)]
    rows += [
        _row("floor", f"x{j}", p, j % 5 == 0, j % 10 == 0)
        for j in range(FLOOR_FACTS)
        for p in (0, 1)
    ]
    return rows


def after_rows(strength: float, losses: list[int]) -> list[dict]:
    """The first `strength` share of forget facts forgotten; other-subject prompt k keeps 10 -
    losses[k] of the reference's 10 tokens; a same-subject fact loses everything (left out of
    the other-subject figure)."""
    gone = round(strength * FACTS)
    rows = [_row("forget", f"f{i}", p, i >= gone, i >= gone) for i in range(FACTS) for p in (0, 1)]
    rows += [
        _row("retain", f"o{k // 2}", k % 2, True, True, 10 - losses[k], ["other_subjects"])
        for k in range(2 * OTHER_FACTS)
    ]
    return rows + [_row("retain", "s0", 0, False, False, 0, ["same_subjects"])]


def write_run(root, name, method, strength, damages, losses, rng=None) -> None:
    """An unlearn run directory with its per-item files and the summary they aggregate to;
    `damages[t]`: the relative NLL increase of text t; `rng` shuffles the rows' order."""
    run = root / name
    (run / "before").mkdir(parents=True)
    shuffle = rng.shuffle if rng is not None else (lambda rows: None)
    files = {
        run / "before" / "facts_answers.jsonl": before_rows(),
        run / "facts_answers.jsonl": after_rows(strength, losses),
        run / "before" / "perplexity_items.jsonl": [
            {"text": t, "nll": 2.0 * (50 + 7 * t), "tokens": 50 + 7 * t} for t in range(TEXTS)
        ],
        run / "perplexity_items.jsonl": [
            {"text": t, "nll": 2.0 * (50 + 7 * t) * (1 + damages[t]), "tokens": 50 + 7 * t}
            for t in range(TEXTS)
        ],
    }
    for path, rows in files.items():
        shuffle(rows)
        _lines(path, rows)
    items = bootstrap.read_items(run)
    weights = bootstrap.once({k: sorted(v) for k, v in bootstrap.units(items).items()})
    summary = {
        "forget_removed": float(bootstrap.forget_removed(items, weights)[0]),
        "perplexity_ratio": float(bootstrap.perplexity_ratio(items, weights)[0]),
        "retain_other_token_agreement": float(bootstrap.other_token_agreement(items, weights)[0]),
    }
    (run / "metrics.json").write_text(json.dumps({"summary": summary}))
    (run / "meta.json").write_text(json.dumps({"status": "completed", "stage": "unlearn"}))
    config = {
        "data": {"name": "facts", "forget_domains": ["d"]},
        "unlearn": {"method": method, "lr": strength},
    }
    (run / "config.yaml").write_text(json.dumps(config))


def sweep(root, method, scale, seed, rng=None, reverse=False) -> None:
    """A method's runs at each strength: text t's NLL grows by scale x strength x u_t and
    other-subject prompt k loses about 10 x scale x strength x v_k tokens, u and v drawn (`seed`)
    from [0.5, 1.5] and [0, 2]; `reverse`: the same damages on other texts and prompts."""
    draws = np.random.default_rng(seed)
    u, v = draws.uniform(0.5, 1.5, TEXTS), draws.uniform(0.0, 2.0, 2 * OTHER_FACTS)
    if reverse:
        u, v = u[::-1], v[::-1]
    for s in STRENGTHS:
        losses = [min(10, round(10 * scale * s * vk)) for vk in v]
        write_run(root, f"{method}{s}", method, s, list(scale * s * u), losses, rng)


def compared(root, resamples=200, seed=0) -> tuple[dict, str]:
    rows = collect_rows(find_runs([str(root)], exclude=root / "none"), None)
    found = write_frontier(rows, root, 0.5, 0.9, resamples, seed)
    return found["facts:d"], (root / "frontier.md").read_text()


def test_a_clearly_lower_method_is_lower_beyond_noise(tmp_path):
    sweep(tmp_path / "runs", "kuda", 0.1, seed=1)
    sweep(tmp_path / "runs", "rmu", 0.6, seed=2)
    found, text = compared(tmp_path / "runs")
    for panel in (PERPLEXITY, AGREEMENT):
        (row,) = found[panel]
        (a, b) = (row["a"], row["b"])
        kuda_minus_rmu = row["difference"] if a == "KUDA" else -row["difference"]
        low, high = row["interval"] if a == "KUDA" else [-v for v in row["interval"][::-1]]
        assert row["lower"] == "KUDA" and {a, b} == {"KUDA", "RMU"}, row
        assert low <= kuda_minus_rmu <= high < 0, row
        assert row["resamples"] == 200 and row["lower_observed"] == "KUDA"
    assert "95% interval" in text and "Bootstrap: 200 draws" in text and "No bootstrap" not in text


def test_equally_good_methods_are_within_noise(tmp_path):
    """The same damages, landing on other texts and prompts: whichever looks lower on these
    texts, the interval of the difference holds 0."""
    sweep(tmp_path / "runs", "kuda", 0.3, seed=3)
    sweep(tmp_path / "runs", "rmu", 0.3, seed=3, reverse=True)
    found, _ = compared(tmp_path / "runs")
    for panel in (PERPLEXITY, AGREEMENT):
        (row,) = found[panel]
        low, high = row["interval"]
        assert row["lower"] == "within noise" and low < 0 < high and high - low > 1e-3, row
        assert 0 < row["a_lower_resamples"] < 1
    (row,) = found[PERPLEXITY]  # tokens weigh the texts: the observed curves differ
    assert row["difference"] != 0 and row["lower_observed"] in ("KUDA", "RMU")


def test_every_run_is_resampled_on_the_same_facts(tmp_path):
    """Two methods whose runs scored the same items, listed in different orders: every draw
    takes the same facts and texts for both, so each draw's difference is exactly 0."""
    sweep(tmp_path / "runs", "kuda", 0.3, seed=5)
    sweep(tmp_path / "runs", "rmu", 0.3, seed=5, rng=random.Random(0))
    found, _ = compared(tmp_path / "runs")
    for panel in (PERPLEXITY, AGREEMENT):
        (row,) = found[panel]
        # up to the roundoff of summing the same items in another order
        assert max(map(abs, row["interval"])) < 1e-12 and row["lower"] == "within noise", row
    # the draws themselves vary: the same run's figures differ from draw to draw
    items = bootstrap.read_items(tmp_path / "runs" / "kuda0.6")
    weights = bootstrap.draw(bootstrap.units(items), 50, seed=0)
    assert np.ptp(bootstrap.forget_removed(items, weights)) > 0.05
    assert np.ptp(bootstrap.perplexity_ratio(items, weights)) > 0.001


def test_runs_without_per_item_figures_get_no_bootstrap_and_one_line(tmp_path):
    sweep(tmp_path / "runs", "kuda", 0.1, seed=1)
    sweep(tmp_path / "runs", "rmu", 0.6, seed=2)
    for run in (tmp_path / "runs").iterdir():  # as runs made before the items were recorded
        (run / "perplexity_items.jsonl").unlink()
        (run / "before" / "perplexity_items.jsonl").unlink()
    found, text = compared(tmp_path / "runs")
    (row,) = found[PERPLEXITY]
    assert "interval" not in row and row["lower"] == "KUDA"
    assert found[AGREEMENT][0]["interval"] is not None  # the agreement had its items
    (line,) = [x for x in text.splitlines() if x.startswith("No bootstrap")]
    assert line.startswith(f"No bootstrap for {PERPLEXITY}: 8 of 8 runs lack")
    found, text = compared(tmp_path / "runs", resamples=0)
    assert "interval" not in found[AGREEMENT][0] and "bootstrap" not in text.lower()


def test_per_item_fields_reaggregate_to_the_runs_metrics(kuda, tmp_path, monkeypatch):
    """A tiny facts run's items give back metrics.json's figures exactly, summed in file
    order as the evaluation sums them."""
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    kuda(
        "unlearn",
        "model=tiny-random",
        "locate=fixed",
        "locate.layers=[1,2]",
        "unlearn.steps=2",
        "unlearn.batch_size=2",
        "eval.metrics=[facts,perplexity]",
        "eval.facts.all_prompts=false",
        "eval.facts.gen_max_new_tokens=4",
        "eval.facts.fluency_max_new_tokens=4",
        "eval.perplexity.max_texts=4",
        "hydra.run.dir=run",
        check=True,
    )
    run = tmp_path / "run"
    metrics = read_json(run / "metrics.json")
    before, after, summary = metrics["before"], metrics, metrics["summary"]

    def rows(path, split):
        lines = (run / path).read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["split"] == split]

    def mean(values):
        values = [float(v) for v in values if v is not None]
        return sum(values) / len(values) if values else None

    accuracy = {}
    for name, path, split in [
        ("before", "before/facts_answers.jsonl", "forget"),
        ("after", "facts_answers.jsonl", "forget"),
        ("floor", "before/facts_answers.jsonl", "floor"),
    ]:
        found = rows(path, split)
        accuracy[name] = [mean(r[k] for r in found) for k in ("mc_correct", "gen_correct")]
        figures = (before if name != "after" else after)["facts"][split]
        assert accuracy[name] == [figures["mc_acc"], figures.get("gen_acc")], name
    removed = [
        forget_removed(*(accuracy[n][k] for n in ("before", "after", "floor"))) for k in (0, 1)
    ]
    assert [summary.get("forget_removed_mc"), summary.get("forget_removed_gen")] == removed
    other = [r for r in rows("facts_answers.jsonl", "retain") if "other_subjects" in r["subsets"]]
    # a prompt the starting model answered with no token has no reference, as in the metric
    agreement = mean(
        r["agreeing_tokens"] / r["reference_tokens"] for r in other if r["reference_tokens"]
    )
    assert agreement == summary["retain_other_token_agreement"]
    nll = {}
    for name in ("before/", ""):
        lines = (run / f"{name}perplexity_items.jsonl").read_text().splitlines()
        texts = [json.loads(x) for x in lines]
        nll[name] = sum(t["nll"] for t in texts) / sum(t["tokens"] for t in texts)
        assert nll[name] == (before if name else after)["perplexity"]["nll"]
    assert math.exp(nll[""]) / math.exp(nll["before/"]) == summary["perplexity_ratio"]
    # the bootstrap's own aggregate of every item once is the same figure up to roundoff
    items = bootstrap.read_items(run)
    weights = bootstrap.once(bootstrap.units(items))
    assert np.isclose(bootstrap.perplexity_ratio(items, weights)[0], summary["perplexity_ratio"])
    figure = bootstrap.other_token_agreement(items, weights)[0]
    assert np.isclose(figure, summary["retain_other_token_agreement"], rtol=1e-12)
