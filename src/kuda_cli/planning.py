"""Planning a run before Hydra starts: every job's config composed and validated, the run (or
sweep) directory chosen, and what a re-run continues (an unfinished run resumes, a sweep skips
its completed jobs). Nothing here creates a directory: a refused command leaves no trace."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from kuda_cli import distributed
from kuda_cli.checks import forget_checked, require_once, validate_once
from kuda_cli.compose import compose, explain_omegaconf
from kuda_cli.config import STAGES
from kuda_cli.errors import ConfigError
from kuda_cli.overrides import job_override_lists, sweeper_params

# what Hydra writes in a job's directory before the run's meta.json (its record, the log)
HYDRA_STARTS = frozenset({".hydra", "kuda.log"})


@dataclass
class Sweep:
    """A multirun about to start: its directory and, per job, the run directory and config hash."""

    directory: Path
    job_dirs: list[Path]
    hashes: list[frozenset[str]]  # per job, what its meta.json's config_hash may be
    done_before: list[int] = field(default_factory=list)  # jobs completed before: skipped


@dataclass
class Plan:
    overrides: list[str]  # what Hydra gets, the run (or sweep) directory pinned
    sweep: Sweep | None = None
    jobs: list[list[str]] = field(default_factory=list)  # each job's overrides


def preflight(stage: str, overrides: list[str], multirun: bool) -> list[str]:
    """Validate every job's config; return the overrides to hand to Hydra, with the run (or
    sweep) directory pinned to a fresh directory."""
    return plan(stage, overrides, multirun).overrides


def plan(stage: str, overrides: list[str], multirun: bool, *, printing: bool = False) -> Plan:
    """`preflight`, plus what a sweep needs to skip its completed jobs and report at the end.
    `printing` (--cfg): the config is printed and nothing runs; requirements are not checked."""
    from kuda_cli.run import config_hashes

    if any(o.partition("=")[0].lstrip("+~") == "stage" for o in overrides):
        raise ConfigError(
            "stage is set by the command (kuda STAGE ...), not by stage=; pass the stage as the "
            f"first word: kuda {'|'.join(STAGES)} ..."
        )
    problem = distributed.environment_problem()
    if problem:
        raise ConfigError(problem)
    overrides = [*overrides, f"stage={stage}"]
    forget_checked()
    jobs = job_override_lists(overrides, multirun)
    params = sweeper_params(compose(jobs[0]))
    if params and not multirun and not printing:
        raise ConfigError(
            f"this config sweeps ({' '.join(params)}, hydra.sweeper.params); run it with -m"
        )
    if params and multirun:  # as Hydra's basic sweeper: the config's params, then the command line
        jobs = job_override_lists([*params, *overrides], multirun)
    cfgs = []
    for job in jobs:
        cfg = compose(job)
        try:
            validate_once(cfg)
        except OmegaConfBaseException as err:  # an interpolation that cannot resolve
            raise ConfigError(explain_omegaconf(err)) from err
        cfgs.append(cfg)
    first = cfgs[0]
    if not printing:
        launcher = str(OmegaConf.select(first, "hydra.launcher._target_", default="") or "")
        on_cluster = multirun and "Slurm" in launcher  # the GPU is checked in the job, there
        for cfg in cfgs:
            require_once(cfg, gpu=not on_cluster)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")), None)
    target = Path(chosen or OmegaConf.select(first, key))
    if distributed.active() and not printing:
        _check_distributed(stage, multirun, chosen, first)
    if multirun:
        hashes = [config_hashes(cfg) for cfg in cfgs]
        if chosen is None:
            unfinished = _unfinished_sweep(target.parent, cfgs, hashes)
            if unfinished is not None:
                target = unfinished
            else:
                target = _fresh(target)
            overrides.append(f"{key}={target}")
        sweep = Sweep(target, [_job_dir(cfg, target, i) for i, cfg in enumerate(cfgs)], hashes)
        sweep.done_before = _check_sweep_dir(sweep, pinned=chosen is not None)
        if chosen is None and target.exists():
            print(
                f"kuda: continuing the unfinished sweep {target} ({len(sweep.done_before)} of "
                f"{len(cfgs)} jobs completed)",
                file=sys.stderr,
            )
        return Plan(overrides, sweep, jobs)
    return Plan([*overrides, f"{key}={_run_dir(stage, first, target, chosen)}"])


def _run_dir(stage: str, cfg: DictConfig, target: Path, chosen: str | None) -> Path:
    """The directory of a single run: the one `resume=` names, an unfinished run of this config
    to continue, the pinned one once checked, or a fresh one. What it holds now is noted, so
    that a refused run removes only what this command made."""
    from kuda_cli.run import note_found

    resumable = stage == "unlearn"
    if resumable and cfg.get("resume"):
        if chosen is not None:
            raise ConfigError("resume=PATH is the run directory; drop hydra.run.dir")
        directory = _check_resume(Path(cfg.resume).expanduser(), cfg)
    elif chosen is not None:
        directory = _check_pinned(target, cfg)
    else:
        directory = _unfinished_run(target.parent, cfg) if resumable else None
        if directory is not None:
            print(f"kuda: resuming the unfinished run {directory}", file=sys.stderr)
        else:
            directory = _fresh(target)
            _check_writable(directory, f"the run directory {directory}")
    note_found(directory)
    return directory


def _check_pinned(directory: Path, cfg: DictConfig) -> Path:
    """A pinned `hydra.run.dir` is used when it is new, empty, or holds an unfinished kuda run
    of this very config (which then continues from its checkpoint, as with resume=). Anything
    else is refused before any work: the directory is someone else's, and stays as it is."""
    from kuda_cli.run import config_hashes, read_meta

    where = f"hydra.run.dir={directory}"
    _check_writable(directory, where)
    # under accelerate launch, another process's Hydra may have started the directory already
    started = HYDRA_STARTS if distributed.active() else frozenset()
    held = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    if not set(held) - started:
        return directory
    meta = read_meta(directory)
    if meta is None:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(
            f"{where} is not empty and holds no kuda run ({shown}); pass a new or empty "
            "directory (nothing was touched)"
        )
    if meta.get("status") == "completed":
        raise ConfigError(
            f"{where} already holds a completed run; choose another directory "
            "(nothing was overwritten)"
        )
    if meta.get("config_hash") not in config_hashes(cfg):
        raise ConfigError(
            f"{where} holds an unfinished run of another config; continue it with its own "
            f"command ({meta.get('command')}) or choose another directory (nothing was touched)"
        )
    if _has_checkpoint(directory):
        print(f"kuda: resuming the unfinished run {directory}", file=sys.stderr)
    return directory


