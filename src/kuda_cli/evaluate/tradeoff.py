"""Comparing unlearning methods by their whole trade-off curves, not by one run each.

Each unlearning run is one point: x = how much of the forget knowledge it removed
(`forget_removed`, 1 = down to the never-learned floor) and y = how much damage it did (any
lower-is-better damage metric: the perplexity ratio, 1 - retain token agreement, ...). Sweeping a
method's strength gives one curve per method (per forget domain, per damage metric).

This module owns the arithmetic and presentation of those curves: the Pareto frontier of a curve
(`pareto`), the damage a method pays at a given forget level, read off its frontier by linear
interpolation (`damage_at`), pairwise comparison of methods over the forget range both cover
(`compare`, summarised per method by `wins`), markdown tables of the comparison and of the points
(`markdown_table`, `points_table`), and one PNG of the frontiers (`plot_frontier`). It is plain
Python on numpy; matplotlib is imported only when plotting and draws with the Agg canvas (no
pyplot, no global state, no display). Collecting the points from run directories is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

# two damages closer than this (relative, or absolute near 0) are a tie, so interpolation roundoff
# between identical curves never reads as one being lower
_RTOL, _ATOL = 1e-9, 1e-12


@dataclass
class Point:
    """One run: x = forget removed, y = damage (lower is better); label names it (e.g. its lr),
    run its directory (where its per-item figures are, for a bootstrap)."""

    x: float
    y: float
    label: str = ""
    run: str = ""


def _finite(v) -> bool:
    return (
        v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v)
    )


def _valid(points: Iterable[Point]) -> list[Point]:
    return [p for p in points if _finite(p.x) and _finite(p.y)]


def pareto(points: Iterable[Point]) -> list[Point]:
    """The points no other point dominates, sorted by x ascending.

    q dominates p when q.x >= p.x and q.y <= p.y with at least one strict. Points whose x or y is
    None or NaN are dropped first. Of several points at exactly the same (x, y) only the first is
    kept (none dominates the others, and one is enough to draw or interpolate). Along the result
    both x and y strictly increase: removing more always costs more damage on a frontier.
    """
    pts = _valid(points)
    # by x descending, lower y first among equal x: a point is on the frontier iff its y is below
    # every y seen so far (those all have x >= its x)
    order = sorted(range(len(pts)), key=lambda i: (-pts[i].x, pts[i].y, i))
    front: list[Point] = []
    best = math.inf
    for i in order:
        if pts[i].y < best:
            front.append(pts[i])
            best = pts[i].y
    return front[::-1]


def covered(curve: Iterable[Point]) -> tuple[float, float] | None:
    """The forget range [min x, max x] of a curve's Pareto frontier; None for no valid point."""
    front = pareto(curve)
    return (front[0].x, front[-1].x) if front else None


def damage_at(curve: Iterable[Point], x: float) -> float | None:
    """The damage of a method at forget-removed level x, read off its Pareto frontier.

    Linear interpolation between consecutive frontier points; None outside the frontier's
    [min x, max x] (a single-point curve covers only its own x). Dominated points play no part:
    a method that removes more for less damage elsewhere is credited with that frontier.
    """
    front = pareto(curve)
    if not front or not _finite(x) or x < front[0].x or x > front[-1].x:
        return None
    xs = np.array([p.x for p in front], dtype=float)
    ys = np.array([p.y for p in front], dtype=float)
    return float(np.interp(x, xs, ys))


def _no_overlap(a: str, b: str) -> dict:
    return {
        "a": a,
        "b": b,
        "shared": None,
        "levels": 0,
        "a_mean": None,
        "b_mean": None,
        "a_lower_share": None,
        "b_lower_share": None,
        "lower": None,
    }


