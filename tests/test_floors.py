"""Floors of the facts benchmark: the letters-only scorer on hand-computed examples, the share of
above-floor accuracy forgetting removed, and the shipped fictitious set matched to the real facts
(one per fact, the same options and prompts, invented unique subjects, the same surface floor)."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from kuda_cli.data.fact_set import Fact, load_facts
from kuda_cli.evaluate.floors import (
    builtin_floor_path,
    chance,
    forget_removed,
    surface_floor,
    surface_letters,
    surface_pick_share,
    surface_score,
)


def fact(subject: str, target: str, distractors: tuple[str, ...], domain: str = "d") -> Fact:
    return Fact(
        id=subject,
        domain=domain,
        subject=subject,
        target=target,
        prompts=("{} is",),
        distractors=distractors,
        passage=f"{subject} is {target}.",
    )


def test_surface_letters():
    assert surface_letters("the United Kingdom") == "unitedkingdom"
    assert surface_letters("The Eiffel Tower") == "eiffeltower"
    assert surface_letters("Addis Ababa") == "addisababa"
    assert surface_letters("Park Güell") == "parkguell"  # NFKD: ü -> u
    assert surface_letters("the Sacré-Cœur Basilica") == "sacrecoeurbasilica"  # œ -> oe
    assert surface_letters("Theatre") == "theatre"  # only "the " with its space is dropped
    assert surface_letters("Xi'an") == "xian"


def test_surface_score_by_hand():
    # "hydrogen": H -> first letter 1 + h matched 1/1 = 2.0; Hg -> 1 + (h at 0, g at 5) 2/2 = 2.0;
    # Hf -> 1 + (h, no f) 1/2 = 1.5; He -> 1 + (h at 0, e at 6) 2/2 = 2.0
    assert surface_score("hydrogen", "H") == 2.0
    assert surface_score("hydrogen", "Hg") == 2.0
    assert surface_score("hydrogen", "Hf") == 1.5
    assert surface_score("hydrogen", "He") == 2.0
    # "france" vs French: 1 + f(0) r(1) e(5), then n, c, h after position 6: missed -> 1 + 3/6
    assert surface_score("France", "French") == 1.5
    # German: g missed, e(5), then r, m, a, n after 6 missed -> 0 + 1/6
    assert surface_score("France", "German") == pytest.approx(1 / 6)
    # Spanish: s, p missed, a(2), n(3), i, s, h missed -> 2/7; Italian: i, t missed, a(2), l, i,
    # a missed (nothing after 3 is an a), n(3) -> 2/7
    assert surface_score("France", "Spanish") == pytest.approx(2 / 7)
    assert surface_score("France", "Italian") == pytest.approx(2 / 7)
    # a miss does not move the position: a(0), x missed, c(2) -> 1 + 2/3
    assert surface_score("abc", "axc") == pytest.approx(1 + 2 / 3)
    # letters before the position are not looked at again: b(1), then a after 2 missed -> 1/2
    assert surface_score("abc", "ba") == 0.5
    assert surface_score("abc", "") == 0.0  # an option without letters


def test_surface_pick_share_by_hand():
    # hydrogen: H, Hg, He tie at 2.0 (Hf 1.5): the target H is one of 3 tied best
    assert surface_pick_share("hydrogen", ["H", "Hg", "Hf", "He"]) == pytest.approx(1 / 3)
    assert surface_pick_share("hydrogen", ["H", "Hg", "Hf", "He"], target_index=2) == 0.0
    # France: French 1.5 beats Spanish 2/7, German 1/6, Italian 2/7
    options = ["French", "German", "Spanish", "Italian"]
    assert surface_pick_share("France", options) == 1.0
    assert surface_pick_share("France", options, target_index=1) == 0.0
    # a tie of two without a first-letter match: Spanish and Italian both 2/7
    assert surface_pick_share("France", ["Spanish", "Italian"]) == 0.5
    assert surface_pick_share("France", ["Spanish", "Italian"], target_index=1) == 0.5
    # the target loses: "sodium" vs Na 0 (no n, no a), S 1 + 1 = 2, Sn 1 + 1/2
    assert surface_pick_share("sodium", ["Na", "S", "Sn"]) == 0.0
    assert surface_pick_share("sodium", ["Na", "S", "Sn"], target_index=1) == 1.0


def test_surface_floor_and_chance():
    facts = [
        fact("hydrogen", "H", ("Hg", "Hf", "He")),  # 1/3, 4 options
        fact("France", "French", ("German", "Spanish", "Italian")),  # 1, 4 options
        fact("sodium", "Na", ("S",)),  # 0 (S scores 2), 2 options
    ]
    assert surface_floor(facts) == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert chance(facts) == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert surface_floor([]) is None
    assert chance([]) is None


def test_forget_removed_by_hand():
    assert forget_removed(0.9, 0.5, 0.5) == pytest.approx(1.0)  # down to the floor: all of it
    assert forget_removed(0.9, 0.7, 0.5) == pytest.approx(0.5)  # 0.2 of 0.4 above the floor
    assert forget_removed(0.9, 0.9, 0.5) == 0.0
    assert forget_removed(0.9, 0.3, 0.5) == 1.0  # below the floor: 0.6 / 0.4 clipped to 1
    assert forget_removed(0.9, 1.0, 0.5) == 0.0  # better than before: -0.25 clipped to 0
    assert forget_removed(0.5, 0.4, 0.5) is None  # nothing above the floor to remove
    assert forget_removed(0.4, 0.3, 0.5) is None
    assert forget_removed(0.5 + 1e-10, 0.4, 0.5) is None
    assert forget_removed(None, 0.4, 0.2) is None
    assert forget_removed(0.9, None, 0.2) is None
    assert forget_removed(0.9, 0.4, None) is None


def key(subject: str) -> str:
    lower = " ".join(subject.lower().split())
    return lower.removeprefix("the ")


def test_shipped_fictitious_set_matches_the_real_facts():
    real = load_facts()
    fictitious = load_facts(builtin_floor_path())  # the loader takes the extra "matches" field
    records = [json.loads(line) for line in builtin_floor_path().read_text().splitlines()]
    assert len(fictitious) == len(records) == len(real)

    by_id = {f.id: f for f in real}
    matched = [r["matches"] for r in records]
    assert sorted(matched) == sorted(by_id)  # one fictitious fact per real fact
    real_subjects = {key(f.subject) for f in real}
    for record, fict in zip(records, fictitious, strict=True):
        source = by_id[record["matches"]]
        assert fict.id == "fict-" + source.id
        assert fict.domain == source.domain
        assert fict.options == source.options  # the same target and distractors, in order
        assert fict.prompts == source.prompts
        assert key(fict.subject) not in real_subjects
        assert fict.subject.lower() in fict.passage.lower()
        named = re.compile(r"(?<!\w)" + re.escape(source.subject) + r"(?!\w)", re.IGNORECASE)
        assert not named.search(fict.passage)  # the real subject is swapped out
    assert len({key(f.subject) for f in fictitious}) == len(fictitious)

    real_by, fict_by = defaultdict(list), defaultdict(list)
    for f in real:
        real_by[f.domain].append(f)
    for f in fictitious:
        fict_by[f.domain].append(f)
    assert set(fict_by) == set(real_by)
    for domain, facts in real_by.items():
        assert len(fict_by[domain]) == len(facts)
        assert surface_floor(fict_by[domain]) == pytest.approx(surface_floor(facts), abs=0.02)
