"""Hydra's private API that kuda relies on (kuda_cli.hydra_private) and the basic sweeper's job
order that kuda_cli.overrides copies through the public override API: both are checked here
against the installed Hydra, and the installed version against those they were checked on."""

from __future__ import annotations

import importlib

import hydra
import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from kuda_cli.compose import config_loader
from kuda_cli.hydra_private import args_parser
from kuda_cli.overrides import job_override_lists

# the Hydra versions on which the tests below passed and the points named in RECHECK were read
CHECKED_ON = ("1.3.8",)
RECHECK = (
    "re-check: (1) hydra._internal.utils.get_args_parser (kuda_cli.hydra_private.args_parser) "
    "still exists and hydra.main still parses sys.argv with it; (2) hydra._internal.core_plugins."
    "basic_sweeper.BasicSweeper.split_arguments still orders a sweep's jobs as kuda_cli.overrides."
    "job_override_lists does; (3) the other tests in tests/test_hydra_private.py pass. Then add "
    "the version to CHECKED_ON there"
)


def test_installed_hydra_is_a_version_the_private_calls_were_checked_on():
    assert hydra.__version__ in CHECKED_ON, (
        f"Hydra {hydra.__version__} is not among the versions kuda's use of Hydra's private API "
        f"was checked on ({', '.join(CHECKED_ON)}); {RECHECK}"
    )


def test_the_borrowed_parser_is_the_one_hydra_main_parses_with():
    hydra_main = importlib.import_module("hydra.main")
    borrowed = importlib.import_module("hydra._internal.utils").get_args_parser
    assert hydra_main.get_args_parser is borrowed, RECHECK


def test_the_borrowed_parser_reads_kudas_flags_between_overrides():
    argv = ["a=1", "-m", "b=2,3", "--cfg", "job", "c=x y", "--info"]
    args, unknown = args_parser().parse_known_intermixed_args(argv)
    assert unknown == []
    assert args.overrides == ["a=1", "b=2,3", "c=x y"]
    assert (args.multirun, args.cfg, args.info) == (True, "job", "all")
    args, _ = args_parser().parse_known_intermixed_args(["--help", "-sc", "--hydra-help"])
    assert args.help and args.shell_completion and args.hydra_help
    assert args_parser().parse_known_intermixed_args(["--bogus"])[1] == ["--bogus"]


SWEEPS = [
    ["seed=range(1,4)", "model=tiny-random,smollm2-135m"],
    ["unlearn.lr=range(0.1,0.3,0.1)", "seed=choice(3,1,2)"],
    ["unlearn=glob(*)", "seed=1,2"],
    ["unlearn=glob([r*,k*],exclude=rmu_zephyr)", "hydra/launcher=glob(*)"],
    ["name='a,b'", 'name="x y",z', "unlearn.layers=[1,2],[3]"],
    ["seed=1,2", "unlearn.lr=1e-3", "seed=5,6", "+foo=1,2", "~bar"],
]


@pytest.mark.parametrize("overrides", SWEEPS)
def test_sweep_jobs_are_those_of_hydras_basic_sweeper_in_its_order(overrides):
    with config_loader() as loader:
        parsed = OverridesParser.create(loader).parse_overrides(overrides)
        (hydras,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    assert len(hydras) > 1
    assert job_override_lists(overrides, multirun=True) == hydras, RECHECK