def compare(
    curves: Mapping[str, Sequence[Point]], lo: float = 0.5, hi: float = 0.9, grid: int = 41
) -> list[dict]:
    """One row per unordered pair of methods (a, b), in the mapping's order.

    The shared range is [lo, hi] intersected with both frontiers' covered ranges; where that is
    empty or a single point the row has `shared: None` and `lower: None`. Otherwise both damages
    are read (`damage_at`) at `grid` evenly spaced levels over the shared range, and the row holds
    `shared` [x0, x1], `levels`, the mean damage of each (`a_mean`, `b_mean`), the share of
    levels where each is strictly lower (`a_lower_share`, `b_lower_share`; ties count for
    neither), and `lower`: a or b when that method is lower at every level (levels where the two
    tie count against neither, but it must be lower at one at least), "tie" when they are equal at
    every level, "mixed" when each is lower somewhere.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2 levels, got {grid}")
    names = list(curves)
    ranges = {name: covered(curves[name]) for name in names}
    rows = []
    for a, b in combinations(names, 2):
        ra, rb = ranges[a], ranges[b]
        if ra is None or rb is None:
            rows.append(_no_overlap(a, b))
            continue
        x0, x1 = max(lo, ra[0], rb[0]), min(hi, ra[1], rb[1])
        if not x0 < x1:
            rows.append(_no_overlap(a, b))
            continue
        levels = np.linspace(x0, x1, grid)
        ya = np.array([damage_at(curves[a], x) for x in levels], dtype=float)
        yb = np.array([damage_at(curves[b], x) for x in levels], dtype=float)
        tie = np.isclose(ya, yb, rtol=_RTOL, atol=_ATOL)
        a_lower = (ya < yb) & ~tie
        b_lower = (yb < ya) & ~tie
        if tie.all():
            lower = "tie"
        elif not b_lower.any():
            lower = a
        elif not a_lower.any():
            lower = b
        else:
            lower = "mixed"
        rows.append(
            {
                "a": a,
                "b": b,
                "shared": [float(x0), float(x1)],
                "levels": grid,
                "a_mean": float(ya.mean()),
                "b_mean": float(yb.mean()),
                "a_lower_share": float(a_lower.mean()),
                "b_lower_share": float(b_lower.mean()),
                "lower": lower,
            }
        )
    return rows


def wins(rows: Iterable[dict], method: str) -> dict[str, str]:
    """For one method, its outcome against each other method in `rows` (from one `compare`):
    "lower" (its damage is lower over the whole shared range, or beyond the bootstrap's noise),
    "higher", "mixed", "tie", "within noise" or "no overlap"."""
    out: dict[str, str] = {}
    for row in rows:
        if method not in (row["a"], row["b"]):
            continue
        other = row["b"] if row["a"] == method else row["a"]
        if other in out:
            raise ValueError(f"{method} vs {other} appears twice: pass the rows of one compare()")
        lower = row["lower"]
        if lower is None:
            out[other] = "no overlap"
        elif lower == method:
            out[other] = "lower"
        elif lower == other:
            out[other] = "higher"
        else:  # "mixed" or "tie"
            out[other] = lower
    return out


def _num(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown_table(
    curves_by_metric: Mapping[str, Mapping[str, Sequence[Point]]],
    lo: float = 0.5,
    hi: float = 0.9,
    grid: int = 41,
    compared: Mapping[str, Sequence[dict]] | None = None,
    extra: Sequence[tuple[str, Callable[[dict], str]]] = (),
) -> str:
    """A markdown table comparing methods pairwise: one row per pair per damage metric (the keys
    of `curves_by_metric`), with the numbers of `compare` to 3 decimals, or of the rows given
    per metric in `compared`; `extra` columns (header, cell of a row) go before `lower`."""
    more = "".join(f" {header} |" for header, _ in extra)
    lines = [
        f"Damage compared over forget removed in [{lo:g}, {hi:g}] (intersected with the range both"
        f" methods' Pareto curves cover), at {grid} evenly spaced levels; lower damage is better.",
        "",
        "| damage | A | B | shared forget range | mean damage A | mean damage B "
        f"| A lower at | B lower at |{more} lower |",
        "|---|---|---|---|---:|---:|---:|---:|" + "---|" * len(extra) + "---|",
    ]
    for metric, curves in curves_by_metric.items():
        rows = (
            compared[metric] if compared is not None else compare(curves, lo=lo, hi=hi, grid=grid)
        )
        for row in rows:
            shared = row["shared"]
            span = "no overlap" if shared is None else f"{shared[0]:.3f}–{shared[1]:.3f}"
            lower = "–" if row["lower"] is None else row["lower"]
            lines.append(
                f"| {metric} | {row['a']} | {row['b']} | {span} | {_num(row['a_mean'])} "
                f"| {_num(row['b_mean'])} | {_num(row['a_lower_share'])} "
                f"| {_num(row['b_lower_share'])} |"
                + "".join(f" {cell(row)} |" for _, cell in extra)
                + f" {lower} |"
            )
    return "\n".join(lines) + "\n"


def points_table(curves: Mapping[str, Sequence[Point]], damage: str = "damage") -> str:
    """A markdown table of every point of every method, by method then x, marking the ones on
    the method's Pareto frontier; points with a missing coordinate are listed with a dash."""
    lines = [
        f"| method | run | forget removed | {damage} | Pareto |",
        "|---|---|---:|---:|:-:|",
    ]
    for method, points in curves.items():
        front = {id(p) for p in pareto(points)}
        ordered = sorted(points, key=lambda p: (not _finite(p.x), p.x if _finite(p.x) else 0.0))
        for p in ordered:
            x = _num(p.x) if _finite(p.x) else "–"
            y = _num(p.y) if _finite(p.y) else "–"
            mark = "✓" if id(p) in front else ""
            lines.append(f"| {method} | {p.label} | {x} | {y} | {mark} |")
    return "\n".join(lines) + "\n"


def _default_start(panel: str) -> float:
    """The starting model's damage: a ratio to itself is 1, a disagreement with itself is 0."""
    return 1.0 if "ratio" in panel.lower() or "perplexity" in panel.lower() else 0.0


def plot_frontier(
    path: str | Path,
    title: str,
    panels: Mapping[str, Mapping[str, Sequence[Point]]],
    start: Mapping[str, float] | None = None,
    ideal: Mapping[str, float] | None = None,
    lo: float = 0.5,
    hi: float = 0.9,
    annotate: bool = False,
) -> None:
    """One PNG of trade-off curves, one panel per damage metric (the keys of `panels`, used as
    the y-axis label), each mapping method -> its points.

    x is forget removed in [0, 1]. Each method is one colour in every panel: its points joined in
    order of x by a thin dashed line, its Pareto frontier drawn solid with filled markers, its
    dominated points hollow. `start` gives per panel the starting model's damage, marked at x=0,
    and `ideal` the damage of the ideal corner, starred at x=1 (both default to 1.0 for a panel
    whose name says "ratio" or "perplexity", else 0.0). The compared range [lo, hi] is shaded.
    A panel whose values are all positive and span more than 10x gets a log y axis. With
    `annotate`, each point is labelled with its `label` (e.g. the lr).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    start = dict(start or {})
    ideal = dict(ideal or {})
    methods: list[str] = []
    for curves in panels.values():
        methods += [m for m, points in curves.items() if m not in methods and _valid(points)]
    cmap = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    cmap += ["tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    color = {m: cmap[i % len(cmap)] for i, m in enumerate(methods)}

    n = max(1, len(panels))
    fig = Figure(figsize=(5.4 * n, 4.9 if n > 1 else 5.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (panel, curves) in zip(axes, panels.items(), strict=False):
        y0 = start.get(panel, _default_start(panel))
        y1 = ideal.get(panel, y0)
        ax.axvspan(lo, hi, color="0.5", alpha=0.13, lw=0, zorder=0)
        ys = [y0, y1] + _draw_curves(ax, curves, color, annotate)
        ax.plot([0.0], [y0], "s", ms=9, color="black", zorder=5, clip_on=False)
        ax.plot([1.0], [y1], "*", ms=17, mfc="gold", mec="black", mew=0.9, zorder=5, clip_on=False)
        _set_axes(ax, panel, min(ys), max(ys))
    _legend(fig, methods, color, lo, hi, n)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=120)
    fig.clear()


def _draw_curves(ax, curves: Mapping[str, Sequence[Point]], color, annotate: bool) -> list[float]:
    """Each method's points (dashed, by x), Pareto frontier (solid) and dominated points
    (hollow) on one panel; returns the y values drawn."""
    ys: list[float] = []
    for method, points in curves.items():
        pts = sorted(_valid(points), key=lambda p: (p.x, p.y))
        if not pts:
            continue
        front = pareto(pts)
        on_front = {id(p) for p in front}
        c = color[method]
        ax.plot([p.x for p in pts], [p.y for p in pts], ls="--", lw=0.9, color=c, alpha=0.55)
        ax.plot([p.x for p in front], [p.y for p in front], "-o", lw=2.0, ms=6, color=c)
        off = [p for p in pts if id(p) not in on_front]
        ax.plot([p.x for p in off], [p.y for p in off], "o", ms=6, mfc="white", mec=c, mew=1.4)
        if annotate:
            for p in pts:
                if p.label:
                    ax.annotate(
                        p.label,
                        (p.x, p.y),
                        xytext=(4, 4),
                        textcoords="offset points",
                        fontsize=7,
                        color=c,
                    )
        ys += [p.y for p in pts]
    return ys


def _set_axes(ax, panel: str, bottom: float, top: float) -> None:
    """A panel's limits (a log y axis when its values are positive and span more than 10x),
    grid, labels and title."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xlim(-0.02, 1.02)
    ax.set_xticks(np.linspace(0, 1, 6))
    if bottom > 0 and top / bottom > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom / 1.25, top * 1.25)
    else:
        pad = 0.06 * (top - bottom or 1.0)
        ax.set_ylim(bottom - pad, top + pad)
    ax.grid(True, which="major", color="0.88", lw=0.7)
    ax.set_axisbelow(True)
    ax.set_xlabel("forget removed (1 = never-learned floor)")
    ax.set_ylabel(f"{panel} (lower is better)")
    ax.set_title(panel, fontsize=11)


def _legend(fig, methods: list[str], color: dict[str, str], lo: float, hi: float, n: int) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=color[m], marker="o", lw=2.0, label=m) for m in methods]
    handles += [
        Line2D(
            [],
            [],
            color="0.4",
            marker="o",
            mfc="white",
            ls="--",
            lw=0.9,
            label="all runs, by x (hollow: dominated)",
        ),
        Line2D([], [], color="black", marker="s", ls="", ms=8, label="starting model"),
        Line2D([], [], marker="*", ls="", ms=14, mfc="gold", mec="black", label="ideal"),
        Patch(color="0.5", alpha=0.25, label=f"compared range [{lo:g}, {hi:g}]"),
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 2 if n == 1 else 4),
        fontsize=9,
        frameon=False,
    )
