"""WMDP and MMLU multiple-choice accuracy of an in-memory model through lm-eval's own harness:
task YAMLs generated over local copies of the rows (offline), or lm-eval's hub tasks."""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kuda_cli.data.texts import read_records
from kuda_cli.errors import UserError

TEMPLATES = Path(__file__).parent / "lm_eval_tasks"
WMDP_DOMAINS = {"wmdp_bio": "biology", "wmdp_chem": "chemistry", "wmdp_cyber": "cybersecurity"}
HUB_DATASETS = {
    "wmdp_bio": "cais/wmdp",
    "wmdp_chem": "cais/wmdp",
    "wmdp_cyber": "cais/wmdp",
    "mmlu": "cais/mmlu",
}
# The config option that gives each dataset as a local file, named in error messages.
LOCAL_FILE_OPTIONS = {
    "wmdp_bio": "eval.wmdp.bio_path",
    "wmdp_chem": "eval.wmdp.chem_path",
    "wmdp_cyber": "eval.wmdp.cyber_path",
    "mmlu": "eval.wmdp.mmlu_path",
    "mmlu_dev": "eval.wmdp.mmlu_dev_path",
}
FIELDS = {
    "wmdp": ("question", "choices", "answer"),
    "mmlu": ("question", "subject", "choices", "answer"),
}
MMLU_GROUP = "kuda_mmlu_local"
DATA_DIR = "kuda_data"
CACHE_DIR = "kuda_hf_datasets_cache"
LETTERS = "ABCD"


def dataset_of(task: str) -> str:
    """The dataset key of a task name: wmdp_bio, wmdp_chem, wmdp_cyber or mmlu."""
    if task in WMDP_DOMAINS:
        return task
    if task == "mmlu" or (task.startswith("mmlu_") and len(task) > len("mmlu_")):
        return "mmlu"
    raise UserError(
        f"unknown lm-eval task {task!r}; use wmdp_bio, wmdp_cyber, wmdp_chem, mmlu or "
        "mmlu_<subject> (e.g. mmlu_college_biology)"
    )


def _fields(dataset: str) -> tuple[str, ...]:
    return FIELDS["mmlu" if dataset.startswith("mmlu") else "wmdp"]


