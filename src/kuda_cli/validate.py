"""Config validation: value constraints from the schemas' field metadata, plus checks that span
several groups (layer indices against the model's depth). Raises `ConfigError` with one line that
names the key, the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kuda_cli import distributed
from kuda_cli.data import EVAL_FOR_KIND
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate.lm_eval_data import LOCAL_FILE_OPTIONS
from kuda_cli.locate.layers import LAYERS_FILE, TRACE_DIR
from kuda_cli.models.adapter import TRAINABLE_KINDS


def validate(cfg: DictConfig) -> None:
    """Check every constrained field, then cross-group rules. Stops at the first problem."""
    _check_node(cfg, "")
    _check_name(cfg.get("name"))
    _check_model(cfg.model)
    _check_layers(cfg, known_depth(cfg.model))
    _check_metrics(cfg.eval, cfg.data)
    _check_method(cfg.unlearn)
    _check_trainable(cfg.unlearn)
    _check_lora(cfg.unlearn)
    _check_subjects(cfg)
    _check_auto_tune(cfg)
    _check_steer_layer(cfg)
    _check_text_source(cfg.eval)
    _check_local_paths(cfg)
    _check_domains(cfg.data)
    _check_from_run(cfg.locate)
    _check_requires(cfg)
    _check_tune(cfg)
    _check_frontier_range(cfg.report)


def _check_domains(data: DictConfig) -> None:
    """Before any work: forget and retain domains of a facts set are domains of that set (the
    built-in one or data.path's) and do not overlap."""
    if data.get("kind") == "facts":
        from kuda_cli.data.facts import load_facts, split_facts

        split_facts(load_facts(data.path), list(data.forget_domains), list(data.retain_domains))


def _check_method(unlearn: DictConfig) -> None:
    from kuda_cli.unlearn.methods import check_registered

    check_registered(unlearn.get("method"))


def _check_frontier_range(report: DictConfig) -> None:
    levels = list(report.frontier_range)
    if len(levels) != 2 or not 0 <= levels[0] < levels[1] <= 1:
        raise ConfigError(
            f"report.frontier_range={levels} is not a range of forget-removed levels; pass two "
            "numbers 0 <= lo < hi <= 1, e.g. report.frontier_range=[0.5,0.9]"
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
            continue
        meta = fields[key].metadata if key in fields else {}
        if value is None or not meta:
            continue
        if "choices" in meta and value not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            raise ConfigError(f"{path}={value!r} is not allowed; choose one of: {allowed}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], str(value)):
            raise ConfigError(f"{path}={value!r} is not allowed; it must be {meta['allowed']}")
        bounds = {k: v for k, v in meta.items() if k in ("gt", "ge", "lt", "le")}
        if bounds and _violates(value, bounds):
            raise ConfigError(f"{path}={value!r} is out of range; it must be {_describe(bounds)}")


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
    if cfg.unlearn.get("steer_layer") is not None:
        found.append(("unlearn.steer_layer", [cfg.unlearn.steer_layer]))
    return found


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


def _check_text_source(eval_cfg: DictConfig) -> None:
    ppl = eval_cfg.perplexity
    if "perplexity" not in eval_cfg.metrics or ppl.source != "path":
        return
    if not ppl.path:
        raise ConfigError("eval.perplexity.source=path needs eval.perplexity.path=FILE")
    if not Path(ppl.path).expanduser().exists():
        raise ConfigError(
            f"eval.perplexity.path={ppl.path} does not exist; pass a JSONL, JSON, parquet "
            "or txt file (or a directory of them)"
        )


# Local files named by options that are read by a metric or by the data group: checked before the
# run starts, so a typo costs no model load.
LOCAL_PATHS = {
    "facts": ("eval.facts.reference", "eval.facts.judge", "data.path", "data.floor_path"),
    "lm_eval": tuple(LOCAL_FILE_OPTIONS.values()),
}


def _check_local_paths(cfg: DictConfig) -> None:
    keys = [key for metric in cfg.eval.metrics for key in LOCAL_PATHS.get(metric, ())]
    keys += [
        f"data.{name}.path"
        for name, value in cfg.data.items()
        if isinstance(value, DictConfig) and "path" in value
    ]
    for key in dict.fromkeys(keys):
        value = OmegaConf.select(cfg, key)
        if value and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"{key}={value} does not exist; pass an existing file or directory")
    reference = OmegaConf.select(cfg, "eval.facts.reference")
    if "facts" in cfg.eval.metrics and reference:
        from kuda_cli.evaluate.facts import read_reference_answers

        read_reference_answers(reference)  # a facts run's answers, before any model loads


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
    from kuda_cli.evaluate import METRIC_DATA_KIND, METRIC_MODULES

    for name in eval_cfg.metrics:
        if name not in METRIC_MODULES:
            known = ", ".join(sorted(METRIC_MODULES))
            raise ConfigError(
                f"eval.metrics has {name!r}, which this version of kuda does not implement "
                f"yet (eval={eval_cfg.name}); available: {known}"
            )
        kind = METRIC_DATA_KIND.get(name)
        if kind and data_cfg.kind != kind:
            raise ConfigError(
                f"eval={eval_cfg.name} reads its {name} sets from the data group, which "
                f"data={data_cfg.name} does not have; pass "
                f"eval={EVAL_FOR_KIND[data_cfg.kind]} with data={data_cfg.name} (or eval=none)"
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
    from kuda_cli.unlearn.lora import NOT_FOR

    lora = unlearn.get("lora")
    if lora is not None and lora.enabled and unlearn.get("method") in NOT_FOR:
        raise ConfigError(
            f"unlearn.lora.enabled=true is for the full-parameter baselines (ga, graddiff, npo, "
            f"simnpo); {unlearn.method} trains named down_proj matrices: drop unlearn.lora"
        )


def _check_subjects(cfg: DictConfig) -> None:
    """KUDA's subject-token options need data that names subjects (data=facts): refused before
    anything loads, not after tracing."""
    unlearn = cfg.unlearn
    if unlearn.get("method") != "kuda" or cfg.data.get("kind") == "facts":
        return
    if unlearn.get("target") == "unknown":
        raise ConfigError(
            f"unlearn.target=unknown needs data that names subjects (data=facts), not "
            f"data={cfg.data.get('name')}; use unlearn.target=away"
        )
    if unlearn.get("tokens") in ("subject", "last"):
        raise ConfigError(
            f"unlearn.tokens={unlearn.tokens} needs data that names subjects (data=facts), not "
            f"data={cfg.data.get('name')}; use unlearn.tokens=auto or all"
        )


def _check_auto_tune(cfg: DictConfig) -> None:
    """unlearn.auto_tune scores its trials on facts clozes, one process, the weights themselves."""
    spec = cfg.unlearn.get("auto_tune")
    if not spec or not spec.get("enabled"):
        return
    factors = list(spec.factors)
    if not factors or factors != sorted(factors) or min(factors) <= 0:
        raise ConfigError(
            f"unlearn.auto_tune.factors={factors} must be positive and ascending, e.g. [0.5,1,2]"
        )
    if cfg.data.get("kind") != "facts":
        raise ConfigError(
            f"unlearn.auto_tune scores its trials on facts (data=facts), not "
            f"data={cfg.data.get('name')}; set unlearn.lr and unlearn.auto_tune.enabled=false"
        )
    if cfg.unlearn.lora.enabled or distributed.world_size() > 1:
        raise ConfigError(
            "unlearn.auto_tune runs in one process on the weights themselves: drop "
            "unlearn.lora.enabled and the launcher, or set unlearn.auto_tune.enabled=false"
        )


def _check_steer_layer(cfg: DictConfig) -> None:
    """RMU reads the layer `steer_layer` and stops the forward pass there: a trained layer
    after it would get no gradient."""
    steer = cfg.unlearn.get("steer_layer")
    if steer is None or "all" in cfg.unlearn.get("trainable", []):
        return
    if cfg.unlearn.get("layers") is not None:
        key, trained = "unlearn.layers", list(cfg.unlearn.layers)
    elif cfg.locate.method == "fixed":
        key, trained = "locate.layers", list(cfg.locate.layers or [])
    else:
        return  # located at run time; the method checks then
    if trained and steer < max(trained):
        raise ConfigError(
            f"unlearn.steer_layer={steer} comes before layer {max(trained)} of {key}, which "
            f"would get no gradient; set unlearn.steer_layer>={max(trained)} or null"
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
    if tune.get("require_choice") and not tune.get("choice"):
        raise ConfigError(
            "this sweep starts from stage 1's choice: pass tune.choice=FILE (the choice.yaml a "
            "kuda pick run wrote, e.g. outputs/tune/pick1/choice.yaml)"
        )
    if cfg.stage == "pick" and not tune.runs:
        raise ConfigError("kuda pick needs tune.runs=[SWEEP_DIR,...] (run directories or globs)")
