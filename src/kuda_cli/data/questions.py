"""Multiple-choice questions (WMDP, MMLU): how an answer names its choice."""

from __future__ import annotations

from typing import Any

LETTERS = "ABCD"


def answer_index(value: Any, count: int) -> int | None:
    """An answer as an index into `count` choices: an int, a digit string or a letter A-D (A is
    0); None when it names none of them."""
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        value = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return value
    return None
