"""Kill and resume, for every method: a `kuda unlearn` process SIGKILLed from outside at a random
step, or killed halfway through a checkpoint write, and run again with the same command, ends
with the weights of an uninterrupted run (within 1e-6 on the CPU), having lost at most the steps
since its previous checkpoint."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from kuda_cli.unlearn.trainer import CHECKPOINT, STATE_FILE

from conftest import kuda_killed, log_rows, read_json

METHODS = ("ga", "graddiff", "npo", "simnpo", "rmu", "kuda")
STEPS, SAVE_EVERY = 6, 2
TINY = [
    "model=tiny-random",
    "locate=fixed",
    "locate.layers=[1,2]",
    "eval=none",
    f"unlearn.steps={STEPS}",
    f"unlearn.save_every={SAVE_EVERY}",
    "unlearn.lr=1e-3",
    "unlearn.batch_size=2",
    "unlearn.max_length=64",
]


def weights(run_dir):
    return load_file(str(run_dir / CHECKPOINT / "model.safetensors"))


def assert_same_weights(a_dir, b_dir, what):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"{what}: resumed weights differ from the uninterrupted run by {worst}"


def test_every_method_killed_at_a_random_step_resumes_to_the_uninterrupted_weights(
    kuda, tmp_path, monkeypatch
):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    sweep = ["unlearn", "-m", f"unlearn={','.join(METHODS)}", *TINY]
    kuda(*sweep, "hydra.sweep.dir=straight", check=True)

    # one sweep, killed once per job: each run again skips the completed jobs, resumes the
    # killed one and is killed in the next
    # every step 1..5 is killed after once a run (before the first checkpoint, at one, between
    # two), by a method drawn at random: a new draw each run, KILL_SEED=<seed> repeats one
    seed = int(os.environ.get("KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    points = [*range(1, STEPS), rng.randint(1, STEPS - 1)]
    rng.shuffle(points)
    kill_after = dict(zip(METHODS, points, strict=True))
    print(f"KILL_SEED={seed}: kill after {kill_after}")
    logged = {}  # the steps each job's log held when it was killed
    for job, method in enumerate(METHODS):
        log = f"sweep/{job}/train_log.jsonl"
        code = kuda_killed([*sweep, "hydra.sweep.dir=sweep"], tmp_path, log, kill_after[method])
        stderr = (tmp_path / "killed.stderr").read_text()[-3000:]
        assert code == -9, (f"KILL_SEED={seed}", method, stderr)
        logged[method] = log_rows(tmp_path, log)
    kuda(*sweep, "hydra.sweep.dir=sweep", check=True)

    for job, method in enumerate(METHODS):
        run = tmp_path / "sweep" / str(job)
        k = logged[method]
        what = f"KILL_SEED={seed}: {method} killed after step {k} (all: {logged})"
        assert f"unlearn={method}" in read_json(run / "meta.json")["overrides"], what
        # the last checkpoint before the kill; if the kill came while step k's was written, the
        # one before it
        last = SAVE_EVERY * (k // SAVE_EVERY)
        allowed = {last, last - SAVE_EVERY} if k == last else {last}
        resumed = read_json(run / "metrics.json")["train"]["resumed_from"] or 0
        assert resumed in allowed, (what, resumed)
        steps = [json.loads(r)["step"] for r in (run / "train_log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1)), what
        assert_same_weights(run, tmp_path / "straight" / str(job), what)


@pytest.mark.parametrize(("point", "found"), [("state", 2), ("prune", 4)])
def test_a_kill_during_a_checkpoint_write_loses_only_the_steps_since_the_previous_one(
    kuda, tmp_path, monkeypatch, point, found
):
    """Killed halfway through writing the trainer state of the save at step 4: the checkpoint a
    rerun finds is the complete one of step 2, never the half-written one; killed after the
    step-4 one is in place but before the older one is pruned: the rerun takes step 4's, and
    prunes step 2's."""
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    args = ["unlearn", *TINY, "unlearn=ga"]
    kuda(*args, "hydra.run.dir=straight", check=True)
    code = kuda_killed(
        [*args, "hydra.run.dir=run"],
        tmp_path,
        "run/never.jsonl",
        1,
        env={"SLOWED_KUDA_DIE": f"{point}:2", "SLOWED_KUDA_DELAY": "0"},
    )
    assert code == -9, (tmp_path / "killed.stderr").read_text()[-3000:]
    run = tmp_path / "run"
    assert not (run / CHECKPOINT).exists()  # no final model yet
    complete = sorted(p.name for p in run.glob(f"{CHECKPOINT}-*") if not p.name.endswith(".tmp"))
    assert complete == (["checkpoint-2"] if point == "state" else ["checkpoint-2", "checkpoint-4"])
    latest = run / f"{CHECKPOINT}-{found}"
    assert read_json(latest / "trainer_state.json")["step"] == found
    state = torch.load(latest / STATE_FILE, weights_only=False)
    assert state["step"] == found and state["optimizer"] and set(state["params"])

    done = kuda(*args, "hydra.run.dir=run", check=True)
    assert f"resuming from the checkpoint at step {found}" in done.stdout + done.stderr
    assert read_json(run / "metrics.json")["train"]["resumed_from"] == found
    assert sorted(p.name for p in run.glob(f"{CHECKPOINT}*")) == [CHECKPOINT]  # the final only
    assert_same_weights(run, tmp_path / "straight", f"killed in the {point} of a save")
