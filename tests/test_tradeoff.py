"""Trade-off curves: Pareto frontiers, damage read off them, pairwise comparison of methods, the
tables and the frontier plot, on synthetic curves whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from kuda_cli.evaluate.tradeoff import (
    Point,
    compare,
    covered,
    damage_at,
    markdown_table,
    pareto,
    plot_frontier,
    points_table,
    wins,
)


def pts(*xy) -> list[Point]:
    return [Point(x, y, label=f"r{i}") for i, (x, y) in enumerate(xy)]


def coords(points) -> list[tuple[float, float]]:
    return [(p.x, p.y) for p in points]


def test_pareto_drops_dominated_and_invalid_points():
    points = pts(
        (0.5, 1.3),
        (0.2, 1.1),
        (0.4, 1.5),  # dominated by (0.5, 1.3): removes less, damages more
        (0.5, 1.4),  # same x as (0.5, 1.3), more damage: dominated
        (0.8, 2.0),
        (None, 0.1),
        (math.nan, 0.1),
        (0.9, math.nan),
        (0.9, None),
    )
    front = pareto(points)
    assert coords(front) == [(0.2, 1.1), (0.5, 1.3), (0.8, 2.0)]
    assert [p.label for p in front] == ["r1", "r0", "r4"]  # the points themselves, labels kept
    assert pareto([]) == []
    # a point that removes the most and damages the least dominates all the others
    assert coords(pareto(pts((0.3, 2.0), (0.9, 1.0), (0.6, 1.5)))) == [(0.9, 1.0)]
    # exact duplicates: one is kept
    assert coords(pareto(pts((0.5, 1.0), (0.5, 1.0)))) == [(0.5, 1.0)]


def test_damage_at_interpolates_on_the_frontier():
    curve = pts((0.2, 1.0), (0.6, 2.0), (1.0, 4.0), (0.3, 3.0))  # (0.3, 3.0) is dominated
    # between (0.2, 1.0) and (0.6, 2.0): 1.0 + (0.5 - 0.2) / 0.4 * 1.0
    assert damage_at(curve, 0.5) == pytest.approx(1.75)
    # between (0.6, 2.0) and (1.0, 4.0): 2.0 + 0.2 / 0.4 * 2.0
    assert damage_at(curve, 0.8) == pytest.approx(3.0)
    assert damage_at(curve, 0.2) == pytest.approx(1.0)
    assert damage_at(curve, 1.0) == pytest.approx(4.0)
    assert damage_at(curve, 0.19) is None
    assert damage_at(curve, 1.01) is None
    assert damage_at([], 0.5) is None


def test_damage_at_single_point_and_dominated_low_end():
    single = pts((0.5, 2.0))
    assert damage_at(single, 0.5) == 2.0
    assert damage_at(single, 0.49) is None
    assert damage_at(single, 0.51) is None
    # the run at x=0.1 is dominated by the one at 0.3, so the frontier covers [0.3, 0.8] only
    curve = pts((0.1, 5.0), (0.3, 1.0), (0.8, 2.0))
    assert covered(curve) == (0.3, 0.8)
    assert damage_at(curve, 0.2) is None


def test_compare_shifted_down_curve_is_lower_everywhere():
    b = pts((0.3, 1.2), (0.6, 1.5), (0.95, 2.5))
    a = [Point(p.x, p.y - 0.1) for p in b]
    (row,) = compare({"A": a, "B": b})
    assert row["a"] == "A" and row["b"] == "B"
    assert row["shared"] == pytest.approx([0.5, 0.9])
    assert row["levels"] == 41
    assert row["lower"] == "A"
    assert row["a_lower_share"] == 1.0 and row["b_lower_share"] == 0.0
    assert row["a_mean"] - row["b_mean"] == pytest.approx(-0.1)
    # the order of the mapping names a and b, not the answer
    (flipped,) = compare({"B": b, "A": a})
    assert (flipped["a"], flipped["lower"], flipped["a_lower_share"]) == ("B", "A", 0.0)
    assert wins([row], "A") == {"B": "lower"}
    assert wins([row], "B") == {"A": "higher"}


def test_compare_crossing_curves_is_mixed():
    # A: 1.0 + 2 (x - 0.4); B: 1.4 + (x - 0.4) / 3; equal where 5/3 (x - 0.4) = 0.4, x = 0.64
    a = pts((0.4, 1.0), (1.0, 2.2))
    b = pts((0.4, 1.4), (1.0, 1.6))
    (row,) = compare({"A": a, "B": b}, lo=0.5, hi=0.9, grid=41)
    assert row["shared"] == pytest.approx([0.5, 0.9])
    assert row["lower"] == "mixed"
    # levels 0.50, 0.51, ..., 0.90: A lower at 0.50..0.63 (14), tie at 0.64, B lower at 0.65..0.90
    assert row["a_lower_share"] == pytest.approx(14 / 41)
    assert row["b_lower_share"] == pytest.approx(26 / 41)
    assert wins([row], "A") == {"B": "mixed"}


def test_compare_ties():
    a = pts((0.5, 1.0), (0.9, 2.0))
    (same,) = compare({"A": a, "B": [Point(p.x, p.y) for p in a]})
    assert same["lower"] == "tie" and same["a_lower_share"] == 0.0
    assert wins([same], "B") == {"A": "tie"}
    # touching at one end and lower everywhere else: the tie counts against neither
    (touch,) = compare({"A": a, "B": pts((0.5, 1.0), (0.9, 3.0))})
    assert touch["lower"] == "A"
    assert touch["a_lower_share"] == pytest.approx(40 / 41)


def test_compare_no_overlap():
    curves = {
        "A": pts((0.1, 1.0), (0.4, 1.5)),
        "B": pts((0.6, 1.1), (0.95, 2.0)),
        "C": pts((0.2, 1.0), (0.45, 1.2)),  # overlaps A, but below lo
        "D": pts((0.4, 1.0), (0.6, 1.3)),  # meets B in the single point 0.6
        "E": [Point(None, 1.0), Point(0.7, math.nan)],  # no valid point at all
    }
    rows = {(r["a"], r["b"]): r for r in compare(curves)}
    assert list(rows)[:4] == [("A", "B"), ("A", "C"), ("A", "D"), ("A", "E")]
    for pair in [("A", "B"), ("A", "C"), ("B", "D"), ("A", "E"), ("B", "E")]:
        assert rows[pair]["shared"] is None and rows[pair]["lower"] is None, pair
    assert rows[("B", "D")]["a_mean"] is None
    assert wins(rows.values(), "B")["A"] == "no overlap"


def test_shared_range_is_the_intersection():
    a = pts((0.1, 5.0), (0.3, 1.0), (0.8, 2.0))  # frontier covers [0.3, 0.8]
    b = pts((0.55, 1.0), (0.95, 3.0))
    (row,) = compare({"A": a, "B": b}, lo=0.2, hi=0.9)
    assert row["shared"] == pytest.approx([0.55, 0.8])
    (row,) = compare({"A": a, "B": pts((0.25, 1.0), (0.7, 3.0))}, lo=0.2, hi=0.9)
    assert row["shared"] == pytest.approx([0.3, 0.7])  # the dominated x=0.1 run extends nothing
    (row,) = compare({"A": a, "B": pts((0.0, 1.0), (1.0, 3.0))}, lo=0.4, hi=0.6)
    assert row["shared"] == pytest.approx([0.4, 0.6])


def test_wins_rejects_rows_of_several_comparisons():
    a, b = pts((0.5, 1.0), (0.9, 2.0)), pts((0.5, 2.0), (0.9, 3.0))
    rows = compare({"A": a, "B": b}) * 2
    with pytest.raises(ValueError):
        wins(rows, "A")


def test_tables():
    curves_by_metric = {
        "perplexity ratio": {
            "A": pts((0.4, 1.0), (1.0, 2.2)),
            "B": pts((0.4, 1.4), (1.0, 1.6)),
            "C": pts((0.1, 1.0), (0.2, 1.1)),
        },
    }
    table = markdown_table(curves_by_metric)
    lines = [line for line in table.splitlines() if line.startswith("| perplexity ratio")]
    assert len(lines) == 3
    assert "| A | B | 0.500–0.900 |" in lines[0]
    assert f"| {14 / 41:.3f} | {26 / 41:.3f} | mixed |" in lines[0]
    assert "no overlap" in lines[1]
    listing = points_table(curves_by_metric["perplexity ratio"], damage="perplexity ratio")
    assert "| A | r0 | 0.400 | 1.000 | ✓ |" in listing


def _drawn_figure(monkeypatch) -> dict:
    """What plot_frontier's figure holds when it is saved (it clears it right after): per panel
    its title, labels, y scale and each line's style, marker edge and face colours and points; the
    legend's entries and the suptitle."""
    from matplotlib.figure import Figure

    drawn: dict = {}
    real_savefig = Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn["panels"] = [
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "yscale": ax.get_yscale(),
                "lines": [
                    (
                        line.get_linestyle(),
                        line.get_markeredgecolor(),
                        line.get_markerfacecolor(),
                        [(float(x), float(y)) for x, y in zip(*line.get_data(), strict=True)],
                    )
                    for line in ax.get_lines()
                ],
            }
            for ax in fig.axes
        ]
        drawn["legend"] = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        drawn["title"] = fig.get_suptitle()
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return drawn


