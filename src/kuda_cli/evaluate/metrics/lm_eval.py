"""`eval.metrics: [lm_eval]`: WMDP and MMLU zero-shot accuracy of the in-memory model through
lm-eval, on local copies of the datasets where `eval.wmdp.*_path` gives them."""

from __future__ import annotations

from typing import Any

from kuda_cli.evaluate import EvalContext, register_metric
from kuda_cli.evaluate.lm_eval_bridge import run_lm_eval
from kuda_cli.evaluate.lm_eval_data import LOCAL_FILE_KEYS


@register_metric("lm_eval")
def lm_eval_metric(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.eval.wmdp
    local = {name: getattr(cfg, key) for name, key in LOCAL_FILE_KEYS.items() if getattr(cfg, key)}
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
