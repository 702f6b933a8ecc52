"""Config validation: value constraints from the schemas' field metadata, plus checks that span
several groups (layer indices against the model's depth). Raises `ConfigError` with one line that
names the key, the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kuda_cli import distributed
from kuda_cli.config import ALL_COLUMNS, CARRIABLE
from kuda_cli.data.kinds import kind_of
from kuda_cli.data.texts import refuse_blank_file
from kuda_cli.errors import ConfigError
from kuda_cli.locate.layers import LAYERS_FILE, TRACE_DIR
from kuda_cli.models.adapter import TRAINABLE_KINDS
from kuda_cli.trackers import check_logger


def validate(cfg: DictConfig) -> None:
    """Check every constrained field, then cross-group rules. Stops at the first problem."""
    _check_node(cfg, "")
    _check_name(cfg.get("name"))
    _check_model(cfg.model)
    _check_layers(cfg, known_depth(cfg.model))
    _check_metrics(cfg.eval, cfg.data)
    _check_attacks(cfg)
    _check_method(cfg)
    _check_trainable(cfg.unlearn)
    _check_lora(cfg.unlearn)
    _check_auto_tune(cfg)
    _check_local_paths(cfg)
    _check_domains(cfg.data)
    _check_from_run(cfg.locate)
    _check_requires(cfg)
    _check_tune(cfg)
    _check_frontier_range(cfg.report)
    _check_report_columns(cfg.report)
    check_logger(cfg.get("logger"))


def _check_domains(data: DictConfig) -> None:
    """Before any work: what the data's kind checks (a facts set's domains exist and do not
    overlap, ...)."""
    kind_of(data).check(data)


def _check_attacks(cfg: DictConfig) -> None:
    """Registered attacks, on data they can read, with their own checks."""
    from kuda_cli.evaluate.attacks import check_attacks

    check_attacks(cfg)


def _check_method(cfg: DictConfig) -> None:
    """A registered method, then its own checks across groups."""
    from kuda_cli.unlearn.methods import get_method

    get_method(cfg.unlearn.get("method")).check_config(cfg)


def _check_frontier_range(report: DictConfig) -> None:
    levels = list(report.frontier_range)
    if len(levels) != 2 or not 0 <= levels[0] < levels[1] <= 1:
        raise ConfigError(
            f"report.frontier_range={levels} is not a range of forget-removed levels; pass two "
            "numbers 0 <= lo < hi <= 1, e.g. report.frontier_range=[0.5,0.9]"
        )


def _check_report_columns(report: DictConfig) -> None:
    columns = list(report.columns or [])
    if ALL_COLUMNS in columns and len(columns) > 1:
        raise ConfigError(
            f"report.columns={columns} names `{ALL_COLUMNS}` beside other columns; pass "
            f"report.columns=[{ALL_COLUMNS}] for every metric, or the columns alone"
        )


def known_depth(model_cfg: DictConfig) -> int | None:
    """The model's depth when the config states it (the model itself says so after loading)."""
    if model_cfg.get("path"):
        return None  # a local checkpoint may be anything; checked after loading
    return model_cfg.get("num_layers")


def validate_layers_against(cfg: DictConfig, num_layers: int) -> None:
    """Layer checks once the loaded model has told its depth."""
    _check_layers(cfg, num_layers)


def _describe(bounds: dict[str, float]) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and ".join(
        f"{words[k]} {v}" if isinstance(v, int) else f"{words[k]} {v:g}" for k, v in bounds.items()
    )


def _violates(value: Any, bounds: dict[str, float]) -> bool:
    return (
        ("gt" in bounds and not value > bounds["gt"])
        or ("ge" in bounds and not value >= bounds["ge"])
        or ("lt" in bounds and not value < bounds["lt"])
        or ("le" in bounds and not value <= bounds["le"])
    )