def test_plot_frontier_writes_a_readable_png_of_each_methods_points_and_frontier(
    tmp_path, monkeypatch
):
    import matplotlib.image

    ppl = {  # spans more than 10x: the log axis
        "A": pts((0.2, 1.1), (0.5, 1.4), (0.7, 2.5), (0.9, 15.0), (0.6, 3.0)),
        "B": pts((0.3, 1.3), (0.6, 2.0), (0.95, 30.0)),
    }
    disagreement = {
        "A": pts((0.2, 0.05), (0.5, 0.1), (0.7, 0.2), (0.9, 0.5)),
        "B": pts((0.3, 0.02), (0.6, 0.15), (0.95, 0.6), (0.4, math.nan)),
    }
    drawn = _drawn_figure(monkeypatch)
    path = tmp_path / "frontier.png"
    panels = {"perplexity ratio": ppl, "1 - other-subject token agreement": disagreement}
    plot_frontier(path, "synthetic", panels)

    assert path.stat().st_size > 10_000
    img = matplotlib.image.imread(path)
    height, width = img.shape[:2]
    assert 450 <= height <= 750 and 1100 <= width <= 1500, img.shape
    assert img.std() > 0.01  # something is drawn

    # worked out by hand: every valid point by x (dashed), the frontier (solid, filled), the
    # dominated points (hollow); the NaN point is left out
    expected = {
        "perplexity ratio": {
            "A": (
                [(0.2, 1.1), (0.5, 1.4), (0.6, 3.0), (0.7, 2.5), (0.9, 15.0)],
                [(0.2, 1.1), (0.5, 1.4), (0.7, 2.5), (0.9, 15.0)],
                [(0.6, 3.0)],
            ),
            "B": ([(0.3, 1.3), (0.6, 2.0), (0.95, 30.0)],) * 2 + ([],),
        },
        "1 - other-subject token agreement": {
            "A": ([(0.2, 0.05), (0.5, 0.1), (0.7, 0.2), (0.9, 0.5)],) * 2 + ([],),
            "B": ([(0.3, 0.02), (0.6, 0.15), (0.95, 0.6)],) * 2 + ([],),
        },
    }
    assert drawn["title"] == "synthetic"
    assert [p["title"] for p in drawn["panels"]] == list(panels)
    colours = {}
    for panel, want in zip(drawn["panels"], expected.values(), strict=True):
        assert panel["xlabel"].startswith("forget removed")
        assert panel["ylabel"].startswith(panel["title"])
        lines = panel["lines"]
        for method, (every, front, hollow) in want.items():
            dashed = [line for line in lines if line[0] == "--" and line[3] == every]
            solid = [line for line in lines if line[0] == "-" and line[3] == front]
            off = [line for line in lines if line[0] == "None" and line[2] == "white"]
            assert len(dashed) == 1 and len(solid) == 1, (panel["title"], method, lines)
            colour = colours.setdefault(method, dashed[0][1])  # one colour in every panel
            assert dashed[0][1] == solid[0][1] == colour, (panel["title"], method)
            assert [line[3] for line in off if line[1] == colour] == [hollow]
        start = 1.0 if "ratio" in panel["title"] else 0.0  # the defaults for start and ideal
        assert ("None", "black", "black", [(0.0, start)]) in lines
        assert any(line[3] == [(1.0, start)] and line[2] == "gold" for line in lines)
    assert len(set(colours.values())) == 2
    assert [p["yscale"] for p in drawn["panels"]] == ["log", "linear"]
    assert drawn["legend"][:2] == ["A", "B"]
