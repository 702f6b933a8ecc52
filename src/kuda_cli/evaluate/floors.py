"""Floors of the facts benchmark: what a model that never learned the facts would score.

Some answers of the built-in facts can be read off the question (France -> French; a chemical
symbol from its element's name), so a domain's multiple-choice accuracy is judged against a
floor, not against chance alone. This module owns:

- the shipped matched set of fictitious subjects (`builtin_floor_path`, built by
  `scripts/build_floors.py`): one invented subject per real fact with the same prompts and the
  same options, so the starting model's accuracy on it is the floor of a model that knows none of
  the facts but reads the question as well as it does (as TOFU does with fictitious authors);
- a string scorer that knows no facts and only reads letters (`surface_score`), its expected
  accuracy (`surface_pick_share`, `surface_floor`) which the fictitious set is matched on, and
  `chance`;
- `forget_removed`: the share of the above-floor accuracy that forgetting removed.

Plain Python: no torch, no hydra.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kuda_cli.data.fact_set import Fact

# letters NFKD leaves whole (ligatures and stroked letters), spelled out in ASCII
_SPELLED = str.maketrans({"œ": "oe", "æ": "ae", "ß": "ss", "ø": "o", "đ": "d", "ł": "l"})


def surface_letters(text: str) -> str:
    """Lowercase ASCII letters of a subject or option, after dropping a leading "the ".

    Accents are folded with unicodedata NFKD (é -> e, ü -> u) and the few letters NFKD keeps whole
    are spelled out (œ -> oe, æ -> ae, ß -> ss); every character that is then not a-z is dropped:
    "the United Kingdom" -> "unitedkingdom", "Addis Ababa" -> "addisababa".
    """
    text = text.strip().lower().translate(_SPELLED)
    if text.startswith("the "):
        text = text[4:]
    folded = unicodedata.normalize("NFKD", text)
    return "".join(c for c in folded if "a" <= c <= "z")


def surface_score(subject: str, option: str) -> float:
    """How well `option` reads off `subject` by letters alone; knows no facts.

    With s and o the `surface_letters` of subject and option:

        score = (1.0 if s[0] == o[0] else 0.0) + matched / len(o)

    where `matched` counts o's letters found greedily, in order, as a subsequence of s: a position
    p starts at 0; for each letter of o, the first occurrence of it at or after p is looked for;
    when found it counts and p moves just past it, when missed p stays and the next letter is
    tried. Examples: ("hydrogen", "Hg") = 1 + 2/2 = 2.0; ("France", "French") = 1 + 3/6 = 1.5
    (f, r, e match; no n, c or h follows the final e of "france"). An option without letters
    scores 0.0.
    """
    s, o = surface_letters(subject), surface_letters(option)
    if not o:
        return 0.0
    first = 1.0 if s and s[0] == o[0] else 0.0
    pos = matched = 0
    for letter in o:
        found = s.find(letter, pos)
        if found >= 0:
            matched += 1
            pos = found + 1
    return first + matched / len(o)


def surface_pick_share(subject: str, options: Sequence[str], target_index: int = 0) -> float:
    """Expected accuracy of picking the best `surface_score` option, ties broken uniformly at
    random: 1/k when the target is one of k tied best options, else 0."""
    scores = [surface_score(subject, option) for option in options]
    best = max(scores)
    tied = [i for i, score in enumerate(scores) if math.isclose(score, best, abs_tol=1e-12)]
    return 1.0 / len(tied) if target_index in tied else 0.0


def surface_floor(facts: Sequence[Fact]) -> float | None:
    """Mean `surface_pick_share` over the facts (the target is first of `fact.options`); None
    if there are none."""
    if not facts:
        return None
    return sum(surface_pick_share(f.subject, f.options) for f in facts) / len(facts)


def chance(facts: Sequence[Fact]) -> float | None:
    """Mean of 1 / number of options: the accuracy of guessing uniformly; None if no facts."""
    if not facts:
        return None
    return sum(1.0 / len(f.options) for f in facts) / len(facts)


def forget_removed(before: float | None, after: float | None, floor: float | None) -> float | None:
    """Share of the above-floor accuracy that forgetting removed: (before - after) /
    (before - floor), clipped to [0, 1]. None when an input is None or when `before` is not above
    `floor` (by more than 1e-9): then there was nothing above the floor to remove."""
    if before is None or after is None or floor is None or before - floor <= 1e-9:
        return None
    return min(1.0, max(0.0, (before - after) / (before - floor)))


def builtin_floor_path() -> Path:
    """The shipped fictitious set matched to the built-in facts (`scripts/build_floors.py`)."""
    return Path(str(resources.files("kuda_cli.data") / "builtin" / "fictitious.jsonl"))
