"""Override rewriting before composition: the model shortcut (`model=ORG/NAME`, `model=DIR`),
the evaluation that fits the data, a tuning choice file, and a sweep expanded into its jobs."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from omegaconf import DictConfig, OmegaConf

from kuda_cli.compose import conf_dir, config_loader, explain_composition_error, group_options
from kuda_cli.config import CARRIABLE
from kuda_cli.data.kinds import get_kind
from kuda_cli.errors import ConfigError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    outside = [str(k) for k in chosen if not str(k).startswith(CARRIABLE)]
    if outside:
        raise ConfigError(
            f"tune.choice={given[-1]} sets {outside[0]}; a choice sets "
            f"{' and '.join(CARRIABLE)}* settings only: remove it from the file, or pass it on "
            "the command line yourself"
        )
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


def search_dirs(overrides: list[str]) -> list[Path]:
    """kuda's conf/ and the `file://` directories a `hydra.searchpath=[...]` override adds
    (where a plug-in's options live)."""
    dirs = [conf_dir()]
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "hydra.searchpath":
            entries = [e.strip().strip("'\"") for e in value.strip("[]").split(",")]
            dirs += [Path(e.removeprefix("file://")) for e in entries if e.startswith("file://")]
    return dirs


def data_kind(option: str, dirs: list[Path] | None = None) -> str | None:
    """The kind of a data option: the schema its YAML starts from (/schema/data/<kind>)."""
    for directory in dirs or [conf_dir()]:
        path = directory / "data" / f"{option}.yaml"
        if path.is_file():
            for entry in yaml.safe_load(path.read_text()).get("defaults", []):
                if isinstance(entry, str) and entry.startswith("/schema/data/"):
                    return entry.removeprefix("/schema/data/").split("@")[0]
            return None
    return None


def fit_eval_to_data(overrides: list[str]) -> list[str]:
    """`data=X` without `eval=`: evaluate with what fits X (wmdp data -> eval=wmdp, ...)."""
    keys = {o.partition("=")[0].lstrip("+~") for o in overrides}
    if "eval" in keys:
        return overrides
    data = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "data"]
    if not data or "," in data[-1]:
        return overrides
    kind = data_kind(data[-1], search_dirs(overrides))
    fitting = get_kind(kind).eval_option if kind else None
    return [*overrides, f"eval={fitting}"] if fitting else overrides


def job_override_lists(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job Hydra will launch, in the order its basic sweeper launches
    them: one value a key (a repeated key keeps its first place and its last value), the
    cartesian product of the sweeps (`a,b`, `choice(...)`, `range(...)`, `glob(...)`), the last
    key varying fastest."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    values: dict[str, list[str]] = {}
    with config_loader() as loader:  # glob(...) lists the group's options
        try:
            for override in OverridesParser.create(loader).parse_overrides(overrides):
                key = override.get_key_element()
                values[key] = [f"{key}={value}" for value in _values(override)]
        except OverrideParseException as err:
            if "empty choice" in str(err.__cause__):  # Hydra refuses choice() while parsing
                raise ConfigError(f"{err.override} {_NO_VALUE['ChoiceSweep']}") from err
            raise ConfigError(explain_composition_error(err)) from err
        except HydraException as err:  # a parse error names the override and what is wrong
            raise ConfigError(explain_composition_error(err)) from err
    return [list(job) for job in itertools.product(*values.values())]


# an empty sweep, by kind: no job would run
_NO_VALUE = {
    "ChoiceSweep": "sweeps over no value; give choice() at least one value, e.g. choice(0,1)",
    "RangeSweep": "sweeps over no value; range(start,stop[,step]) needs stop beyond start in "
    "the step's direction, e.g. range(0,3) for 0,1,2",
    "Glob": "sweeps over no value; the glob matches none of the group's options "
    "(kuda --help lists them)",
}


def _values(override: Override) -> list[str]:
    """The values one override takes across a sweep, as override syntax."""
    from hydra.core.override_parser.types import ChoiceSweep, Sweep

    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    if not override.is_discrete_sweep():
        raise ConfigError(
            f"{override.input_line}: Hydra's basic sweeper enumerates lists, choice(), range() "
            "and glob(), not interval(); list the values to run"
        )
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep) and any(isinstance(v, Sweep) for v in sweep.list):
        raise ConfigError(
            f"{override.input_line}: a sweep cannot list another sweep (range() or glob() "
            "among the values); list every value, e.g. seed=0,1,5"
        )
    values = list(override.sweep_string_iterator())
    if not values:
        raise ConfigError(f"{override.input_line} {_NO_VALUE[type(sweep).__name__]}")
    return values


def sweeper_params(cfg: DictConfig) -> list[str]:
    """`hydra.sweeper.params` of a composed config (an experiment that sweeps), as overrides."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    return [f"{key}={value}" for key, value in params.items()]
