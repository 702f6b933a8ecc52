"""What choosing a setting means, shared by the two ways kuda tunes: `kuda pick` chooses among a
sweep's finished runs, `unlearn.auto_tune` among short trials inside one run.

The paper tunes in two stages, a stability boundary and then the forgetting strength; both
follow them in this vocabulary. A `Candidate` is a setting tried: the forgetting figure it
reached and what it cost. `Limits` say what a stable candidate may cost, `stable` checks them,
`strength` and `reaches` say how strong a candidate is, and `choose` picks: the first stable
candidate reaching a target, else the strongest stable one, else (none stable) the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

MAX = "max"  # a larger forgetting figure forgets more; "min": a smaller one (forget accuracy)
# how a choice was made
TARGET = "target"  # the first stable candidate reaching the target
STRONGEST = "strongest"  # no stable one reaches it, or none was asked: the strongest stable one
NONE_STABLE = "none stable"  # no candidate is stable: the first one (callers list gentlest first)


@dataclass(frozen=True)
class Candidate:
    """A setting tried: the forgetting figure it reached and what it cost. A cost not measured
    counts as none (no utility lost, no retain knowledge removed, perplexity and top-1 tokens
    as the starting model's)."""

    forgetting: float  # as measured: tune.objective's value, a trial's forget removed
    utility: float | None = None  # a figure to keep, higher is better (accuracy, MMLU) ...
    baseline: float | None = None  # ... and the starting model's
    retain_removed: float = 0.0  # retain knowledge removed (cloze, against the floor)
    retain_ppl_ratio: float = 1.0  # perplexity of the retain passages, after / before
    retain_agreement: float = 1.0  # share of the retain passages' top-1 tokens kept
    settings: Mapping[str, Any] = field(default_factory=dict)  # what choosing it carries
    source: Any = None  # where it was measured: a run directory, a trial's index

    @property
    def ratio(self) -> float:
        """The utility kept, as a share of the baseline (inf over a zero baseline)."""
        return self.utility / self.baseline if self.baseline else float("inf")


@dataclass(frozen=True)
class Limits:
    """What a stable candidate may cost; a limit left None is not checked. kuda pick sets the
    tolerance (tune.tolerance), auto_tune the retain limits (unlearn.auto_tune.*)."""

    tolerance: float | None = None  # relative drop of the utility below its baseline
    max_retain_removed: float | None = None
    max_ppl_ratio: float | None = None
    min_agreement: float | None = None


def figure(value: Any) -> float | None:
    """A measured value as a number; None for what is absent or not a number (a bool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def stable(candidate: Candidate, limits: Limits) -> bool:
    """Whether the candidate keeps what should be kept: its utility at least (1 - tolerance) of
    the baseline, its retain removed and perplexity ratio at most, its agreement at least their
    limits. Written as what must hold, so a NaN figure is never stable."""
    c, lim = candidate, limits
    return (
        (
            lim.tolerance is None
            or c.utility is None
            or c.utility >= (1.0 - lim.tolerance) * c.baseline
        )
        and (lim.max_retain_removed is None or c.retain_removed <= lim.max_retain_removed)
        and (lim.max_ppl_ratio is None or c.retain_ppl_ratio <= lim.max_ppl_ratio)
        and (lim.min_agreement is None or c.retain_agreement >= lim.min_agreement)
    )


def strength(candidate: Candidate, direction: str = MAX) -> float:
    """The forgetting strength, larger forgets more: the figure, negated where a smaller figure
    forgets more (direction min)."""
    return candidate.forgetting if direction == MAX else -candidate.forgetting


def reaches(candidate: Candidate, target: float, direction: str = MAX) -> bool:
    """Whether the candidate forgets at least `target` (on the strength's scale)."""
    return strength(candidate, direction) >= target


class Choice(NamedTuple):
    candidate: Candidate
    how: str  # TARGET, STRONGEST or NONE_STABLE


def choose(
    candidates: Sequence[Candidate],
    limits: Limits,
    direction: str = MAX,
    target: float | None = None,
) -> Choice:
    """The choice among `candidates` (listed gentlest first where the order matters: a target,
    ties, none stable): the first stable one reaching `target`; else the strongest stable one
    (ties: the higher utility, then the earlier); else the first one."""
    if not candidates:
        raise ValueError("choose needs at least one candidate")
    good = [(i, c) for i, c in enumerate(candidates) if stable(c, limits)]
    if target is not None:
        hit = [c for _, c in good if reaches(c, target, direction)]
        if hit:
            return Choice(hit[0], TARGET)
    if good:

        def rank(ic: tuple[int, Candidate]) -> tuple[float, float, int]:
            i, c = ic
            kept = -math.inf if c.utility is None else c.utility
            return strength(c, direction), kept, -i

        return Choice(max(good, key=rank)[1], STRONGEST)
    return Choice(candidates[0], NONE_STABLE)
