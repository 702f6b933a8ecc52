"""What the attacks change about the facts evaluation and how their forgetting is measured:
the view of the sets an attacked model is scored on (`FactsView`: a subset of the forget facts,
further splits, prompts with text before them), a seeded split of the forget facts into halves,
and `forget_removed` on the attacked prompts beside the un-attacked model's on the same ones."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuda_cli.data.fact_set import Fact, Probe
from kuda_cli.evaluate.fact_scoring import ANSWERS_FILE
from kuda_cli.evaluate.floors import forget_removed
from kuda_cli.evaluate.metrics.facts import Facts
from kuda_cli.run import lookup


@dataclass(frozen=True)
class PrefixedProbe(Probe):
    """A probe with text before its prompt (few-shot demonstrations)."""

    prefix: str = ""

    @property
    def text(self) -> str:
        return self.prefix + super().text


@dataclass(frozen=True)
class FactsView:
    """The sets the facts metric scores an attacked model on, instead of the configured ones."""

    forget: list[Probe]  # the forget split's probes
    extra: dict[str, list[Probe]] = field(default_factory=dict)  # more splits, scored alike
    retain: bool = True  # score the retain split too
    fluency: bool = True  # long answers to the forget facts' first prompts


def halves(facts: list[Fact], seed: int) -> tuple[list[Fact], list[Fact]]:
    """The facts split by fact into two halves (A the first, one more where odd), shuffled
    with `seed`, each in the facts' order."""
    ids = sorted(f.id for f in facts)
    random.Random(seed).shuffle(ids)
    first = set(ids[: (len(ids) + 1) // 2])
    return [f for f in facts if f.id in first], [f for f in facts if f.id not in first]


def _rows(directory: Path | None) -> list[dict[str, Any]] | None:
    path = directory / ANSWERS_FILE if directory is not None else None
    if path is None or not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _accuracy(rows, fact_ids: set[str] | None) -> tuple[float | None, float | None]:
    """(MC, greedy) accuracy of a facts evaluation's forget rows of `fact_ids` (None: all)."""
    picked = [
        r for r in rows if r["split"] == "forget" and (fact_ids is None or r["fact"] in fact_ids)
    ]
    mc = [r["mc_correct"] for r in picked if r["mc_correct"] is not None]
    gen = [r["gen_correct"] for r in picked if r["gen_correct"] is not None]
    return (sum(mc) / len(mc) if mc else None, sum(gen) / len(gen) if gen else None)


def _starting_floor(before_dir: Path) -> tuple[float | None, float | None]:
    """(MC, greedy) never-learned floor of the starting model's evaluation in `before_dir`."""
    metrics = json.loads((before_dir / "metrics.json").read_text())
    return lookup(metrics, "facts.floor.mc_acc"), lookup(metrics, "facts.floor.gen_acc")


def _removed(before, after, floor) -> dict[str, float | None]:
    mc, gen = (forget_removed(b, a, f) for b, a, f in zip(before, after, floor, strict=True))
    both = mc is not None and gen is not None
    return {"forget_removed": (mc + gen) / 2 if both else mc, "mc": mc, "gen": gen}


def removed_beside(
    before_dir: Path | None,
    unattacked_dir: Path | None,
    fact_ids: set[str] | None,
    attacked: dict,
) -> dict[str, Any] | None:
    """`forget_removed` (the share of the starting model's above-floor accuracy removed, MC and
    greedy averaged; MC alone where the attacked figures have no greedy accuracy) of the
    attacked forget figures (`facts.forget` of its results) and of the un-attacked model on
    the same facts' prompts (`fact_ids`, None: every forget fact); None without the starting
    model's evaluation."""
    before_rows, after_rows = _rows(before_dir), _rows(unattacked_dir)
    if before_rows is None:
        return None
    floor = _starting_floor(before_dir)
    before = _accuracy(before_rows, fact_ids)
    found = (attacked.get("mc_acc"), attacked.get("gen_acc"))
    out = {"attacked": _removed(before, found, floor)}
    if after_rows is not None:
        unattacked = _accuracy(after_rows, fact_ids)
        if found[1] is None:
            unattacked = (unattacked[0], None)
        out["unattacked"] = _removed(before, unattacked, floor)
    return out


def removed_against(before_dir: Path | None, reference: dict, attacked: dict) -> dict | None:
    """`forget_removed` of the attacked forget figures against another reference than the
    starting model as evaluated (`reference`: forget figures of the starting model under the same
    attack, e.g. quantized alike), with the starting model's floors; None without them."""
    if before_dir is None or not (before_dir / "metrics.json").is_file():
        return None
    floor = _starting_floor(before_dir)
    ref = (reference.get("mc_acc"), reference.get("gen_acc"))
    found = (attacked.get("mc_acc"), attacked.get("gen_acc"))
    return _removed(ref, found, floor)


def removed_above_floor(
    before_dir: Path | None, fact_ids: set[str] | None, attacked: dict, floor: dict
) -> dict[str, float | None] | None:
    """`forget_removed` of the attacked forget figures with the attacked model's own floor (its
    figures on the invented-subject facts) in place of the starting model's: what came back
    beyond what the attack taught about answering such prompts at all."""
    before_rows = _rows(before_dir)
    if before_rows is None:
        return None
    before = _accuracy(before_rows, fact_ids)
    found = (attacked.get("mc_acc"), attacked.get("gen_acc"))
    return _removed(before, found, (floor.get("mc_acc"), floor.get("gen_acc")))


def with_removed(found: dict[str, Any], actx, fact_ids: set[str] | None = None) -> dict[str, Any]:
    """`found` (an attacked model's results) with `forget_removed` beside the un-attacked
    model's, where it has facts figures and the starting model's evaluation is at hand."""
    figures = found.get(Facts.name, {}).get("forget")
    if figures is not None:
        removed = removed_beside(actx.before_dir, actx.ctx.out_dir, fact_ids, figures)
        if removed is not None:
            found["forget_removed"] = removed
    return found
