"""`eval.metrics: [lm_eval]`: WMDP and MMLU zero-shot accuracy of the in-memory model through
lm-eval, on local copies of the datasets where `eval.wmdp.*_path` gives them. Its settings live
under `eval.wmdp` (the key eval=wmdp has always had)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kuda_cli.config import bounded, listed
from kuda_cli.evaluate import EvalContext, Metric, register_metric
from kuda_cli.evaluate.lm_eval_bridge import run_lm_eval
from kuda_cli.evaluate.lm_eval_data import (
    HUB_DATASETS,
    LOCAL_FILE_KEYS,
    LOCAL_FILE_OPTIONS,
    dataset_of,
)
from kuda_cli.hub import HubSource
from kuda_cli.run import lookup


@dataclass
class WmdpEvalConfig:
    """WMDP and MMLU through lm-eval; local files (hub schema) replace the hub datasets."""

    tasks: list[str] = listed("wmdp_bio", "wmdp_cyber", "mmlu", distinct=True, min_items=1)
    bio_path: str | None = None  # rows: question, choices (4), answer (index)
    cyber_path: str | None = None
    chem_path: str | None = None
    mmlu_path: str | None = None  # rows: question, subject, choices, answer
    mmlu_dev_path: str | None = None  # few-shot examples for MMLU (num_fewshot > 0)
    limit: int | None = bounded(None, ge=1)  # questions per task, for quick runs
    # rows per lm-eval batch: a positive integer, `auto` (lm-eval finds the largest batch that
    # fits on the GPU: 64 halved on out-of-memory) or `auto:N` (found again N times as requests
    # get shorter). On a CPU auto is 8: lm-eval's probe would run 64 rows of the longest request
    batch_size: str = field(
        default="auto",
        metadata={
            "pattern": r"auto(:[1-9][0-9]*)?|[1-9][0-9]*",
            "allowed": "an integer >= 1, auto or auto:N",
        },
    )
    num_fewshot: int = bounded(0, ge=0)


@register_metric("lm_eval", WmdpEvalConfig)
class LmEval(Metric):
    section = "wmdp"
    local_paths = tuple(LOCAL_FILE_OPTIONS.values())
    # not lm_eval.*.acc: mmlu adds one entry per subject
    report_columns = (("benchmark", "lm_eval.wmdp_*.acc"), ("benchmark", "lm_eval.mmlu.acc"))

    @classmethod
    def compute(cls, ctx: EvalContext) -> dict[str, Any]:
        cfg = ctx.eval.wmdp
        local = {n: getattr(cfg, key) for n, key in LOCAL_FILE_KEYS.items() if getattr(cfg, key)}
        results = run_lm_eval(
            ctx.loaded.model,
            ctx.loaded.tokenizer,
            list(cfg.tasks),
            local_files=local,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            num_fewshot=cfg.num_fewshot,
        )
        return {"lm_eval": results}

    @classmethod
    def summarise(cls, before: dict, after: dict, settings) -> dict[str, Any]:
        found = {}
        for task in settings.tasks:
            found[f"{task}_acc"] = lookup(after, f"lm_eval.{task}.acc")
            found[f"{task}_acc_before"] = lookup(before, f"lm_eval.{task}.acc")
        return found

    @classmethod
    def hub_sources(cls, cfg) -> list[HubSource]:
        found = []
        for task in cfg.eval.wmdp.tasks:
            try:
                dataset = dataset_of(task)
            except Exception:  # an unknown task is reported by lm-eval itself
                continue
            key = LOCAL_FILE_OPTIONS[dataset]
            if not cfg.eval.wmdp.get(LOCAL_FILE_KEYS[dataset]):
                found.append(HubSource(key, HUB_DATASETS[dataset], f"{key}=FILE"))
        return found
