"""`kuda STAGE [overrides] [-m]`: compose and validate the config, then hand over to Hydra.

Before Hydra creates anything, the command composes the config of every job it is about to run
(each combination of a multirun sweep) and validates it, so a bad key, option, type or value ends
with one line on stderr, exit status 2, and no run directory. The run directory is resolved here
and passed to Hydra explicitly: the directory that was checked is the one that is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from kuda_cli import distributed
from kuda_cli.config import STAGES, register_schemas
from kuda_cli.errors import ConfigError, UserError

log = logging.getLogger("kuda")
GROUPS = ("model", "data", "locate", "unlearn", "eval", "experiment")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def conf_dir() -> Path:
    """conf/ inside an installed wheel, else the source checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"kuda's config tree (conf/config.yaml) is missing next to {here}")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def default_options() -> dict[str, str | None]:
    defaults = yaml.safe_load((conf_dir() / "config.yaml").read_text())["defaults"]
    return {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}


def _suffix(name: str | None) -> str:
    return f"_{name}" if name else ""


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("kuda_suffix", _suffix, replace=True)
    OmegaConf.register_new_resolver(
        "kuda_stage_help", lambda stage: STAGES.get(stage, ""), replace=True
    )


register_schemas()
register_resolvers()


# ----------------------------------------------------------------------------- help
def help_text() -> str:
    defaults = default_options()
    lines = [
        "usage: kuda STAGE [key=value ...] [-m] [--cfg job|hydra|all] [--info] [--help]",
        "",
        "kuda: knowledge unlearning experiments. KUDA (causal tracing + representation",
        "deviation + relaxed null-space projection) and the baselines GA, GradDiff, NPO, SimNPO",
        "and RMU, evaluated on a built-in knowledge benchmark, WMDP/MMLU (lm-eval) and MUSE.",
        "",
        "stages:",
        *[f"  {stage:<9} {what}" for stage, what in STAGES.items()],
        "",
        "config groups (group=option; * marks the default):",
    ]
    for group in GROUPS:
        options = [f"{o}*" if o == defaults.get(group) else o for o in group_options(group)]
        lines.append(f"  {group:<11} {' '.join(options)}")
    lines += [
        "  (model=ORG/NAME loads any hub causal LM, model=DIR a local save_pretrained directory)",
        "",
        "common keys: seed=0 name=NAME cache_dir=DIR (or $KUDA_CACHE) model.device=auto|cpu|cuda",
        "             model.dtype=auto|float32|bfloat16|float16 model.path=DIR",
        "             resume=DIR (kuda unlearn: continue an unfinished run from its checkpoint)",
        "             requires=[gpu,hub] (checked before anything loads; experiment=table_*)",
        "",
        "Hydra flags: -m/--multirun (sweep: key=a,b), --cfg job|hydra|all (print the composed",
        "  config), --info, --hydra-help, hydra.run.dir=DIR, -sc install=bash (tab completion).",
        "  `kuda STAGE --help` shows that stage's composed config.",
        "",
        "examples:",
        "  kuda trace                                  causal tracing: heatmaps and layers.json",
        "  kuda eval                                   facts + perplexity, embedded SmolLM2-135M",
        "  kuda eval model=tiny-random eval.perplexity.max_texts=8",
        "  kuda unlearn model=zephyr-7b data=wmdp_bio  (eval follows the data: eval=wmdp)",
        "  kuda eval -m seed=1,2                       two runs, one directory each",
        "  kuda unlearn --cfg job                      print the composed config, run nothing",
        "  kuda unlearn -m experiment=tune_stage1      tuning sweep (tau x lr), then:",
        "  kuda pick tune.runs=[SWEEP_DIR]             its choice.yaml -> tune.choice=FILE",
        "  kuda unlearn -m hydra/launcher=slurm ...    a sweep as SLURM jobs (docs/scale.md)",
        "  kuda unlearn -m unlearn=ga,npo,rmu,kuda     methods side by side (one trainer)",
        "  kuda report report.runs=[SWEEP_DIR]         table: starting model first, a row a run",
        "  kuda report report.runs=[DIR] report.frontier=true   + trade-off curves (PNG)",
        "  kuda unlearn 'data.forget_domains=[capitals]' 'data.retain_domains=[chemistry]'",
        "  make table-facts                            every method on the embedded model",
        "  make table-domains                          each shipped domain forgotten in turn",
        "  make frontier DOMAINS=chemistry,capitals    GA/NPO/RMU/KUDA lr sweeps: curves",
        "  make table-wmdp DRY=1                       the commands of a paper table",
        "",
        "Each run writes outputs/STAGE/DATE_TIME[_NAME]/: config.yaml, meta.json, metrics.json,",
        "kuda.log. Bad input: one line on stderr, exit status 2, no run directory. A sweep run",
        "again continues: completed jobs are skipped; it exits 1 when a job failed.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pre-flight
def _override_value(value) -> str:
    """A value of a choice file as Hydra override syntax."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return json.dumps(value)


def apply_choice(overrides: list[str]) -> list[str]:
    """`tune.choice=FILE` (a choice.yaml written by kuda pick): its settings become overrides,
    after the config's own and before nothing the command line sets itself (that wins)."""
    given = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "tune.choice"]
    if not given or not given[-1] or given[-1] == "null":
        return overrides
    path = Path(given[-1]).expanduser()
    try:
        chosen = (yaml.safe_load(path.read_text()) or {}).get("overrides")
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise ConfigError(
            f"tune.choice={given[-1]} cannot be read ({type(err).__name__}); pass the "
            "choice.yaml a kuda pick run wrote"
        ) from err
    if not isinstance(chosen, dict) or not chosen:
        raise ConfigError(f"tune.choice={given[-1]} holds no overrides; is it a kuda pick choice?")
    keys = {o.partition("=")[0].lstrip("+~") for o in overrides}
    return [*overrides, *(f"{k}={_override_value(v)}" for k, v in chosen.items() if k not in keys)]