def _check_writable(directory: Path, where: str) -> None:
    """A run directory that is a file, or under a directory this user cannot write, is refused
    before any work."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{where} is a file, not a directory; pass a directory")
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{where}: {existing} is a file, not a directory; pass a directory")
    try:  # a probe, not os.access: root passes os.access where /proc or a read-only mount fails
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(
            f"{where}: cannot write in {existing}; pass a directory you can write"
        ) from err


def _check_distributed(stage: str, multirun: bool, chosen: str | None, cfg: DictConfig) -> None:
    """Several processes (accelerate launch) train one kuda unlearn run together."""
    where = f"under accelerate launch ({distributed.world_size()} processes)"
    if stage != "unlearn" or multirun:
        raise ConfigError(
            f"{where} one kuda unlearn run trains; run kuda {stage}"
            + (" -m" if multirun else "")
            + " as a single process (sweeps of multi-GPU jobs: docs/scale.md)"
        )
    if chosen is None:
        raise ConfigError(f"{where} pass hydra.run.dir=DIR, the one run directory of every process")
    if cfg.locate.method == "causal_tracing" and not cfg.locate.get("from_run"):
        raise ConfigError(
            f"{where} the layers must be known: trace first (kuda trace) and pass "
            "locate.from_run=DIR, or locate=fixed locate.layers=[...]"
        )
    if cfg.unlearn.batch_size % distributed.world_size():
        raise ConfigError(
            f"unlearn.batch_size={cfg.unlearn.batch_size} must be a multiple of the "
            f"{distributed.world_size()} processes (each takes an equal share of every batch)"
        )
    if cfg.unlearn.get("originals") == "disk":
        raise ConfigError(f"{where} unlearn.originals=disk is not supported; use memory")


def _job_dir(cfg: DictConfig, sweep_dir: Path, num: int) -> Path:
    """Where Hydra puts job `num` of a sweep: sweep_dir / hydra.sweep.subdir."""
    job = OmegaConf.masked_copy(cfg, ["hydra"])
    try:
        with open_dict(job):
            job.hydra.job.num = num
            job.hydra.job.id = num
            job.hydra.sweep.dir = str(sweep_dir)
        subdir = str(OmegaConf.select(job, "hydra.sweep.subdir", throw_on_resolution_failure=True))
    except OmegaConfBaseException:
        subdir = str(num)
    return sweep_dir / subdir


def _check_sweep_dir(sweep: Sweep, pinned: bool) -> list[int]:
    """The jobs already completed with their config (to skip). A job directory holding a run of
    another config is refused: nothing is overwritten."""
    from kuda_cli.run import read_meta

    where = "hydra.sweep.dir=" + str(sweep.directory) if pinned else str(sweep.directory)
    _check_writable(sweep.directory, where)
    done = []
    for num, (directory, wanted) in enumerate(zip(sweep.job_dirs, sweep.hashes, strict=True)):
        meta = read_meta(directory)
        if meta is None:
            _check_job_dir_unused(directory, num, where)
            continue
        if meta.get("config_hash") not in wanted:
            raise ConfigError(
                f"{where}: job {num}'s directory {directory} holds a run of another config; "
                "choose another hydra.sweep.dir (nothing was overwritten)"
            )
        if meta.get("status") == "completed":
            done.append(num)
    return done


def _unfinished_sweep(
    parent: Path, cfgs: list[DictConfig], hashes: list[frozenset[str]]
) -> Path | None:
    """The newest sweep under `parent` with these jobs that has not completed every one:
    re-running a sweep's command continues it (completed jobs are skipped)."""
    from kuda_cli.run import read_meta

    if not parent.is_dir():
        return None
    candidates = []
    for directory in parent.iterdir():
        if not directory.is_dir():
            continue
        metas = [read_meta(_job_dir(cfg, directory, i)) for i, cfg in enumerate(cfgs)]
        if all(m is None for m in metas):
            continue
        if any(
            m is not None and m.get("config_hash") not in h
            for m, h in zip(metas, hashes, strict=True)
        ):
            continue
        if all(m is not None and m.get("status") == "completed" for m in metas):
            continue
        candidates.append((directory.stat().st_mtime, directory.name, directory))
    return max(candidates)[2] if candidates else None


