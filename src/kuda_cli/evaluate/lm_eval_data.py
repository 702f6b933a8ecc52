"""The WMDP and MMLU datasets lm-eval scores: their hub ids, the options that give local copies
(the one table the metric, the checks before a run and the hub check read), and task YAMLs
generated over local rows, so lm-eval runs offline with the prompts of its own tasks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from kuda_cli.data.questions import answer_index
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
# The key under eval.wmdp that gives each dataset as a local file: the one table the metric, the
# path checks before a run and the hub check read (in the order they check them).
LOCAL_FILE_KEYS = {
    "wmdp_bio": "bio_path",
    "wmdp_cyber": "cyber_path",
    "wmdp_chem": "chem_path",
    "mmlu": "mmlu_path",
    "mmlu_dev": "mmlu_dev_path",
}
LOCAL_FILE_OPTIONS = {name: f"eval.wmdp.{key}" for name, key in LOCAL_FILE_KEYS.items()}
FIELDS = {
    "wmdp": ("question", "choices", "answer"),
    "mmlu": ("question", "subject", "choices", "answer"),
}
MMLU_GROUP = "kuda_mmlu_local"
DATA_DIR = "kuda_data"
CACHE_DIR = "kuda_hf_datasets_cache"


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


def fields_of(dataset: str) -> tuple[str, ...]:
    return FIELDS["mmlu" if dataset.startswith("mmlu") else "wmdp"]


def _answer_index(value: Any, where: str) -> int:
    index = answer_index(value, 4)
    if index is None:
        raise UserError(f"{where}: answer {value!r} is not a choice index 0-3 (or a letter A-D)")
    return index


def _subject(value: Any, where: str) -> str:
    # Subjects name tasks and files: "College Biology" and "college_biology" are one subject.
    subject = re.sub(r"[^a-z0-9]+", "_", str(value).strip().lower()).strip("_")
    if not subject:
        raise UserError(f"{where}: empty subject")
    return subject


def read_rows(path: str | Path, dataset: str) -> list[dict[str, Any]]:
    """Rows of a local JSON/JSONL/parquet file in the hub schema, checked and normalised: the
    answer an index 0-3, exactly four string choices (the prompt letters them A-D)."""
    fields = fields_of(dataset)
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