def rewrite_model_shortcut(overrides: list[str]) -> list[str]:
    """Shortcuts: `model=ORG/NAME` -> `model=hub model.id=ORG/NAME`;
    `model=DIR` -> `model=local model.path=DIR`."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key != "model" or not sep or value in group_options("model"):
            out.append(item)
        elif Path(value).expanduser().is_dir():
            out += ["model=local", f"model.path={Path(value).expanduser().resolve()}"]
        elif HUB_ID.match(value):
            out += ["model=hub", f"model.id={value}"]
        else:
            raise ConfigError(
                f"model={value} is not a model option, a local directory or a hub id (ORG/NAME); "
                f"options: {', '.join(group_options('model'))}"
            )
    return out


EVAL_FOR_DATA_KIND = {"facts": "facts", "corpus": "wmdp", "muse": "muse"}


def data_kind(option: str) -> str | None:
    """The kind of a data option (facts, corpus, muse): the schema its YAML starts from."""
    path = conf_dir() / "data" / f"{option}.yaml"
    if not path.is_file():
        return None
    for entry in yaml.safe_load(path.read_text()).get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/schema/data/"):
            return entry.removeprefix("/schema/data/").split("@")[0]
    return None


def fit_eval_to_data(overrides: list[str]) -> list[str]:
    """`data=X` without `eval=`: evaluate with what fits X (wmdp data -> eval=wmdp, ...)."""
    keys = {o.partition("=")[0].lstrip("+~") for o in overrides}
    if "eval" in keys:
        return overrides
    data = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "data"]
    if not data or "," in data[-1]:
        return overrides
    fitting = EVAL_FOR_DATA_KIND.get(data_kind(data[-1]) or "")
    return [*overrides, f"eval={fitting}"] if fitting else overrides


def _explain_missing_option(err: Exception) -> str:
    text = str(err)
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if not match:
        return text.strip().splitlines()[0]
    group, option = match.groups()
    options = group_options(group) if (conf_dir() / group).is_dir() else []
    listed = ", ".join(options) if options else "see kuda --help"
    return f"{group}={option} is not an option of group '{group}'; choose one of: {listed}"


def _explain_omegaconf(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        object_type = getattr(err, "object_type", None)
        allowed = ""
        if object_type is not None and hasattr(object_type, "__dataclass_fields__"):
            allowed = "; allowed keys here: " + ", ".join(object_type.__dataclass_fields__)
        return f"unknown key {key}{allowed}"
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    value = getattr(err, "value", None)
    shown = f"={value!r}" if value is not None else ""
    takes = next((what for pattern, what in TAKES if pattern in msg), None)
    return f"{key}{shown} is invalid: {msg}" + (f"; {key} takes {takes}" if takes else "")


# what a typed field takes, by the OmegaConf message that refused a value
TAKES = (
    ("converted to Integer", "an integer"),
    ("converted to Float", "a number"),
    ("not a valid bool", "true or false"),
    ("is not a ListConfig", "a list, e.g. [a,b]"),
)


def explain_composition_error(err: Exception) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException):
        return _explain_missing_option(err)
    if isinstance(err, OverrideParseException):
        return f"cannot parse override: {str(err).strip().splitlines()[0]}"
    cause = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is not None:
        return _explain_omegaconf(cause)
    text = str(err).strip().splitlines()
    if text and "Could not find" in text[0]:
        return _explain_missing_option(err)
    return " ".join(line.strip() for line in text if line.strip())[:300] or type(err).__name__


def job_override_lists(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job Hydra will launch (sweeps expanded like the basic
    sweeper does)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [job for batch in batches for job in batch]


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="kuda"):
        try:
            return hydra_compose("config", overrides=overrides, return_hydra_config=True)
        except UserError:
            raise
        except (AssertionError, TypeError) as err:  # OmegaConf, e.g. a key under a null node
            shown = " ".join(o for o in overrides if not o.startswith("stage="))
            raise ConfigError(
                f"cannot apply the overrides {shown!r} ({err}); is a parent "
                "key null for this option? kuda STAGE --cfg job shows the "
                "config"
            ) from err
        except Exception as err:  # Hydra wraps OmegaConf errors in several exception types
            raise ConfigError(explain_composition_error(err)) from err


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


def sweeper_params(cfg: DictConfig) -> list[str]:
    """`hydra.sweeper.params` of a composed config (an experiment that sweeps), as overrides."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    return [f"{key}={value}" for key, value in params.items()]