def _check_node(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    fields = (
        {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    )
    # an interpolated value (model.num_layers: ${.tiny.num_layers}) is checked after the others,
    # so that a bad value is reported at the key the user set
    for key in sorted(node.keys(), key=lambda k: OmegaConf.is_interpolation(node, k)):
        path = f"{prefix}{key}"
        if path == "hydra":
            continue  # Hydra's own node, validated by Hydra
        if fields and key not in fields:
            raise ConfigError(f"unknown key {path}; allowed keys here: {', '.join(fields)}")
        if OmegaConf.is_missing(node, key):
            if path == "stage":
                continue
            raise ConfigError(f"{path} is required but not set; pass {path}=VALUE")
        value = node[key]
        if isinstance(value, DictConfig):
            _check_node(value, path + ".")
        elif isinstance(value, ListConfig):
            _check_items(path, list(value), fields.get(key))
        elif value is not None:
            _check_value(path, value, fields[key].metadata if key in fields else {})


def _check_value(path: str, value: Any, meta: Any) -> None:
    """One scalar against its field's metadata; a float is finite whatever its metadata says
    (inf passes `gt=0`, nan fails every bound with a misleading message)."""
    bounds = {k: v for k, v in meta.items() if k in ("gt", "ge", "lt", "le")}
    if isinstance(value, float) and not math.isfinite(value):
        within = f" {_describe(bounds)}" if bounds else ""
        raise ConfigError(f"{path}={value} is not a finite number; it must be a number{within}")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of: {allowed}")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], str(value)):
        raise ConfigError(f"{path}={value!r} is not allowed; it must be {meta['allowed']}")
    if bounds and _violates(value, bounds):
        why = f" ({meta['why']})" if "why" in meta else ""
        raise ConfigError(f"{path}={value!r} is out of range; it must be {_describe(bounds)}{why}")


def _items(count: int) -> str:
    return "one item" if count == 1 else f"{count} items"


def _check_items(path: str, items: list, field: dataclasses.Field | None) -> None:
    """A list: at least `min_items` items, no item twice where `distinct`, finite numbers."""
    meta = field.metadata if field is not None else {}
    if len(items) < meta.get("min_items", 0):
        default = field.default_factory() if callable(field.default_factory) else None
        example = f", e.g. {path}=[{','.join(map(str, default))}]" if default else ""
        raise ConfigError(f"{path}={items} must name at least {_items(meta['min_items'])}{example}")
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{path} has {item}; every item must be a finite number")
    if not meta.get("distinct"):
        return
    repeated = list(dict.fromkeys(i for n, i in enumerate(items) if i in items[:n]))
    if repeated:
        once = [*dict.fromkeys(items)]
        raise ConfigError(
            f"{path} has {', '.join(map(str, repeated))} more than once; each item must be "
            f"named once: pass {path}=[{','.join(map(str, once))}]"
        )


def _check_name(name: str | None) -> None:
    if name is not None and not re.fullmatch(r"[\w.+-]+", str(name)):
        raise ConfigError(
            f"name={name!r} must be one word of letters, digits, '.', '+', '-' or '_' "
            "(it becomes part of the run directory's name)"
        )


def _check_model(model: DictConfig) -> None:
    if model.get("path"):
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "is not a directory"
            raise ConfigError(
                f"model.path={model.path} {what}; pass a directory written by save_pretrained "
                "(or a run's checkpoint/ directory)"
            )
        return
    need = {"hub": "id", "embedded": "embedded", "tiny-random": "tiny"}.get(model.source)
    if need and model.get(need) is None:
        raise ConfigError(
            f"model.source={model.source} needs model.{need}; set it or pick another model"
        )
    if model.source == "local":
        raise ConfigError("model.source=local needs model.path=DIR (a save_pretrained directory)")
    if model.source == "tiny-random" and model.tiny.hidden_size % model.tiny.num_heads:
        raise ConfigError(
            f"model.tiny.hidden_size={model.tiny.hidden_size} must be a multiple of "
            f"model.tiny.num_heads={model.tiny.num_heads}"
        )
    if model.source == "tiny-random" and model.tiny.num_heads % model.tiny.num_kv_heads:
        raise ConfigError(
            f"model.tiny.num_heads={model.tiny.num_heads} must be a multiple of "
            f"model.tiny.num_kv_heads={model.tiny.num_kv_heads}"
        )


def _layer_lists(cfg: DictConfig) -> list[tuple[str, list[int]]]:
    found = [("locate.layers", list(cfg.locate.layers or []))]
    if cfg.unlearn.get("layers") is not None:
        found.append(("unlearn.layers", list(cfg.unlearn.layers)))
    from kuda_cli.unlearn.methods import get_method

    return found + get_method(cfg.unlearn.method).layer_options(cfg.unlearn)


def _check_layers(cfg: DictConfig, num_layers: int | None) -> None:
    if cfg.locate.method == "fixed" and not cfg.locate.layers:
        raise ConfigError("locate=fixed needs layers: pass locate.layers=[i,j,...]")
    for key, layers in _layer_lists(cfg):
        for layer in layers:
            if layer < 0 or (num_layers is not None and layer >= num_layers):
                top = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
                raise ConfigError(
                    f"{key} has layer {layer}, outside the model's layers ({top}, "
                    f"model {cfg.model.name})"
                )
    if num_layers is not None and cfg.locate.select_window > num_layers:
        raise ConfigError(
            f"locate.select_window={cfg.locate.select_window} exceeds the model's "
            f"{num_layers} layers"
        )


def _check_local_paths(cfg: DictConfig) -> None:
    """Local files named by the metrics' options or by the data group (its `*path` keys, its
    splits' `path`) exist and are not empty, then each metric's own checks: a typo costs no
    model load."""
    from kuda_cli.evaluate import metrics_of

    metrics = metrics_of(cfg.eval)
    keys = [key for metric in metrics for key in metric.local_paths]
    for name, value in cfg.data.items():
        if isinstance(value, DictConfig) and "path" in value:
            keys.append(f"data.{name}.path")
        elif str(name).endswith("path"):
            keys.append(f"data.{name}")
    for key in dict.fromkeys(keys):
        value = OmegaConf.select(cfg, key)
        if value and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"{key}={value} does not exist; pass an existing file or directory")
        if value:
            refuse_blank_file(key, str(value))
    for metric in metrics:
        metric.check(cfg)


def _check_from_run(locate: DictConfig) -> None:
    """A reused trace run must hold its selection, so a typo costs no model load."""
    if not locate.get("from_run"):
        return
    if not (Path(str(locate.from_run)).expanduser() / TRACE_DIR / LAYERS_FILE).is_file():
        raise ConfigError(
            f"locate.from_run={locate.from_run} holds no trace/layers.json; pass the directory "
            "of a completed kuda trace run (outputs/trace/DATE_TIME)"
        )


def _check_metrics(eval_cfg: DictConfig, data_cfg: DictConfig) -> None:
    """Registered metrics; one that reads its sets from the data group reads a kind that has
    them."""
    from kuda_cli.evaluate import get_metric

    kind = kind_of(data_cfg)
    for name in eval_cfg.metrics:
        if get_metric(name).reads_data and name not in kind.metrics:
            raise ConfigError(
                f"eval={eval_cfg.name} reads its {name} sets from the data group, which "
                f"data={data_cfg.name} does not have; pass "
                f"eval={kind.eval_option} with data={data_cfg.name} (or eval=none)"
            )


def _check_trainable(unlearn: DictConfig) -> None:
    kinds = list(unlearn.get("trainable", []))
    bad = [k for k in kinds if k not in TRAINABLE_KINDS]
    if bad:
        raise ConfigError(
            f"unlearn.trainable has {', '.join(map(str, bad))}; choose among: "
            f"{', '.join(TRAINABLE_KINDS)}"
        )
    if not kinds:
        raise ConfigError(
            "unlearn.trainable is empty; name what trains, e.g. unlearn.trainable=[down_proj] "
            "or [all]"
        )
    if "all" in kinds and len(kinds) > 1:
        raise ConfigError(
            f"unlearn.trainable=[{', '.join(kinds)}]: all already trains every parameter; pass "
            "unlearn.trainable=[all] alone, or list module kinds without all"
        )


def _check_lora(unlearn: DictConfig) -> None:
    from kuda_cli.unlearn.methods import get_method, lora_methods

    lora = unlearn.get("lora")
    if lora is None or not lora.enabled:
        return
    method = get_method(unlearn.method)
    if not method.supports_lora:
        raise ConfigError(
            f"unlearn.lora.enabled=true is for the full-parameter baselines "
            f"({', '.join(lora_methods())}); {unlearn.method} {method.lora_refusal}: "
            "drop unlearn.lora"
        )


def _check_auto_tune(cfg: DictConfig) -> None:
    """unlearn.auto_tune scores its trials on facts (their prompts or clozes), one process, the
    weights themselves."""
    spec = cfg.unlearn.get("auto_tune")
    if not spec or not spec.get("enabled"):
        return
    factors = list(spec.factors)
    if not factors or factors != sorted(factors) or min(factors) <= 0:
        raise ConfigError(
            f"unlearn.auto_tune.factors={factors} must be positive and ascending, e.g. [0.5,1,2]"
        )
    if not kind_of(cfg.data).provides_facts:
        raise ConfigError(
            f"unlearn.auto_tune scores its trials on facts (data=facts), not "
            f"data={cfg.data.get('name')}; set unlearn.lr and unlearn.auto_tune.enabled=false"
        )
    if cfg.unlearn.lora.enabled or distributed.world_size() > 1:
        raise ConfigError(
            "unlearn.auto_tune runs in one process on the weights themselves: drop "
            "unlearn.lora.enabled and the launcher, or set unlearn.auto_tune.enabled=false"
        )


def _check_requires(cfg: DictConfig) -> None:
    from kuda_cli.config import REQUIREMENTS

    bad = [str(r) for r in cfg.get("requires") or [] if r not in REQUIREMENTS]
    if bad:
        raise ConfigError(
            f"requires has {', '.join(bad)}; choose among: {', '.join(REQUIREMENTS)} (or [])"
        )


def _check_tune(cfg: DictConfig) -> None:
    tune = cfg.get("tune")
    if tune is None:
        return
    if tune.get("choice") and not Path(str(tune.choice)).expanduser().is_file():
        raise ConfigError(
            f"tune.choice={tune.choice} does not exist; pass the choice.yaml a kuda pick run wrote"
        )
    outside = [k for k in tune.carry if not str(k).startswith(CARRIABLE)]
    if outside:
        raise ConfigError(
            f"tune.carry lists {outside[0]}; a choice carries {' and '.join(CARRIABLE)}* settings "
            "only; set other keys on the sweep's command line"
        )
    if tune.get("require_choice") and not tune.get("choice"):
        raise ConfigError(
            "this sweep starts from stage 1's choice: pass tune.choice=FILE (the choice.yaml a "
            "kuda pick run wrote, e.g. outputs/tune/pick1/choice.yaml)"
        )
    if cfg.stage == "pick" and not tune.runs:
        raise ConfigError("kuda pick needs tune.runs=[SWEEP_DIR,...] (run directories or globs)")
