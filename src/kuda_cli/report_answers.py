"""Forget answers before and after an attack, for `kuda report report.robustness=true`: per
run, the first forget facts the attack scored (in the data's order, not picked), each with the
starting model's greedy answer (before/), the unlearned model's, and the attacked model's (the
run's attacks/<name>/): whether an attack brings back the answer itself, not only a score."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kuda_cli.evaluate.attacks import ATTACKS_DIR
from kuda_cli.evaluate.fact_scoring import ANSWERS_FILE

# attacks whose attacked model answers (the logit lens reads layers, it writes no answers)
ANSWERING = ("relearn", "relearn_general", "quant8", "quant4", "fewshot")


def _first_forget_rows(directory: Path) -> dict[str, dict[str, Any]]:
    """Per forget fact, its first row in a facts_answers.jsonl (in the file's order)."""
    path = directory / ANSWERS_FILE
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if row and row["split"] == "forget" and row["fact"] not in rows:
            rows[row["fact"]] = row
    return rows


def strongest_of(figures: dict[str, Any], attacks) -> str | None:
    """Of `attacks` with a figure, the one that left least removed."""
    scored = {a: figures.get(a) for a in attacks if isinstance(figures.get(a), (int, float))}
    return min(scored, key=scored.__getitem__) if scored else None


def attacked_dir(run_dir: Path, attack: str, figures: dict[str, Any]) -> Path:
    """Where an attack wrote its attacked model's answers: a relearning attack's last step
    count's directory, the attack's own otherwise."""
    base = run_dir / ATTACKS_DIR / attack
    curve = figures.get(f"{attack}_curve")
    return base / f"steps_{curve[-1][0]}" if curve else base


def answers_under_attack(run_dir: Path, attack: str, figures: dict[str, Any], n: int = 10):
    """Up to `n` forget facts the attack scored: prompt, target, and the starting, unlearned
    and attacked answers with whether each is correct (greedy, the facts metric's rule)."""
    attacked = _first_forget_rows(attacked_dir(run_dir, attack, figures))
    unlearned, starting = _first_forget_rows(run_dir), _first_forget_rows(run_dir / "before")
    out = []
    for fact, row in attacked.items():
        if fact in unlearned and fact in starting:
            before, after = starting[fact], unlearned[fact]
            out.append(
                {
                    "fact": fact,
                    "prompt": after["prompt"],
                    "target": row["target"],
                    "starting": (before["answer"], before["gen_correct"]),
                    "unlearned": (after["answer"], after["gen_correct"]),
                    "attacked": (row["answer"], row["gen_correct"]),
                }
            )
        if len(out) == n:
            break
    return out


def _answer(pair) -> str:
    text, correct = pair
    text = " ".join(str(text).split()).replace("|", "\\|")[:60]
    return f"{'✓' if correct else '✗'} {text}"


def answers_markdown(data: str, methods: dict[str, dict[str, Any]]) -> list[str]:
    """One table per method: its first ten forget facts under its strongest answering attack."""
    lines = [f"## {data}", ""]
    for method, figures in methods.items():
        attack = strongest_of(figures, ANSWERING)  # of those that make the model answer
        rows = answers_under_attack(Path(figures["run"]), attack, figures) if attack else []
        if not rows:
            continue
        lines += [
            f"### {method}, under {attack}",
            "",
            "| prompt | target | starting | unlearned | attacked |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            cells = [_answer(r[k]) for k in ("starting", "unlearned", "attacked")]
            lines.append(f"| {r['prompt']} | {r['target']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