def _check_job_dir_unused(directory: Path, num: int, where: str) -> None:
    """A job's directory without a kuda run holds at most what Hydra and the job's log start
    with (a job that stopped before its run began): anything else is not kuda's."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{where}: job {num}'s directory {directory} is a file; choose another")
    held = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    foreign = [name for name in held if name not in HYDRA_STARTS]
    if foreign:
        raise ConfigError(
            f"{where}: job {num}'s directory {directory} holds files that are not a kuda run "
            f"({', '.join(foreign[:3])}); choose another hydra.sweep.dir (nothing was touched)"
        )


def sweep_summary(sweep: Sweep) -> tuple[int, str]:
    """(exit status, one line) after a sweep: 1 when a job failed or did not run."""
    from kuda_cli.run import read_meta

    metas = [read_meta(d) for d in sweep.job_dirs]
    statuses = [m.get("status") if m else "not run" for m in metas]
    completed = statuses.count("completed")
    skipped = sum(1 for i in sweep.done_before if statuses[i] == "completed")
    bad = [
        (i, s, (metas[i] or {}).get("error")) for i, s in enumerate(statuses) if s != "completed"
    ]
    line = f"kuda: sweep {sweep.directory}: {len(statuses)} jobs, {completed} completed"
    if skipped:
        line += f" ({skipped} skipped: completed before)"
    if not bad:
        return 0, line
    shown = "; ".join(
        f"job {i} {status}" + (f": {str(error).splitlines()[0][:120]}" if error else "")
        for i, status, error in bad[:3]
    )
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    return 1, f"{line}, {len(bad)} not completed ({shown}{more}); see each job's meta.json"


def _has_checkpoint(directory: Path) -> bool:
    from kuda_cli.unlearn.checkpoint_files import any_checkpoint

    return any_checkpoint(directory)


def _check_resume(directory: Path, cfg: DictConfig) -> Path:
    """The run directory `resume=` names, checked to hold an unfinished run of this config."""
    from kuda_cli.run import config_hashes, read_meta

    meta = read_meta(directory)
    if meta is None or meta.get("stage") != "unlearn":
        raise ConfigError(
            f"resume={directory} is not a kuda unlearn run directory (no meta.json); pass the "
            "directory of an unfinished kuda unlearn run"
        )
    if meta.get("status") == "completed":
        raise ConfigError(f"resume={directory} already completed; nothing to resume")
    if not _has_checkpoint(directory):
        raise ConfigError(
            f"resume={directory} holds no checkpoint to continue from; start the run anew "
            "(unlearn.save_every=N writes one every N steps)"
        )
    if meta.get("config_hash") not in config_hashes(cfg):
        raise ConfigError(
            f"resume={directory} was run with another config; resume it with its own command: "
            f"{meta.get('command')}"
        )
    return directory


def _unfinished_run(parent: Path, cfg: DictConfig) -> Path | None:
    """The newest run under `parent` with this config that stopped before completing and left a
    checkpoint: re-running a command continues it."""
    from kuda_cli.run import config_hashes, read_meta

    if not parent.is_dir():
        return None
    wanted = config_hashes(cfg)
    candidates = []
    for directory in parent.iterdir():
        meta = read_meta(directory) if directory.is_dir() else None
        if (
            meta
            and meta.get("status") != "completed"
            and meta.get("config_hash") in wanted
            and _has_checkpoint(directory)
        ):
            candidates.append((meta.get("start_time") or "", directory))
    return max(candidates)[1] if candidates else None


def _fresh(directory: Path) -> Path:
    """`directory`, or `directory-2`, `-3`, ... when a run started in the same second."""
    candidate, n = directory, 1
    while candidate.exists():
        n += 1
        candidate = directory.with_name(f"{directory.name}-{n}")
    return candidate
