"""A config is validated and its requirements checked once per command in a process: planning
checks every job before Hydra starts, the jobs Hydra then runs in that process check nothing
again, and a job in a process of its own (a SLURM node) checks what planning left to it."""

from __future__ import annotations

import pytest

from kuda_cli import checks, cli, requires, stages, validate
from kuda_cli.compose import compose
from kuda_cli.errors import ConfigError
from kuda_cli.planning import plan


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def counted(monkeypatch):
    """How often validate and requires.check ran."""
    calls = {"validate": 0, "requires": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(validate, "validate", counting("validate", validate.validate))
    monkeypatch.setattr(requires, "check", counting("requires", requires.check))
    return calls


def test_a_sweeps_jobs_are_not_checked_again_in_the_process_that_planned_them(counted, monkeypatch):
    ran = []
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "eval", lambda cfg, run: ran.append(cfg.seed))
    argv = ["eval", "model=tiny-random", "eval=none", "-m", "seed=1,2"]
    assert cli.main(argv) == 0
    assert ran == [1, 2]
    assert counted == {"validate": 2, "requires": 2}  # once per job: in planning


def test_a_command_run_again_in_the_same_process_is_checked_again(counted, monkeypatch):
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "eval", lambda cfg, run: None)
    argv = ["eval", "model=tiny-random", "eval=none"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    assert counted == {"validate": 2, "requires": 2}


def test_a_slurm_job_checks_on_its_node_the_gpu_planning_left_to_it(counted, monkeypatch):
    monkeypatch.setattr(requires, "gpu_missing", lambda: "no CUDA device is visible")
    job = ["model=tiny-random", "eval=none", "requires=[gpu]", "hydra/launcher=slurm"]
    planned = plan("eval", job, multirun=True)  # submitting: no GPU needed here
    cfg = compose(planned.jobs[0])
    checks.validate_once(cfg)
    assert counted["validate"] == 1  # validated in planning, not again
    with pytest.raises(ConfigError, match="needs a GPU"):
        checks.require_once(cfg)
    checks.forget_checked()  # the job's own process on the node: nothing checked there yet
    checks.validate_once(cfg)
    assert counted["validate"] == 2
