"""What kuda borrows from Hydra's private modules (`hydra._internal`), in one place.

Hydra has no public way to parse its command line, and kuda must read that command line before
Hydra does (to plan and validate every job first):

- `args_parser()`: the argparse parser `@hydra.main` parses `sys.argv` with
  (`hydra._internal.utils.get_args_parser`). kuda reads its flags (-m, --cfg, --info, -sc,
  --help, --hydra-help) with it, so kuda and Hydra agree on every flag and on what is an
  override without a second copy of Hydra's flag list.

Everything else kuda does before Hydra uses Hydra's public API; a sweep is expanded into its jobs
by `kuda_cli.overrides.job_override_lists` in the order of Hydra's basic sweeper.
tests/test_hydra_private.py names the Hydra versions this was checked on, checks the borrowed
parser is still the one `@hydra.main` uses, and checks that sweep order against Hydra's own
sweeper: on a Hydra upgrade, run it first.
"""

from __future__ import annotations

import argparse


def args_parser() -> argparse.ArgumentParser:
    """Hydra's command-line parser: overrides (positional), --multirun, --cfg, --info, ..."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()