def plan(stage: str, overrides: list[str], multirun: bool, *, printing: bool = False) -> Plan:
    """`preflight`, plus what a sweep needs to skip its completed jobs and report at the end.
    `printing` (--cfg): the config is printed and nothing runs; requirements are not checked."""
    from kuda_cli import requirements
    from kuda_cli.run import config_hashes
    from kuda_cli.validate import validate

    if any(o.partition("=")[0].lstrip("+~") == "stage" for o in overrides):
        raise ConfigError(
            "stage is set by the command (kuda STAGE ...), not by stage=; pass the stage as the "
            f"first word: kuda {'|'.join(STAGES)} ..."
        )
    overrides = [*overrides, f"stage={stage}"]
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
            validate(cfg)
        except OmegaConfBaseException as err:  # an interpolation that cannot resolve
            raise ConfigError(_explain_omegaconf(err)) from err
        cfgs.append(cfg)
    first = cfgs[0]
    if not printing:
        launcher = str(OmegaConf.select(first, "hydra.launcher._target_", default="") or "")
        on_cluster = multirun and "Slurm" in launcher  # the GPU is checked in the job
        for cfg in cfgs:
            requirements.check(cfg, gpu=not on_cluster)
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
    resumable = stage == "unlearn"
    if resumable and first.get("resume"):
        if chosen is not None:
            raise ConfigError("resume=PATH is the run directory; drop hydra.run.dir")
        resumed = _check_resume(Path(first.resume).expanduser(), first)
        return Plan([*overrides, f"{key}={resumed}"])
    unfinished = _unfinished_run(target.parent, first) if resumable and chosen is None else None
    if unfinished is not None:
        print(f"kuda: resuming the unfinished run {unfinished}", file=sys.stderr)
        overrides.append(f"{key}={unfinished}")
    elif chosen is None:
        target = _fresh(target)
        overrides.append(f"{key}={target}")
    elif _holds_completed_run(target):
        raise ConfigError(
            f"{key}={target} already holds a completed run; choose another directory "
            "(nothing was overwritten)"
        )
    return Plan(overrides)


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

    done = []
    for num, (directory, wanted) in enumerate(zip(sweep.job_dirs, sweep.hashes, strict=True)):
        meta = read_meta(directory)
        if meta is None:
            continue
        if meta.get("config_hash") not in wanted:
            where = "hydra.sweep.dir=" + str(sweep.directory) if pinned else str(sweep.directory)
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
    return any(
        (directory / d / "trainer_state.pt").exists() for d in ("checkpoint", "checkpoint.old")
    )


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


def _holds_completed_run(directory: Path) -> bool:
    from kuda_cli.run import read_meta

    meta = read_meta(directory)
    return bool(meta and meta.get("status") == "completed")


def _fresh(directory: Path) -> Path:
    """`directory`, or `directory-2`, `-3`, ... when a run started in the same second."""
    candidate, n = directory, 1
    while candidate.exists():
        n += 1
        candidate = directory.with_name(f"{directory.name}-{n}")
    return candidate


