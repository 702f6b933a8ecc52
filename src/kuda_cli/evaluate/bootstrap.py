"""How sure a trade-off comparison is: a bootstrap over the facts and texts a run was scored on.

A point of a trade-off curve (`tradeoff`) is an aggregate over items: forget removed over the
forget facts' prompts against the floor facts', token agreement over the other-subject retain
prompts, perplexity over texts. Each facts run records those items (facts_answers.jsonl of the
run and of its before/, whose `floor` rows are the fictitious facts; perplexity_items.jsonl),
so the aggregates can be recomputed on resampled items.

This module owns that resampling: per forget set, `resamples` draws with replacement of the
forget facts, floor facts, other-subject retain facts and perplexity texts (all prompts of a
drawn fact together), the same draws for every run, so methods are compared on the same
resampled facts (`draw`); each run's point recomputed under every draw (`forget_removed`,
`FIGURES`); and, per pair of methods, the mean damage difference over the matched forget range
recomputed on every draw's curves, with its 95% percentile interval (`compare_with_noise`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kuda_cli.evaluate.fact_scoring import ANSWERS_FILE
from kuda_cli.evaluate.floors import forget_removed as forget_removed_share
from kuda_cli.evaluate.metrics.perplexity import ITEMS_FILE
from kuda_cli.evaluate.tradeoff import Point, compare

BEFORE = "before"
FORGET, FLOOR, OTHER, TEXTS = "forget", "floor", "other", "texts"
# an interval endpoint this close to 0 is 0: roundoff between equal curves is no difference
_ZERO = 1e-9

Weights = tuple[dict[Any, int], np.ndarray]  # unit id -> column, (resamples, units) counts


def _jsonl(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_items(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The per-item files of an unlearn run: `before` and `after` (facts_answers.jsonl rows of
    the starting and the unlearned model), `texts_before` and `texts_after` (perplexity_items
    rows); a file the run lacks is left out."""
    run_dir = Path(run_dir)
    found = {
        "before": _jsonl(run_dir / BEFORE / ANSWERS_FILE),
        "after": _jsonl(run_dir / ANSWERS_FILE),
        "texts_before": _jsonl(run_dir / BEFORE / ITEMS_FILE),
        "texts_after": _jsonl(run_dir / ITEMS_FILE),
    }
    return {k: v for k, v in found.items() if v is not None}


def _rows(items: Mapping[str, list[dict]], which: str, split: str) -> list[dict]:
    return [r for r in items.get(which, ()) if r.get("split") == split]


def _other(items: Mapping[str, list[dict]]) -> list[dict]:
    """The unlearned model's other-subject retain rows; none where the rows lack the token
    agreement's counts (runs made before they were recorded)."""
    rows = _rows(items, "after", "retain")
    if not rows or any("reference_tokens" not in r or "subsets" not in r for r in rows):
        return []
    return [r for r in rows if "other_subjects" in r["subsets"]]


def units(items: Mapping[str, list[dict]]) -> dict[str, set]:
    """The ids of each kind of resampled unit a run was scored on: forget and floor facts,
    other-subject retain facts, perplexity texts."""
    return {
        FORGET: {r["fact"] for r in _rows(items, "before", "forget")},
        FLOOR: {r["fact"] for r in _rows(items, "before", "floor")},
        OTHER: {r["fact"] for r in _other(items)},
        TEXTS: {r["text"] for r in items.get("texts_before", ())},
    }


