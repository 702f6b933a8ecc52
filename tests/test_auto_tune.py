"""unlearn.auto_tune: the probes it scores (prompts or passage clozes), the figure it computes,
refusals, and a tiny run that records, chooses and resumes without repeating a trial."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from kuda_cli.config import AutoTuneSpec
from kuda_cli.data.fact_set import Fact
from kuda_cli.unlearn.auto_tune import cloze_of, clozes_of, read_trials, removed, search

from conftest import kuda_killed, log_rows, read_json


def fact(passage, subject="hydrogen", target="H", distractors=("He", "Hg")):
    return Fact("f", "chemistry", subject, target, ("{} is",), distractors, passage)


def test_a_cloze_is_the_passage_cut_before_the_answer_with_an_invented_floor():
    c = cloze_of(fact("Hydrogen, element number 1, is abbreviated H on periodic tables."), "zenka")
    assert c.context == "Hydrogen, element number 1, is abbreviated"
    assert c.floor_context == "Zenka, element number 1, is abbreviated"  # spelled as the mention
    assert c.options == (" H", " He", " Hg")
    low = cloze_of(fact("Chemists call hydrogen H."), "zenka")
    assert low.floor_context == "Chemists call zenka" and low.context == "Chemists call hydrogen"


def test_no_cloze_where_the_answer_comes_only_before_the_subject_or_inside_a_word():
    assert cloze_of(fact("Chemists write H when they mean hydrogen."), "zenka") is None
    oxygen = fact("Oxygen is a gas.", subject="oxygen", target="O", distractors=("Os",))
    assert cloze_of(oxygen, "zenka") is None  # the O of Oxygen is not the answer
    assert cloze_of(fact("No subject here: H."), "zenka") is None


def test_by_default_trials_are_scored_on_every_prompt_never_on_the_trained_passage():
    passage = "Hydrogen, element number 1, is abbreviated H on periodic tables."
    f = Fact(
        "f",
        "chemistry",
        "hydrogen",
        "H",
        ("{} has the symbol", "the symbol of {} is"),
        ("He", "Hg"),
        passage,
    )
    probes = clozes_of([f], seed=0)
    assert [p.context for p in probes] == ["Hydrogen has the symbol", "The symbol of hydrogen is"]
    assert all("periodic" not in p.context for p in probes)  # nothing of the passage
    floors = [p.floor_context for p in probes]
    name = floors[1].removeprefix("The symbol of ").removesuffix(" is")
    assert name and name != "hydrogen" and floors[0] == name.capitalize() + " has the symbol"
    assert all(p.options == (" H", " He", " Hg") for p in probes)
    assert [p.context for p in clozes_of([f], seed=0, source="passages")] == [
        "Hydrogen, element number 1, is abbreviated"
    ]


def test_removed_is_the_evaluations_figure_against_the_floor():
    # rows: (log share of the answer, answer said); fact 3 is not known (before == floor)
    before = np.array([[-0.1, 1.0], [-0.2, 1.0], [-1.0, 0.0]])
    floor = np.array([[-1.1, 0.0], [-1.2, 0.0], [-1.0, 0.0]])
    assert removed(before, before, floor) == 0.0
    assert removed(before, floor, floor) == pytest.approx(1.0)
    half = np.array([[-0.6, 1.0], [-0.2, 0.0], [-5.0, 0.0]])  # shares 0.5 and 0; said 1/2 gone
    assert removed(before, half, floor) == pytest.approx((0.25 + 0.5) / 2)
    worse = np.array([[-9.0, 0.0], [-9.0, 0.0], [-9.0, 0.0]])  # clipped at the floor
    assert removed(before, worse, floor) == pytest.approx(1.0)
    assert removed(floor, before, floor) is None  # nothing known


def monotone(removed_at, agreement_at):
    calls = []

    def run_trial(i):
        calls.append(i)
        return {
            "forget_removed": removed_at[i],
            "retain_agreement": agreement_at[i],
            "stable": agreement_at[i] >= 0.975,
        }

    return run_trial, calls


def test_search_finds_the_smallest_stable_rate_reaching_the_target():
    spec = AutoTuneSpec(enabled=True, factors=[1, 2, 3, 4, 5, 6, 7], trials=6)
    run_trial, calls = monotone(
        [0.1, 0.5, 0.8, 0.92, 0.95, 0.99, 1.0], [0.99, 0.99, 0.98, 0.98, 0.978, 0.97, 0.96]
    )
    index, rows, why = search(spec, run_trial)
    assert index == 3 and "reaching the target" in why
    assert len(calls) == len(set(calls)) <= spec.trials


def test_search_stops_at_the_stability_boundary_when_the_target_lies_beyond_it():
    spec = AutoTuneSpec(enabled=True, factors=[1, 2, 3, 4, 5, 6, 7], trials=6)
    run_trial, _ = monotone(
        [0.1, 0.3, 0.5, 0.6, 0.7, 0.95, 1.0], [0.99, 0.99, 0.98, 0.97] + [0.9] * 3
    )
    index, rows, why = search(spec, run_trial)
    assert index == 2 and "removed most" in why  # the largest stable one


def test_search_keeps_to_its_budget_and_falls_back_to_the_least_damaging_trial():
    spec = AutoTuneSpec(enabled=True, factors=[1, 2, 3, 4, 5, 6, 7], trials=2)
    run_trial, calls = monotone([0.5] * 7, [0.5] * 7)
    index, rows, why = search(spec, run_trial)
    assert len(calls) == 2 and index == min(calls) and "no trial was stable" in why


def test_trials_read_back_ignore_a_torn_last_line(tmp_path):
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "trials.jsonl").write_text(
        '{"lr": 0.001, "forget_removed": 0.5}\n{"lr": 0.0'
    )
    assert list(read_trials(tmp_path)) == ["1.000000e-03"]
    assert read_trials(None) == {} and read_trials(tmp_path / "absent") == {}


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data=wmdp_bio", "scores its trials on facts"),
        ("unlearn.auto_tune.factors=[2,1]", "positive and ascending"),
        ("unlearn.auto_tune.probes=answers", "choose one of"),
        ("unlearn.lora.enabled=true", "lora"),
    ],
)
def test_auto_tune_refuses_what_it_cannot_score_before_loading(kuda, override, says):
    method = ["unlearn=npo"] if "lora" in override else []
    done = kuda("unlearn", "model=tiny-random", *method, "unlearn.auto_tune.enabled=true", override)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert says in last, last


TINY = [
    "unlearn",
    "model=tiny-random",
    "locate=fixed",
    "locate.layers=[1,2]",
    "eval=none",
    "unlearn.steps=4",
    "unlearn.save_every=2",
    "unlearn.batch_size=2",
    "unlearn.max_length=64",
    "unlearn.auto_tune.enabled=true",
    "unlearn.auto_tune.trials=3",
    # a random model knows every fact or none by chance: a floor at 0 makes the figure defined
    "unlearn.auto_tune.max_retain_removed=1",
]


def untimed(record):
    return {
        **record,
        "trials": [{k: v for k, v in t.items() if k != "seconds"} for t in record["trials"]],
    }


def lrs(run):
    return [json.loads(r)["lr"] for r in (run / "tune" / "trials.jsonl").read_text().splitlines()]


def test_a_tuned_run_trains_at_its_choice_and_a_killed_one_repeats_no_trial(
    kuda, tmp_path, monkeypatch
):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    done = kuda(*TINY, "hydra.run.dir=straight")
    if done.returncode == 2 and "knows none" in done.stderr:
        pytest.skip("the tiny random model knows no cloze better than its floor")
    assert done.returncode == 0, done.stderr[-3000:]
    straight = tmp_path / "straight"
    tried = lrs(straight)
    assert len(tried) == len(set(tried)) == 3
    tuned = read_json(straight / "metrics.json")["auto_tune"]
    assert tuned == read_json(straight / "tune" / "choice.json")
    assert tuned["lr"] in tried
    steps = [json.loads(r) for r in (straight / "train_log.jsonl").read_text().splitlines()]
    assert {row["lr"] for row in steps} == {tuned["lr"]}  # the final run trains at the choice
    assert "auto_tune" in (straight / "config.yaml").read_text()

    # killed after the first trial, then during the final training: nothing is tried twice
    code = kuda_killed([*TINY, "hydra.run.dir=run"], tmp_path, "run/tune/trials.jsonl", 1)
    assert code == -9, (tmp_path / "killed.stderr").read_text()[-3000:]
    assert log_rows(tmp_path, "run/tune/trials.jsonl") == 1
    code = kuda_killed([*TINY, "hydra.run.dir=run"], tmp_path, "run/train_log.jsonl", 3)
    assert code == -9, (tmp_path / "killed.stderr").read_text()[-3000:]
    kuda(*TINY, "hydra.run.dir=run", check=True)
    run = tmp_path / "run"
    assert lrs(run) == tried
    resumed = read_json(run / "metrics.json")["auto_tune"]
    assert untimed(resumed) == untimed(tuned)  # the same trials' figures, the same choice
    assert read_json(run / "metrics.json")["train"]["resumed_from"] == 2
    a = load_file(str(run / "checkpoint" / "model.safetensors"))
    b = load_file(str(straight / "checkpoint" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
