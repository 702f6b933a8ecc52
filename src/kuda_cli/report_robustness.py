"""kuda report's robustness summary (`report.robustness=true`): per forget set, each method's
forget removed without an attack and under each attack of its runs (`attacks.<name>` of
metrics.json), the weakest of them (the strongest attack), and one PNG per forget set: forget
removed on the held-apart facts against relearning steps (one line per method; relearning on
the other forget facts solid, on unrelated text dashed) beside the one-shot attacks.

Every figure is the share of the starting model's above-floor accuracy that is still gone
(1: as a model that never learned the facts, 0: all of it back); quantization is judged against
the starting model quantized alike, the logit lens against the starting model's own lens."""

from __future__ import annotations

import re
from math import nan
from pathlib import Path
from typing import Any

from kuda_cli.cache import write_json_atomic
from kuda_cli.report_answers import answers_markdown, strongest_of

ANSWERS_NOTE = (
    "Per method, its first ten forget facts (the data's order) under the attack that left least "
    "removed among those that make the model answer: the greedy answer of the starting model, "
    "the unlearned one and the attacked one (✓ correct, ✗ not, the facts metric's rule)."
)
# (column, dotted key of an unlearn run's flattened metrics) of the one-shot figures
SHOTS = (
    ("none", "summary.forget_removed"),
    ("quant8", "attacks.quant8.forget_removed.attacked.forget_removed"),
    ("quant4", "attacks.quant4.forget_removed.against_quantized_start.forget_removed"),
    ("logit_lens", "attacks.logit_lens.forget_removed.mc"),
    ("fewshot", "attacks.fewshot.forget_removed.attacked.forget_removed"),
)
# relearning attacks: forget removed on the facts they score after N steps (relearn: the half
# not trained on), attacked and un-attacked on the same prompts
CURVES = ("relearn", "relearn_general")
NAMES = [name for name, _ in SHOTS[1:]] + list(CURVES)  # the attacks' columns
STEP = r"attacks\.{}\.steps_(\d+)\.forget_removed\.(attacked|unattacked)\.forget_removed$"


def relearning_curve(row: dict[str, Any], attack: str) -> list[tuple[int, float]]:
    """(steps, forget removed) of a run's relearning attack, by steps, starting at 0 steps
    (the un-attacked model on the same prompts where 0 was not among the steps)."""
    pattern = re.compile(STEP.format(attack))
    found: dict[int, float] = {}
    start = None
    for key, value in row.items():
        match = pattern.match(key)
        if match and isinstance(value, (int, float)):
            if match.group(2) == "attacked":
                found[int(match.group(1))] = float(value)
            else:
                start = float(value)
    if found and 0 not in found and start is not None:
        found[0] = start
    return sorted(found.items())


def robustness_of(row: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: each one-shot attack's, each relearning curve and its last point,
    and the weakest figure under an attack with the attack's name."""
    out: dict[str, Any] = {name: row.get(key) for name, key in SHOTS}
    for attack in CURVES:
        curve = relearning_curve(row, attack)
        out[f"{attack}_curve"] = curve
        out[attack] = curve[-1][1] if curve else None
    strongest = strongest_of(out, NAMES)
    out["strongest_attack"] = strongest
    out["weakest"] = out[strongest] if strongest else None
    return out


def robustness_tables(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per forget set (the data label), per method (with its settings where a set holds a
    method twice), the figures of its completed unlearn runs that ran an attack."""
    from kuda_cli.report_tables import display_name

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("stage") != "unlearn" or row.get("status") != "completed":
            continue
        if not any(str(k).startswith("attacks.") for k in row):
            continue
        methods = out.setdefault(str(row["data"]), {})
        name = display_name(str(row["method"]))
        if name in methods:
            name = f"{name} ({row.get('settings')})"
        methods[name] = {"run": row["run"], **robustness_of(row)}
    return out


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def markdown(data: str, methods: dict[str, dict[str, Any]], png: str) -> list[str]:
    header = ["method", "none", *NAMES, "weakest", "strongest attack"]
    lines = [f"## {data}", "", f"![{data}]({png})", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, fig in methods.items():
        cells = [_cell(fig[k]) for k in ("none", *NAMES, "weakest")]
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {fig['strongest_attack'] or '-'} |"
        )
    return lines + [""]


def plot_robustness(path: Path, data: str, methods: dict[str, dict[str, Any]]) -> None:
    """Left: forget removed against relearning steps (solid: relearning on half the forget
    facts, scored on the other half; dashed: on unrelated text). Right: the one-shot attacks,
    one group of bars per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    fig = Figure(figsize=(11.5, 4.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    shots = [n for n, _ in SHOTS]
    width = 0.8 / max(1, len(methods))
    for i, (method, figures) in enumerate(methods.items()):
        color = palette[i % len(palette)]
        for attack, style in (("relearn", "-o"), ("relearn_general", "--s")):
            curve = figures[f"{attack}_curve"]
            if curve:
                label = method if attack == "relearn" else None
                left.plot(*zip(*curve, strict=True), style, color=color, label=label, ms=5)
        heights = [figures[s] if isinstance(figures[s], (int, float)) else nan for s in shots]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(shots))]
        right.bar(xs, heights, width, color=color, label=method)
    left.set(
        xlabel="relearning steps", ylabel="forget removed (held-apart facts)", ylim=(-0.03, 1.03)
    )
    left.set_title(
        "relearning on the other forget facts (solid), on unrelated text (dashed)", fontsize=10
    )
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.set_xticks(range(len(shots)), ["no attack", "8-bit", "4-bit*", "logit lens", "few-shot"])
    right.set(ylabel="forget removed", ylim=(0, 1.03))
    right.set_title("one-shot attacks (*against the starting model quantized alike)", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=7)
    fig.suptitle(f"forget {data}: what stays removed under attack (1: as never learned)")
    fig.savefig(path, dpi=120)
    fig.clear()


def write_robustness(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """robustness.md, robustness_<forget set>.png, robustness.json and robustness_answers.md
    (ten forget answers before and after each method's strongest attack); returns the figures."""
    found = robustness_tables(rows)
    lines = ["# Forget removed under attack", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    for data, methods in sorted(found.items()):
        name = data.split(":", 1)[-1]
        png = f"robustness_{re.sub(r'[^A-Za-z0-9_+-]', '_', name)}.png"
        plot_robustness(out_dir / png, name, methods)
        lines += markdown(data, methods, png)
    (out_dir / "robustness.md").write_text("\n".join(lines))
    answers = ["# Forget answers before and after the strongest attack", "", ANSWERS_NOTE, ""]
    for data, methods in sorted(found.items()):
        answers += answers_markdown(data, methods)
    (out_dir / "robustness_answers.md").write_text("\n".join(answers))
    write_json_atomic(out_dir / "robustness.json", found)
    return found