def draw(universe: Mapping[str, Sequence], resamples: int, seed: int) -> dict[str, Weights]:
    """Per kind of unit, its ids' columns and how many times each of `resamples` draws (with
    replacement, as many as there are units) took each: one set of draws for every run."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind in (FORGET, FLOOR, OTHER, TEXTS):
        ids = sorted(universe.get(kind, ()))
        picks = rng.integers(0, len(ids), size=(resamples, len(ids))) if ids else None
        counts = np.zeros((resamples, len(ids)))
        for b in range(resamples if ids else 0):
            counts[b] = np.bincount(picks[b], minlength=len(ids))
        out[kind] = ({unit: i for i, unit in enumerate(ids)}, counts)
    return out


def once(universe: Mapping[str, Sequence]) -> dict[str, Weights]:
    """The weights of the observed items: every unit drawn once (one 'resample')."""
    out = {}
    for kind, ids in universe.items():
        ids = sorted(ids)
        out[kind] = ({unit: i for i, unit in enumerate(ids)}, np.ones((1, len(ids))))
    return out


def _ratio_of_sums(rows, unit: str, num: Callable, den: Callable, weights: Weights) -> np.ndarray:
    """Per draw, sum of num(row) over sum of den(row), each row counted as often as the draw
    took its unit (rows whose num is None skipped); NaN where nothing is left."""
    index, counts = weights
    kept = [r for r in rows if num(r) is not None and r[unit] in index]
    if not kept:
        return np.full(counts.shape[0], np.nan)
    w = counts[:, [index[r[unit]] for r in kept]]
    with np.errstate(invalid="ignore", divide="ignore"):
        top = w @ np.array([float(num(r)) for r in kept])
        return top / (w @ np.array([float(den(r)) for r in kept]))


def _accuracy(rows, key: str, weights: Weights) -> np.ndarray:
    return _ratio_of_sums(rows, "fact", lambda r: r[key], lambda r: 1.0, weights)


def _removed(before, after, floor) -> np.ndarray:
    """`floors.forget_removed` per draw: NaN where it is undefined."""
    draws = np.broadcast(before, after, floor)
    return np.array([forget_removed_share(b, a, f) for b, a, f in draws], dtype=float)


def forget_removed(items: Mapping[str, list[dict]], weights: Mapping[str, Weights]) -> np.ndarray:
    """summary.forget_removed per draw: the mean of the MC and the greedy share of the
    above-floor accuracy removed, NaN where either is undefined."""
    forget, floor = weights[FORGET], weights[FLOOR]
    before, after = _rows(items, "before", "forget"), _rows(items, "after", "forget")
    floor_rows = _rows(items, "before", "floor")
    shares = [
        _removed(_accuracy(before, key, forget), _accuracy(after, key, forget), f)
        for key, f in (
            ("mc_correct", _accuracy(floor_rows, "mc_correct", floor)),
            ("gen_correct", _accuracy(floor_rows, "gen_correct", floor)),
        )
    ]
    return (shares[0] + shares[1]) / 2


def other_token_agreement(items, weights: Mapping[str, Weights]) -> np.ndarray:
    """summary.retain_other_token_agreement per draw: the mean over other-subject retain prompts
    of the share of the starting model's answer tokens still ranked first."""

    def share(r):
        return (
            None if r["reference_tokens"] is None else r["agreeing_tokens"] / r["reference_tokens"]
        )

    return _ratio_of_sums(_other(items), "fact", share, lambda r: 1.0, weights[OTHER])


def perplexity_ratio(items, weights: Mapping[str, Weights]) -> np.ndarray:
    """summary.perplexity_ratio per draw: the unlearned over the starting model's perplexity."""

    def nll(which: str) -> np.ndarray:
        rows = items.get(which, [])
        return _ratio_of_sums(
            rows, "text", lambda r: r["nll"], lambda r: r["tokens"], weights[TEXTS]
        )

    return np.exp(nll("texts_after")) / np.exp(nll("texts_before"))


# the damage figures a bootstrap recomputes, by their metrics.json key, with the runs that can
FIGURES: dict[str, Callable] = {
    "summary.perplexity_ratio": perplexity_ratio,
    "summary.retain_other_token_agreement": other_token_agreement,
}
_HAS = {
    "summary.perplexity_ratio": lambda items: "texts_before" in items and "texts_after" in items,
    "summary.retain_other_token_agreement": lambda items: bool(_other(items)),
}


def resampled(items, key: str) -> bool:
    """Whether a run recorded the items its forget removed and its damage `key` come from."""
    has_x = bool(_rows(items, "before", "floor")) and bool(_rows(items, "after", "forget"))
    return key in FIGURES and has_x and _HAS[key](items)


def _points(curves, items, key: str, transform, weights) -> dict[str, tuple]:
    """Per run of the curves, its forget removed and damage under every draw."""
    out = {}
    for points in curves.values():
        for p in points:
            if p.run and p.run not in out:
                x = forget_removed(items[p.run], weights)
                y = FIGURES[key](items[p.run], weights)
                out[p.run] = (x, np.array([transform(float(v)) for v in y]))
    return out


def _resampled_differences(curves, points, lo, hi, grid, resamples: int) -> np.ndarray:
    """(pairs, draws): a's minus b's mean damage over the shared range, each draw's curves
    compared as `compare` does (NaN where a draw's curves do not overlap)."""
    out = []
    for b in range(resamples):
        drawn = {
            method: [
                Point(float(points[p.run][0][b]), float(points[p.run][1][b]), p.label, p.run)
                if p.run
                else p
                for p in pts
            ]
            for method, pts in curves.items()
        }
        rows = compare(drawn, lo=lo, hi=hi, grid=grid)
        out.append([np.nan if r["lower"] is None else r["a_mean"] - r["b_mean"] for r in rows])
    return np.array(out, dtype=float).T


