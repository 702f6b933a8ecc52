"""unlearn/tuning.py: kuda pick and unlearn.auto_tune judge stability and choose by its one
definition, so the same measurements under equivalent limits get the same verdicts and choice."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kuda_cli import cli
from kuda_cli.config import AutoTuneSpec
from kuda_cli.unlearn import auto_tune, tuning

# per learning-rate factor, gentlest first: forgetting and the retain top-1 tokens kept; the
# third sits exactly on the limit (0.75, exact in binary floating point)
FORGET = [0.2, 0.4, 0.6, 0.8, 1.0]
AGREEMENT = [1.0, 0.875, 0.75, 0.625, 0.5]
# equivalent limits: agreement >= 0.75 for auto_tune; utility = agreement against a baseline of
# 1.0 kept within 25% for kuda pick. target_removed=1.0 is reached only by an unstable trial
SPEC = AutoTuneSpec(
    enabled=True, factors=[1, 2, 3, 4, 5], trials=5, target_removed=1.0, min_agreement=0.75
)
PICK = ["tune.objective=forget_removed", "tune.utility=retain_agreement", "tune.tolerance=0.25"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def row(i: int) -> dict:
    return {"forget_removed": FORGET[i], "retain_agreement": AGREEMENT[i]}


def auto_tune_verdicts() -> tuple[int, dict[int, bool]]:
    """auto_tune's choice, and its verdict on each trial: a search over that trial alone falls
    back to "no trial was stable" or not."""
    index, _, _ = auto_tune.search(SPEC, row)
    verdicts = {}
    for i in range(len(FORGET)):
        _, _, why = auto_tune.search(replace(SPEC, factors=[1.0]), lambda _, i=i: row(i))
        verdicts[i] = "no trial was stable" not in why
    return index, verdicts


def pick_verdicts(tmp_path: Path) -> tuple[int, dict[int, bool]]:
    """kuda pick's choice among runs of the same measurements, and its verdict on each run."""
    sweep = tmp_path / "sweep"
    for i in range(len(FORGET)):
        run_dir = sweep / str(i)
        run_dir.mkdir(parents=True)
        (run_dir / "meta.json").write_text(json.dumps({"stage": "unlearn", "status": "completed"}))
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"unlearn": {"lr": float(i + 1)}}))
        before = {"forget_removed": 0.0, "retain_agreement": 1.0}
        (run_dir / "metrics.json").write_text(json.dumps({**row(i), "before": before}))
    out = tmp_path / "pick"
    argv = ["pick", f"tune.runs=[{sweep}]", *PICK, "tune.carry=[unlearn.lr]"]
    assert cli.main([*argv, f"hydra.run.dir={out}"]) == 0
    chosen = int(Path(yaml.safe_load((out / "choice.yaml").read_text())["run"]).name)
    with open(out / "candidates.csv") as f:
        verdicts = {int(Path(r["run"]).name): r["qualifies"] == "True" for r in csv.DictReader(f)}
    return chosen, verdicts


def test_pick_and_auto_tune_agree_on_stability_and_choice_under_equivalent_limits(tmp_path):
    # stable up to the limit itself (index 2), the strongest stable one chosen by both
    expected = (2, {0: True, 1: True, 2: True, 3: False, 4: False})
    assert auto_tune_verdicts() == expected
    assert pick_verdicts(tmp_path) == expected


def test_pick_and_auto_tune_both_follow_the_tuning_modules_stability(tmp_path, monkeypatch):
    """A different definition planted in unlearn/tuning.py changes both paths alike: neither
    judges stability by a copy of its own."""

    def stricter(candidate, limits):
        return candidate.forgetting <= 0.4

    monkeypatch.setattr(tuning, "stable", stricter)
    expected = (1, {0: True, 1: True, 2: False, 3: False, 4: False})
    assert auto_tune_verdicts() == expected
    assert pick_verdicts(tmp_path) == expected