def _answer_index(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise UserError(f"{where}: answer {value!r} is not a choice index 0-3 (or a letter A-D)")


def _subject(value: Any, where: str) -> str:
    # Subjects name tasks and files: "College Biology" and "college_biology" are one subject.
    subject = re.sub(r"[^a-z0-9]+", "_", str(value).strip().lower()).strip("_")
    if not subject:
        raise UserError(f"{where}: empty subject")
    return subject


def read_rows(path: str | Path, dataset: str) -> list[dict[str, Any]]:
    """Rows of a local JSON/JSONL/parquet file in the hub schema, checked and normalised: the
    answer an index 0-3, exactly four string choices (the prompt letters them A-D)."""
    fields = _fields(dataset)
    records = read_records(path)
    if not records:
        raise UserError(f"{path} holds no rows; {dataset} rows have fields {', '.join(fields)}")
    rows = []
    for i, record in enumerate(records, start=1):
        where = f"{path} row {i}"
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise UserError(
                f"{where} lacks {', '.join(missing)}; {dataset} rows have fields "
                f"{', '.join(fields)}"
            )
        choices = record["choices"]
        if not (
            isinstance(choices, list)
            and len(choices) == 4
            and all(isinstance(c, str) for c in choices)
        ):
            raise UserError(f"{where}: choices must be a list of 4 strings")
        if not isinstance(record["question"], str):
            raise UserError(f"{where}: question must be a string")
        row = {
            "question": record["question"],
            "choices": list(choices),
            "answer": _answer_index(record["answer"], where),
        }
        if "subject" in fields:
            row["subject"] = _subject(record["subject"], where)
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return str(path.resolve())


def _write_yaml(directory: Path, name: str, config: dict[str, Any]) -> None:
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    (directory / f"{name}.yaml").write_text(text)


def _write_task(directory: Path, template: str, config: dict[str, Any]) -> None:
    # The template is copied so the directory stands alone (the `lm_eval` command reads it too).
    shutil.copyfile(TEMPLATES / template, directory / template)
    _write_yaml(directory, config["task"], {"include": template, **config})


def _dataset_kwargs(directory: Path, data_files: dict[str, str]) -> dict[str, Any]:
    # A cache inside the task directory: no Arrow copies of the rows left in ~/.cache.
    return {"data_files": data_files, "cache_dir": str((directory / CACHE_DIR).resolve())}


def _write_mmlu(directory: Path, path: str, dev_path: str | None) -> dict[str, str]:
    """One task per subject present (lm-eval's per-subject description) and the group
    kuda_mmlu_local over them; returns {subject: task name}."""
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in read_rows(path, "mmlu"):
        by_subject.setdefault(row["subject"], []).append(row)
    dev: dict[str, list[dict[str, Any]]] = {}
    if dev_path:
        for row in read_rows(dev_path, "mmlu"):
            dev.setdefault(row["subject"], []).append(row)
        lacking = sorted(set(by_subject) - set(dev))
        if lacking:
            raise UserError(
                f"{dev_path} (MMLU dev rows, the few-shot examples) has no rows for subject(s) "
                f"{', '.join(lacking)} of {path}"
            )
    names = {}
    for subject in sorted(by_subject):
        name = f"kuda_mmlu_{subject}_local"
        data_files = {
            "test": _write_jsonl(directory / DATA_DIR / f"{name}.jsonl", by_subject[subject])
        }
        config: dict[str, Any] = {
            "task": name,
            "task_alias": subject,
            "description": "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n",
        }
        if dev_path:
            rows = dev[subject]
            data_files["dev"] = _write_jsonl(directory / DATA_DIR / f"{name}_dev.jsonl", rows)
            config["fewshot_split"] = "dev"
        config["dataset_kwargs"] = _dataset_kwargs(directory, data_files)
        _write_task(directory, "mmlu_template_yaml", config)
        names[subject] = name
    _write_yaml(
        directory,
        MMLU_GROUP,
        {
            "group": MMLU_GROUP,
            "task": list(names.values()),
            # Weighting each subject by its size makes the group's acc the mean over all rows,
            # as lm-eval's own mmlu group (nested, also weight_by_size) computes it.
            "aggregate_metric_list": [
                {"metric": "acc", "aggregation": "mean", "weight_by_size": True}
            ],
            "metadata": {"version": 2},
        },
    )
    return names


def write_local_tasks(
    tasks: list[str], local_files: dict[str, str] | None, directory: str | Path
) -> dict[str, str]:
    """Write lm-eval task YAMLs over the local files into `directory` (usable as lm-eval's
    `include_path`, in process or with `lm_eval --include_path`); returns {task: lm-eval task
    name} for the tasks that have a local file. "mmlu" maps to the group kuda_mmlu_local."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Files of an earlier call in the same directory would register stale tasks.
    for stale in directory.glob("kuda_*.yaml"):
        stale.unlink()
    for sub in (DATA_DIR, CACHE_DIR):
        shutil.rmtree(directory / sub, ignore_errors=True)
    local_files = {key: str(value) for key, value in (local_files or {}).items() if value}
    names: dict[str, str] = {}
    subjects: dict[str, str] | None = None
    for task in dict.fromkeys(tasks):
        dataset = dataset_of(task)
        path = local_files.get(dataset)
        if not path:
            continue
        if dataset in WMDP_DOMAINS:
            name = f"kuda_{task}_local"
            data = _write_jsonl(directory / DATA_DIR / f"{name}.jsonl", read_rows(path, task))
            description = (
                "The following are multiple choice questions (with answers) about "
                f"{WMDP_DOMAINS[task]}.\n\n"
            )
            config = {
                "task": name,
                "description": description,
                "dataset_kwargs": _dataset_kwargs(directory, {"test": data}),
            }
            _write_task(directory, "wmdp_template_yaml", config)
        else:
            if subjects is None:
                subjects = _write_mmlu(directory, path, local_files.get("mmlu_dev"))
            if task == "mmlu":
                name = MMLU_GROUP
            elif (subject := task[len("mmlu_") :]) in subjects:
                name = subjects[subject]
            else:
                raise UserError(
                    f"{task}: {path} has no rows with subject {subject!r} "
                    f"(subjects there: {', '.join(subjects)})"
                )
        names[task] = name
    return names


@contextlib.contextmanager
def _task_directory(task_dir: str | Path | None) -> Iterator[Path]:
    if task_dir is not None:
        yield Path(task_dir)
        return
    with tempfile.TemporaryDirectory(prefix="kuda-lm-eval-") as tmp:
        yield Path(tmp)


def _task_manager(directory: Path, hub: list[str]):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    # Indexing all ~15k shipped task YAMLs takes ~10 s; the hub tasks asked for live in two dirs.
    shipped = Path(lm_eval.tasks.__file__).parent
    hub_dirs = [shipped / "wmdp", shipped / "mmlu" / "default"]
    paths = [directory]
    include_defaults = False
    if hub:
        if all(d.is_dir() for d in hub_dirs):
            paths = [*hub_dirs, directory]
        else:
            include_defaults = True
    return TaskManager(include_path=[str(p) for p in paths], include_defaults=include_defaults)


def _load_tasks(manager, requested: list[str], local: dict[str, str]) -> list[Any]:
    """Task and Group objects to evaluate. Hub tasks are built (their datasets loaded) one by one
    here, so an unreachable dataset is reported by name."""
    objects = []
    for task in requested:
        # A subject task is also a leaf of the mmlu group, and lm-eval refuses a task twice.
        if task.startswith("mmlu_") and "mmlu" in requested:
            continue
        name = local.get(task, task)
        try:
            loaded = manager.load([name])
        except Exception as err:  # datasets raises many types for offline, gated or missing sets
            if task in local:
                raise
            dataset = dataset_of(task)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"{task} needs the hub dataset {HUB_DATASETS[dataset]} (unreachable: "
                f"{first[:200]}); pass {LOCAL_FILE_OPTIONS[dataset]}=FILE (rows: "
                f"{', '.join(_fields(dataset))})"
            ) from err
        group = loaded.get("groups", {}).get(name)
        objects.append(group if group is not None else loaded["tasks"][name])
    return objects


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    # lm-eval seeds the global generators; the caller's (e.g. a training loop's) stay as they were.
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for child in group_subtasks[name] for leaf in _leaves(child, group_subtasks)]


def _collect(results: dict[str, Any], requested: list[str], local: dict[str, str]) -> dict:
    scores, group_subtasks = results["results"], results.get("group_subtasks", {})
    n_samples = results.get("n-samples", {})

    def entry(name: str) -> dict[str, Any]:
        leaves = _leaves(name, group_subtasks)
        return {
            "acc": _number(scores[name].get("acc,none")),
            "acc_stderr": _number(scores[name].get("acc_stderr,none")),
            "n": sum(int(n_samples.get(leaf, {}).get("effective", 0)) for leaf in leaves),
        }

    out: dict[str, dict[str, Any]] = {}
    for task in requested:
        name = local.get(task, task)
        if task == "mmlu":
            out[task] = entry(name)
            for leaf in _leaves(name, group_subtasks):
                subject = re.sub(r"^(kuda_)?mmlu_(.*?)(_local)?$", r"\2", leaf)
                out[f"mmlu_{subject}"] = entry(leaf)
        elif task not in out:
            out[task] = entry(name)
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    local_files: dict[str, str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    task_dir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy of `model` (evaluated in place, not copied) on lm-eval multiple-choice tasks:
    {task: {"acc", "acc_stderr", "n"}}. "mmlu" adds one entry per subject it covers.

    `local_files` maps wmdp_bio / wmdp_cyber / wmdp_chem / mmlu (and mmlu_dev, the few-shot
    examples) to local JSON/JSONL/parquet files in the hub schema; those tasks run lm-eval's
    prompts over the local rows, the others lm-eval's hub tasks. `task_dir` keeps the generated
    task YAMLs there (otherwise a temporary directory)."""
    requested = list(dict.fromkeys(tasks))
    if not requested:
        raise UserError("no lm-eval tasks given; e.g. eval.wmdp.tasks=[wmdp_bio,wmdp_cyber,mmlu]")
    datasets = {task: dataset_of(task) for task in requested}
    local_files = {key: str(value) for key, value in (local_files or {}).items() if value}
    unknown = sorted(set(local_files) - set(LOCAL_FILE_OPTIONS))
    if unknown:
        raise UserError(
            f"local_files has unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(LOCAL_FILE_OPTIONS)}"
        )
    if (
        num_fewshot > 0
        and "mmlu" in local_files
        and "mmlu_dev" not in local_files
        and "mmlu" in datasets.values()
    ):
        raise UserError(
            f"{num_fewshot}-shot MMLU draws its examples from the dev split; pass "
            f"{LOCAL_FILE_OPTIONS['mmlu_dev']}=FILE (rows: question, subject, choices, answer)"
        )

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with _task_directory(task_dir) as directory, _preserved_rng():
            local = write_local_tasks(requested, local_files, directory)
            hub = [task for task in requested if task not in local]
            manager = _task_manager(directory, hub)
            objects = _load_tasks(manager, requested, local)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = simple_evaluate(
                model=lm,
                tasks=objects,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=False,
            )
    finally:
        model.train(was_training)  # HFLM switches the model to eval mode
    return _collect(results, requested, local)
