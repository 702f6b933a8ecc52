"""The before/after answers table `kuda unlearn` prints at the end of a facts run."""

import json

from kuda_cli.evaluate.side_by_side import pick, side_by_side, write_side_by_side


def _row(split, fact, domain, prompt, target, answer, correct):
    return {
        "split": split,
        "fact": fact,
        "domain": domain,
        "prompt": prompt,
        "target": target,
        "answer": answer,
        "mc_correct": correct,
        "gen_correct": correct,
    }


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


BEFORE = [
    _row("forget", "c-1", "capitals", "The capital of France is", "Paris", " Paris.", True),
    _row("forget", "c-1", "capitals", "France's capital is", "Paris", " Paris.", True),
    _row("forget", "c-2", "capitals", "The capital of Peru is", "Lima", " Quito.", False),
    _row("forget", "c-3", "capitals", "The capital of Italy is", "Rome", " Rome.\nRome is", True),
    _row("retain", "e-1", "chemistry", "The symbol of iron is", "Fe", " Fe.", True),
    _row("retain", "e-2", "chemistry", "The symbol of gold is", "Au", " Au.", True),
    _row("retain", "l-1", "languages", "In Spain people speak", "Spanish", " Spanish.", True),
]
AFTER = [
    _row("forget", "c-1", "capitals", "The capital of France is", "Paris", " a city | of", False),
    _row("forget", "c-1", "capitals", "France's capital is", "Paris", " Lyon.", False),
    _row("forget", "c-2", "capitals", "The capital of Peru is", "Lima", " Quito.", False),
    _row("forget", "c-3", "capitals", "The capital of Italy is", "Rome", " Rome.", True),
    _row("retain", "e-1", "chemistry", "The symbol of iron is", "Fe", " Fe.", True),
    _row("retain", "e-2", "chemistry", "The symbol of gold is", "Au", " Ag.", False),
    _row("retain", "l-1", "languages", "In Spain people speak", "Spanish", None, False),
]


def test_pick_takes_known_facts_once_and_domains_in_turn():
    forget = pick(BEFORE, "forget", 3)
    assert [r["prompt"] for r in forget] == ["The capital of France is", "The capital of Italy is"]
    retain = pick(BEFORE, "retain", 2)
    assert [r["domain"] for r in retain] == ["chemistry", "languages"]  # one of each first


def test_table_pairs_before_and_after_by_prompt(tmp_path):
    _write(tmp_path / "before" / "facts_answers.jsonl", BEFORE)
    _write(tmp_path / "facts_answers.jsonl", AFTER)
    table = write_side_by_side(tmp_path, count=3)
    lines = table.splitlines()
    assert (
        lines[2] == "| forget | The capital of France is | Paris | Paris. | a city \\| of (gone) |"
    )
    assert lines[3] == "| forget | The capital of Italy is | Rome | Rome. | Rome. (ok) |"
    assert lines[4] == "| retain | The symbol of iron is | Fe | Fe. | Fe. (ok) |"
    # a retain answer that was not generated (retain_greedy=false) is left out
    assert not any("Spain" in line for line in lines)
    assert lines[5] == "| retain | The symbol of gold is | Au | Au. | Ag. (gone) |"
    assert (tmp_path / "answers.md").read_text().endswith(table + "\n")


def test_no_table_without_facts_answers(tmp_path):
    assert side_by_side(tmp_path) is None
    assert write_side_by_side(tmp_path) is None
    assert not (tmp_path / "answers.md").exists()
