"""Each default is written once: in its schema (a method's, a data kind's, a group's). An option's
YAML in conf/ sets only what makes it a different option, never a schema default again, and the
option named after its schema (conf/unlearn/kuda.yaml for schema/unlearn/kuda) sets nothing: the
library without Hydra and `kuda unlearn` get the same KUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from kuda_cli.compose import all_schemas, conf_dir
from kuda_cli.config import STAGES
from kuda_cli.unlearn.methods import method_schemas


def _schema_of(option: dict) -> tuple[str, type] | None:
    """(the schema's path, its dataclass) named by the option's defaults list."""
    schemas = {f"/{group}/{name}": node for (group, name), node in all_schemas().items()}
    for entry in option.get("defaults") or []:
        if isinstance(entry, str) and entry.startswith("/schema"):
            path = entry.split("@")[0]
            return path, schemas[path]
    return None


def restated_defaults(option: dict, schema: DictConfig, prefix: str = "") -> list[str]:
    """The keys of `option` set to the value the schema already gives them."""
    found = []
    for key, value in option.items():
        if key in ("defaults", "hydra") or key not in schema or OmegaConf.is_missing(schema, key):
            continue
        default = schema[key]
        if isinstance(default, DictConfig) and isinstance(value, dict):
            found += restated_defaults(value, default, f"{prefix}{key}.")
            continue
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default)
        if default == value and type(default) is type(value):
            found.append(f"{prefix}{key}={value!r}")
    return found


def _options_with_schema() -> list[Path]:
    """The options that start from a schema (experiments and launchers are overrides only)."""
    return [
        path
        for path in sorted(conf_dir().rglob("*.yaml"))
        if _schema_of(yaml.safe_load(path.read_text()) or {}) is not None
    ]


def test_every_group_option_starts_from_a_schema():
    found = {p.parent.name for p in _options_with_schema()}
    assert {"model", "data", "locate", "unlearn", "eval", "logger"} <= found


@pytest.mark.parametrize(
    "path", _options_with_schema(), ids=lambda p: str(p.relative_to(conf_dir()))
)
def test_no_option_restates_a_default_of_its_schema(path: Path):
    option = yaml.safe_load(path.read_text()) or {}
    schema_path, schema = _schema_of(option)
    restated = restated_defaults(option, OmegaConf.structured(schema))
    assert not restated, f"{path.name} restates {schema_path}'s defaults: {restated}"
    if path.stem == schema_path.rsplit("/", 1)[-1]:  # the option that is the schema's own
        own = sorted(set(option) - {"defaults"})
        assert not own, f"{path.name} sets {own}: write them in {schema.__qualname__} instead"


def test_the_restated_default_check_finds_a_restated_default():
    schema = OmegaConf.structured(method_schemas()["kuda"])
    found = restated_defaults({"lr": float(schema.lr), "nullspace": {"tau": 1.0}}, schema)
    assert found == [f"lr={float(schema.lr)!r}"]


def test_each_method_schema_names_its_own_method():
    for name, schema in method_schemas().items():
        assert OmegaConf.structured(schema).method == name


def test_the_stage_list_is_written_once():
    from kuda_cli.stages import STAGE_FUNCTIONS

    assert list(STAGE_FUNCTIONS) == list(STAGES)
    source = (Path(__file__).parents[1] / "src" / "kuda_cli" / "stages" / "__init__.py").read_text()
    assert not any(f'"{stage}"' in source for stage in STAGES)
