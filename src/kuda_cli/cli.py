"""`kuda STAGE [overrides] [-m]`: compose and validate the config, then hand over to Hydra.

Before Hydra creates anything, the command composes the config of every job it is about to run
(each combination of a multirun sweep) and validates it, so a bad key, option, type or value ends
with one line on stderr, exit status 2, and no run directory. The run directory is resolved here
(`kuda_cli.planning`) and passed to Hydra explicitly: the directory that was checked is the one
that is written. A job checks only what planning did not check in its process
(`kuda_cli.checks`): on a SLURM node, everything, the GPU included.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kuda_cli.compose import GROUPS, conf_dir, default_options, group_options, register
from kuda_cli.config import STAGES
from kuda_cli.errors import Terminated, UserError
from kuda_cli.hydra_private import args_parser
from kuda_cli.overrides import apply_choice, fit_eval_to_data, rewrite_model_shortcut
from kuda_cli.planning import plan, sweep_summary

log = logging.getLogger("kuda")


# ----------------------------------------------------------------------------- help
def help_text() -> str:
    defaults = default_options()
    lines = [
        "usage: kuda STAGE [key=value ...] [-m] [--cfg job|hydra|all] [--info] [--help]",
        "",
        "kuda: knowledge unlearning experiments. KUDA (causal tracing + representation",
        "deviation + relaxed null-space projection) and the baselines GA, GradDiff, NPO, SimNPO,",
        "RMU, adaptive RMU, UNDIAL, IdkDPO, Task Vector, WHP and ELM, evaluated on a built-in",
        "knowledge benchmark, WMDP/MMLU (lm-eval), MUSE and TOFU.",
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
        "             unlearn.save_every=N unlearn.keep=1 unlearn.save_optimizer=true",
        "             unlearn.lora.enabled=true (GA/GradDiff/NPO/SimNPO: LoRA adapters)",
        "             locate.max_tokens=256 (tracing: probe length cap)",
        "             unlearn.tokens=auto|last|subject|all unlearn.target=away|unknown (KUDA)",
        "             unlearn.auto_tune.enabled=true (lr chosen by trials; facts: tune/)",
        "             unlearn.nullspace.key_source=retain|general|retain+general (KUDA)",
        "             logger=tensorboard|wandb|mlflow|csv (docs/trackers.md)",
        "             eval.attacks=[relearn,quant4,logit_lens,...] (docs/robustness.md)",
        "",
        "plug-ins: a method, a metric or a kind of data is one module + one YAML (in kuda, or an",
        "  entry point kuda_cli.methods|metrics|data_kinds with hydra.searchpath=[file:///DIR]);",
        "  docs/plugins.md",
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
        "  kuda report report.runs=[DIR] report.robustness=true + forget removed under attack",
        "  kuda unlearn 'data.forget_domains=[capitals]' 'data.retain_domains=[chemistry]'",
        "  make table-facts                            every method on the embedded model",
        "  make table-domains                          each shipped domain forgotten in turn",
        "  make frontier DOMAINS=chemistry,capitals    GA/NPO/RMU/KUDA lr sweeps: curves",
        "  make table-robustness DOMAINS=chemistry     every attack on GA/NPO/RMU/KUDA",
        "  make table-wmdp DRY=1                       the commands of a paper table",
        "  accelerate launch --config_file scripts/accelerate/fsdp2.yaml -m kuda_cli.cli unlearn",
        "    unlearn=ga 'unlearn.trainable=[all]' hydra.run.dir=DIR  FSDP2-sharded (docs/scale.md)",
        "",
        "Each run writes outputs/STAGE/DATE_TIME[_NAME]/: config.yaml, meta.json, metrics.json,",
        "kuda.log. Bad input: one line on stderr, exit status 2, no run directory. A sweep run",
        "again continues: completed jobs are skipped; it exits 1 when a job failed. A pinned",
        "hydra.run.dir must be new, empty, or an unfinished run of the same config (it resumes).",
        "SIGTERM marks the run failed with its end time and exits 143.",
        "",
        "Guides by task (getting started, each method, each metric, attacks, reports, paper",
        "tables, scale, plug-ins): docs/index.md; every config key: docs/config.md.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the job


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    from kuda_cli.checks import require_once, validate_once
    from kuda_cli.run import Run, completed_with
    from kuda_cli.stages import STAGE_FUNCTIONS

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
        # what planning checked in this process is not checked again; a job on a SLURM node,
        # a process of its own, checks everything there, the GPU included
        validate_once(cfg)
        require_once(cfg)
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
TERMINATED_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended


@contextmanager
def sigterm_stops_the_run() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the job, which marks the run failed with its end time and
    the reason (as an interrupt does), instead of leaving meta.json at `running`. A second
    SIGTERM ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("SIGTERM (a scheduler's time limit, timeout or kill)")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    register()
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
    # intermixed: flags may come between overrides (`kuda unlearn a=1 -m b=2,3`), as in Hydra's
    # examples; plain parse_known_args would take `b=2,3` for an unknown flag
    args, unknown = args_parser().parse_known_intermixed_args(rest)
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
    register()  # (composing the plan registered already, unless Hydra's own --help is asked)
    try:
        with sigterm_stops_the_run():
            hydra_entry()
    except Terminated as stop:
        print(
            f"kuda: stopped by {stop}; meta.json records it as failed (kuda unlearn: the same "
            "command continues from the last checkpoint)",
            file=sys.stderr,
        )
        return TERMINATED_STATUS
    if sweep is None or args.cfg:
        return 0
    status, line = sweep_summary(sweep)
    print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
