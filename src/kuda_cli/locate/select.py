"""Layer selection: the window of consecutive layers whose mean indirect effect (of one module kind,
at the last corrupted token, averaged over probes) is the highest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Selection:
    layers: list[int]
    score: float  # mean score of the window


def select_window(scores: Sequence[float], size: int) -> Selection:
    """The `size` consecutive layers with the highest mean score; ties go to the earliest."""
    scores = np.asarray(scores, dtype=float)
    if not 1 <= size <= len(scores):
        raise ValueError(f"a window of {size} layers does not fit in {len(scores)} layers")
    if np.isnan(scores).any():
        raise ValueError("layer scores hold NaN")
    means = np.array([scores[i : i + size].mean() for i in range(len(scores) - size + 1)])
    # equal windows may differ in the last bits (summation order): ties go to the earliest
    start = int(np.flatnonzero(np.isclose(means, means.max(), rtol=1e-9, atol=1e-12))[0])
    return Selection(list(range(start, start + size)), float(means[start]))


def last_subject_scores(effects: Sequence[np.ndarray], last_subject: Sequence[int]) -> np.ndarray:
    """Per layer, the mean over probes of the (tokens, layers) effect at each probe's last
    corrupted token."""
    return np.mean([e[t] for e, t in zip(effects, last_subject, strict=True)], axis=0)
