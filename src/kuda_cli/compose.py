"""Composing kuda's config: the conf/ tree, the schemas and resolvers Hydra needs, Hydra's config
loader over them, and errors explained in one line.

Nothing registers on import: `register()` (called by `compose` and by the command's entry) puts
the structured-config schemas into Hydra's ConfigStore and the resolvers into OmegaConf, once.
Scripts compose a config with `compose(overrides)` and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from kuda_cli.config import SCHEMAS, STAGES
from kuda_cli.errors import ConfigError, UserError

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader

GROUPS = ("model", "data", "locate", "unlearn", "eval", "logger", "experiment")


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


def all_schemas() -> dict[tuple[str, str], type]:
    """(group in the ConfigStore, name) -> schema: config.SCHEMAS, the eval group's (built from
    the metrics' settings), and each plug-in's own (a method's as schema/unlearn/<name>, a data
    kind's as schema/data/<name>, a tracker's as schema/logger/<name>)."""
    from kuda_cli.data.kinds import kind_schemas
    from kuda_cli.evaluate import eval_schema
    from kuda_cli.trackers import tracker_schemas
    from kuda_cli.unlearn.methods import method_schemas

    found = {**SCHEMAS, ("schema/eval", "eval"): eval_schema()}
    found |= {("schema/unlearn", name): node for name, node in method_schemas().items()}
    found |= {("schema/data", name): node for name, node in kind_schemas().items()}
    found |= {("schema/logger", name): node for name, node in tracker_schemas().items()}
    return found


def register_schemas() -> None:
    """Every schema into Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for (group, name), node in all_schemas().items():
        cs.store(group=group, name=name, node=node)


def register() -> None:
    """Schemas into Hydra's ConfigStore and resolvers into OmegaConf. Cheap after the first call,
    and called before every composition, so a method registered since (a plugin) is known."""
    register_schemas()
    register_resolvers()


def explain_missing_option(err: Exception) -> str:
    text = str(err)
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if not match:
        return text.strip().splitlines()[0]
    group, option = match.groups()
    options = group_options(group) if (conf_dir() / group).is_dir() else []
    listed = ", ".join(options) if options else "see kuda --help"
    return f"{group}={option} is not an option of group '{group}'; choose one of: {listed}"


def explain_omegaconf(err: OmegaConfBaseException) -> str:
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
        return explain_missing_option(err)
    if isinstance(err, OverrideParseException):
        return f"cannot parse override: {str(err).strip().splitlines()[0]}"
    cause = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is not None:
        return explain_omegaconf(cause)
    text = str(err).strip().splitlines()
    if text and "Could not find" in text[0]:
        return explain_missing_option(err)
    return " ".join(line.strip() for line in text if line.strip())[:300] or type(err).__name__


@contextmanager
def _initialized() -> Iterator[None]:
    """Hydra initialized over conf/, as `@hydra.main` initializes it, for the block's length."""
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="kuda"):
        yield


@contextmanager
def config_loader() -> Iterator[ConfigLoader]:
    """Hydra's loader of the config tree: what a `glob(...)` sweep lists a group's options with."""
    from hydra.core.global_hydra import GlobalHydra

    with _initialized():
        yield GlobalHydra.instance().config_loader()


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose

    with _initialized():
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
