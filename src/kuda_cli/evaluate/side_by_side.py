"""Before and after, side by side: a few greedy answers of the starting and the unlearned model
to the same forget and retain prompts (facts), for a reader to see what changed.

`kuda unlearn` prints the table at the end of a facts run and writes it to `answers.md` in the
run directory. The prompts are chosen, not cherry-picked: per split, the first facts (in file
order, one prompt each, from distinct domains where there are several) whose answer the
starting model got right, so the table shows what became of knowledge the model had.
"""

from __future__ import annotations

import json
from pathlib import Path

ANSWERS = "facts_answers.jsonl"


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_line(text: str, width: int) -> str:
    line = text.strip().split("\n", 1)[0].strip().replace("|", "\\|")
    return line if len(line) <= width else line[: width - 3].rstrip() + "..."


def pick(before: list[dict], split: str, count: int) -> list[dict]:
    """The first `count` facts of `split` the starting model answered right (greedy), one
    prompt each, taking domains in turn so several retain domains all show."""
    seen, by_domain = set(), {}
    for row in before:
        if row["split"] != split or not row.get("gen_correct") or row["fact"] in seen:
            continue
        seen.add(row["fact"])
        by_domain.setdefault(row["domain"], []).append(row)
    chosen, queues = [], list(by_domain.values())
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def side_by_side(run_dir: Path, count: int = 3, width: int = 48) -> str | None:
    """The markdown table, or None where the run has no before/after facts answers."""
    run_dir = Path(run_dir)
    if not (run_dir / "before" / ANSWERS).exists() or not (run_dir / ANSWERS).exists():
        return None
    before = _rows(run_dir / "before" / ANSWERS)
    after = {(r["split"], r["prompt"]): r for r in _rows(run_dir / ANSWERS)}
    lines = [
        "| split | prompt | answer | before | after |",
        "|---|---|---|---|---|",
    ]
    for split in ("forget", "retain"):
        for row in pick(before, split, count):
            now = after.get((split, row["prompt"]))
            if now is None or now.get("answer") is None:  # not generated (retain_greedy=false)
                continue
            mark = "ok" if now.get("gen_correct") else "gone"
            lines.append(
                f"| {split} | {row['prompt']} | {row['target']} | "
                f"{_first_line(row['answer'], width)} | "
                f"{_first_line(now['answer'], width)} ({mark}) |"
            )
    return "\n".join(lines) if len(lines) > 2 else None


def write_side_by_side(run_dir: Path, count: int = 3) -> str | None:
    """Write `answers.md` in the run directory and return the table (None: nothing to show)."""
    table = side_by_side(run_dir, count)
    if table is not None:
        text = (
            "# Greedy answers before and after unlearning\n\n"
            "(ok: the answer still names the fact's target; gone: it does not)\n\n" + table + "\n"
        )
        (Path(run_dir) / "answers.md").write_text(text, encoding="utf-8")
    return table
