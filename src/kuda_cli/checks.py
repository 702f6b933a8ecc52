"""A config's checks (validation, then what it requires: GPU, hub), each run once per command
in a process.

A command's configs are checked where they are first composed: `planning.plan` validates every
job of a run or sweep and checks its requirements before Hydra starts. The job Hydra then runs
in the same process has the same config and skips what plan did; what plan skipped, it checks.
A job in a process of its own (a SLURM job on its node, through submitit) starts with nothing
checked and checks everything there, on the machine that runs it: the GPU that plan, on the
submitting machine, did not check, and the paths and the hub as that node sees them. What an
earlier command in the same process checked does not count (plan calls `forget_checked`): a
file may have gone since.
"""

from __future__ import annotations

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

# config (by _key) -> the checks it passed in this process: "valid", "gpu", "hub"
_passed: dict[str, set[str]] = {}


def forget_checked() -> None:
    """A new command starts: check its configs anew, whatever earlier commands checked."""
    _passed.clear()


def _key(cfg: DictConfig) -> str | None:
    """The run's config hash over every group (Hydra's node and `resume` left out: neither is
    validated here); None when it does not resolve (then nothing is skipped, and validation says
    why)."""
    from kuda_cli.run import config_hash

    try:
        return config_hash(cfg, whole=True)
    except OmegaConfBaseException:
        return None


def _to_do(cfg: DictConfig, wanted: set[str]) -> tuple[set[str], set[str]]:
    """(the wanted checks this process has not run on `cfg`, where to record those it runs)."""
    key = _key(cfg)
    passed = _passed.setdefault(key, set()) if key is not None else set()
    return wanted - passed, passed


def validate_once(cfg: DictConfig) -> None:
    """`validate.validate(cfg)`, unless this process validated this config already."""
    from kuda_cli.validate import validate

    todo, passed = _to_do(cfg, {"valid"})
    if todo:
        validate(cfg)
        passed.add("valid")


def require_once(cfg: DictConfig, *, gpu: bool = True) -> None:
    """`requires.check(cfg)` for the requirements this process has not checked on this config;
    `gpu=False` leaves the GPU to the job (a SLURM launcher submits from a machine without one)."""
    from kuda_cli import requires

    todo, passed = _to_do(cfg, {"gpu", "hub"} if gpu else {"hub"})
    if todo:
        requires.check(cfg, gpu="gpu" in todo, hub="hub" in todo)
        passed.update(todo)
