"""logger=none (the default): the run directory is the only record."""

from __future__ import annotations

from dataclasses import dataclass

from kuda_cli.trackers import Tracker, register_tracker


@dataclass
class NoLogger:
    name: str = "none"


@register_tracker("none", NoLogger)
class NoTracker(Tracker):
    """Tracks nothing."""
