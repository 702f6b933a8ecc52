"""WMDP and MMLU multiple-choice accuracy of an in-memory model through lm-eval's own harness:
task YAMLs generated over local copies of the rows (offline, `kuda_cli.evaluate.lm_eval_data`),
or lm-eval's hub tasks."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kuda_cli.errors import UserError
from kuda_cli.evaluate.lm_eval_data import (
    HUB_DATASETS,
    LOCAL_FILE_OPTIONS,
    WMDP_DOMAINS,
    dataset_of,
    fields_of,
    write_local_tasks,
)

log = logging.getLogger(__name__)
# `auto` off CUDA: lm-eval's probe runs its largest batch (64 rows of the longest request) on
# whatever memory there is, and a CPU only ever gets slower, never out of memory
CPU_BATCH_SIZE = 8


def lm_eval_batch_size(value: int | str, device) -> int | str:
    """What HFLM gets for `eval.wmdp.batch_size`: an integer as it is; `auto` or `auto:N` on a
    CUDA device as they are (lm-eval finds the largest batch that fits, N times), elsewhere
    CPU_BATCH_SIZE."""
    text = str(value).strip()
    head, _, times = text.partition(":")
    if head == "auto" and (not times or (times.isdigit() and int(times) > 0)):
        return text if getattr(device, "type", str(device)).startswith("cuda") else CPU_BATCH_SIZE
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"lm-eval batch size {value!r} must be an integer >= 1, auto or auto:N")


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


def _load_tasks(
    manager, requested: list[str], local: dict[str, str], num_fewshot: int = 0
) -> list[Any]:
    """Task and Group objects to evaluate, WMDP's with `num_fewshot` set on the task itself
    (its YAML says `num_fewshot: 0`, which simple_evaluate's own num_fewshot never overrides).
    Hub tasks are built (their datasets loaded) one by one here, so an unreachable dataset is
    reported by name."""
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
                f"{', '.join(fields_of(dataset))})"
            ) from err
        group = loaded.get("groups", {}).get(name)
        if group is None and task in WMDP_DOMAINS and num_fewshot > 0:
            loaded["tasks"][name].set_config(key="num_fewshot", value=num_fewshot)
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
    batch_size: int | str = 8,
    num_fewshot: int = 0,
    task_dir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy of `model` (evaluated in place, not copied) on lm-eval multiple-choice tasks:
    {task: {"acc", "acc_stderr", "n"}}. "mmlu" adds one entry per subject it covers.

    `local_files` maps wmdp_bio / wmdp_cyber / wmdp_chem / mmlu (and mmlu_dev, the few-shot
    examples) to local JSON/JSONL/parquet files in the hub schema; those tasks run lm-eval's
    prompts over the local rows, the others lm-eval's hub tasks. `task_dir` keeps the generated
    task YAMLs there (otherwise a temporary directory). `batch_size`: see lm_eval_batch_size."""
    requested = list(dict.fromkeys(tasks))
    batch = lm_eval_batch_size(batch_size, next(model.parameters()).device)
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
            objects = _load_tasks(manager, requested, local, num_fewshot)
            log.info("lm-eval batch size %s (eval.wmdp.batch_size=%s)", batch, batch_size)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
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