def with_interval(row: dict, differences: np.ndarray) -> dict:
    """`compare`'s row with the bootstrap's columns: the observed mean damage difference a - b
    (`difference`), its 95% percentile interval over the draws (`interval`), the share of draws
    where a is lower (`a_lower_resamples`), how many draws overlap (`resamples`), the observed
    curves' verdict (`lower_observed`), and `lower`: a or b where the interval excludes 0,
    "within noise" where it does not."""
    valid = differences[np.isfinite(differences)]
    out = {**row, "lower_observed": row["lower"], "resamples": int(valid.size)}
    if row["lower"] is None or not valid.size:
        return {**out, "difference": None, "interval": None, "a_lower_resamples": None}
    low, high = (float(v) for v in np.percentile(valid, [2.5, 97.5]))
    verdict = row["a"] if high < -_ZERO else row["b"] if low > _ZERO else "within noise"
    return {
        **out,
        "difference": row["a_mean"] - row["b_mean"],
        "interval": [low, high],
        "a_lower_resamples": float(np.mean(valid < -_ZERO)),
        "lower": verdict,
    }


def compare_with_noise(
    panels: Mapping[str, Mapping[str, Sequence[Point]]],
    keys: Mapping[str, tuple[str, Callable[[float], float]]],
    lo: float,
    hi: float,
    resamples: int,
    seed: int,
    grid: int = 41,
) -> tuple[dict[str, list[dict]], list[str]]:
    """Per panel (damage figure) of one forget set, `compare`'s rows of its curves, with the
    bootstrap's columns (`with_interval`) where every run on it recorded its items, and the
    lines a report prints about it. `keys` gives per panel the metrics.json key of its damage
    and the transform from that figure to the damage; points name their run directory."""
    compared = {panel: compare(curves, lo=lo, hi=hi, grid=grid) for panel, curves in panels.items()}
    if resamples <= 0:
        return compared, []
    runs = sorted({p.run for c in panels.values() for pts in c.values() for p in pts if p.run})
    items = {run: read_items(run) for run in runs}
    universe: dict[str, set] = {}
    for found in items.values():
        for kind, ids in units(found).items():
            universe.setdefault(kind, set()).update(ids)
    weights = draw(universe, resamples, seed)
    lacking: dict[str, list[str]] = {}
    for panel, curves in panels.items():
        key, transform = keys[panel]
        on = sorted({p.run for pts in curves.values() for p in pts if p.run})
        lacking[panel] = [run for run in on if not resampled(items[run], key)]
        if on and not lacking[panel]:
            points = _points(curves, items, key, transform, weights)
            differences = _resampled_differences(curves, points, lo, hi, grid, resamples)
            compared[panel] = [
                with_interval(r, d) for r, d in zip(compared[panel], differences, strict=True)
            ]
    return compared, _notes(lacking, len(runs), resamples, seed)


def _notes(lacking: Mapping[str, list[str]], runs: int, resamples: int, seed: int) -> list[str]:
    """What a report says of the bootstrap: how it drew, and which damages it left out."""
    notes = []
    if not all(lacking.values()):
        notes.append(
            f"Bootstrap: {resamples} draws (seed {seed}) of the forget, floor and other-subject "
            "facts and the perplexity texts, with replacement, the same for every run; A − B is "
            "the mean damage difference over the shared range with its 95% interval, and "
            "`lower` names a method only where that interval excludes 0."
        )
    missing = sorted({run for found in lacking.values() for run in found})
    if missing:
        panels = ", ".join(panel for panel, found in lacking.items() if found)
        notes.append(
            f"No bootstrap for {panels}: {len(missing)} of {runs} runs lack the per-item figures "
            f"it resamples (made before kuda recorded them, e.g. {missing[0]}); `lower` there is "
            "the observed curves' verdict."
        )
    return notes


def columns(compared: Mapping[str, Sequence[dict]]) -> tuple:
    """The bootstrap's columns of a comparison table (`COLUMNS`), where a row has them."""
    has = any("lower_observed" in row for rows in compared.values() for row in rows)
    return COLUMNS if has else ()


def _cell(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        return "–"
    if name == "interval":
        return f"[{value[0]:+.3f}, {value[1]:+.3f}]"
    return f"{value:+.3f}" if name == "difference" else f"{value:.3f}"


# the bootstrap's columns of a comparison table: (header, cell of a row)
COLUMNS = (
    ("lower, observed", lambda row: row.get("lower_observed") or "–"),
    ("A − B", lambda row: _cell(row, "difference")),
    ("95% interval", lambda row: _cell(row, "interval")),
    ("A lower in draws", lambda row: _cell(row, "a_lower_resamples")),
)