# ----------------------------------------------------------------------------- the job


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    from kuda_cli import requirements
    from kuda_cli.run import Run, completed_with
    from kuda_cli.stages import STAGE_FUNCTIONS
    from kuda_cli.validate import validate

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and completed_with(out_dir, cfg):
        # a sweep run again (after an interruption, a timeout, a failed job) recomputes nothing
        num = hydra_cfg.job.num
        log.info("kuda: skipping job %s: already completed in %s", num, out_dir)
        return
    run = Run(out_dir, cfg)
    try:
        validate(cfg)
        requirements.check(cfg)  # on a cluster node this is where the GPU is checked
        run = Run.start(out_dir, cfg, list(hydra_cfg.overrides.task))
        log.info("kuda %s: run directory %s", cfg.stage, out_dir)
        STAGE_FUNCTIONS[cfg.stage](cfg, run)
    except UserError as err:
        if multirun:  # keep the job's directory so the sweep's report lists it as failed
            log.error("%s", err)  # the sweep's summary line counts it; the log says which
            if run.meta:
                run.finish("failed", error=str(err))
            return  # one bad job does not stop the rest of a sweep
        if not run.discard() and run.meta:
            run.finish("failed", error=str(err))
        print(f"kuda: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if run.meta:
            run.finish("failed", error=f"{type(err).__name__}: {err}")
        if multirun:  # a bug in one job: recorded, and the sweep goes on; main() reports it
            log.exception("kuda %s: job %s failed", cfg.stage, hydra_cfg.job.num)
            return
        raise
    except BaseException as err:  # an interrupt stops the sweep too
        if run.meta:
            run.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    run.finish("completed")
    log.info("kuda %s: completed, results in %s", cfg.stage, out_dir)


# ----------------------------------------------------------------------------- entry point
def _complete(argv: list[str]) -> int:
    """Bash completion: complete the stage, then let Hydra complete the overrides after it.
    `-sc install=bash` and `uninstall` go to Hydra unchanged."""
    if "query" in " ".join(argv[1:]):
        line = os.environ.get("COMP_LINE", "")
        words = line.split()
        if len(words) <= 1 or (len(words) == 2 and not line.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(s for s in STAGES if s.startswith(prefix)))
            return 0
        if words[1] in STAGES:
            os.environ["COMP_LINE"] = line.replace(words[1], "", 1)
    sys.argv = ["kuda", *argv]
    hydra_entry()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(help_text(), file=sys.stderr)
        print("\nkuda: missing STAGE; choose one of: " + ", ".join(STAGES), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if argv[0] == "--version":
        from kuda_cli import __version__

        print(f"kuda {__version__}")
        return 0
    if argv[0] in ("-sc", "--shell-completion"):
        return _complete(argv)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(
            f"kuda: unknown stage {stage!r}; choose one of: {', '.join(STAGES)} "
            "(kuda --help lists them)",
            file=sys.stderr,
        )
        return 2
    from hydra._internal.utils import get_args_parser

    # intermixed: flags may come between overrides (`kuda unlearn a=1 -m b=2,3`), as in Hydra's
    # examples; plain parse_known_args would take `b=2,3` for an unknown flag
    args, unknown = get_args_parser().parse_known_intermixed_args(rest)
    if unknown:
        print(f"kuda: unknown flag {unknown[0]}; see kuda --help", file=sys.stderr)
        return 2
    sweep = None
    try:
        overrides = fit_eval_to_data(rewrite_model_shortcut(list(args.overrides)))
        overrides = apply_choice(overrides)
        if args.help or args.hydra_help or args.info or args.shell_completion:
            overrides.append(f"stage={stage}")
        else:
            planned = plan(stage, overrides, args.multirun, printing=bool(args.cfg))
            overrides, sweep = planned.overrides, planned.sweep
    except UserError as err:
        print(f"kuda: {err}", file=sys.stderr)
        return 2
    flags = [a for a in rest if a not in args.overrides]
    if args.multirun and args.cfg:  # Hydra prints no sweep's config: show its first job's
        print(f"kuda: the config of job 0 of {len(planned.jobs)}", file=sys.stderr)
        overrides = planned.jobs[0]
        flags = [f for f in flags if f not in ("-m", "--multirun")]
    # overrides first: a flag with an optional value (--info) must not swallow one
    sys.argv = ["kuda", *overrides, *flags]
    hydra_entry()
    if sweep is None or args.cfg:
        return 0
    status, line = sweep_summary(sweep)
    print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
