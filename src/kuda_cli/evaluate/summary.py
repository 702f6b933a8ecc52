"""The headline comparison of an unlearned model with its starting model (metrics.json's
`summary`): forgetting against the never-learned floor, locality, specificity, fluency, and each
lm-eval and MUSE figure before and after."""

from __future__ import annotations

from typing import Any

from kuda_cli.evaluate.floors import forget_removed
from kuda_cli.run import lookup


def summarise(
    before: dict[str, Any], after: dict[str, Any], tasks: list[str] | None = None
) -> dict[str, Any]:
    """The headline comparison with the starting model: for the facts evaluation, forgetting
    against the never-learned floor, locality on other subjects, specificity on the forgotten
    subjects, and fluency; for lm-eval tasks and MUSE, each figure before and after."""

    def ratio(path: str):
        a, b = lookup(after, path), lookup(before, path)
        return a / b if a is not None and b else None

    floor_mc, floor_gen = (
        lookup(before, "facts.floor.mc_acc"),
        lookup(before, "facts.floor.gen_acc"),
    )
    removed_mc = forget_removed(
        lookup(before, "facts.forget.mc_acc"), lookup(after, "facts.forget.mc_acc"), floor_mc
    )
    removed_gen = forget_removed(
        lookup(before, "facts.forget.gen_acc"), lookup(after, "facts.forget.gen_acc"), floor_gen
    )
    removed = [r for r in (removed_mc, removed_gen) if r is not None]
    facts = {
        "forget_mc": lookup(after, "facts.forget.mc_acc"),
        "forget_mc_before": lookup(before, "facts.forget.mc_acc"),
        "forget_gen": lookup(after, "facts.forget.gen_acc"),
        "forget_gen_before": lookup(before, "facts.forget.gen_acc"),
        "floor_mc": floor_mc,
        "floor_gen": floor_gen,
        "chance": lookup(before, "facts.floor.chance"),
        "surface_floor": lookup(before, "facts.floor.surface"),
        "forget_removed_mc": removed_mc,
        "forget_removed_gen": removed_gen,
        "forget_removed": sum(removed) / len(removed) if len(removed) == 2 else None,
        "retain_mc": lookup(after, "facts.retain.mc_acc"),
        "retain_mc_before": lookup(before, "facts.retain.mc_acc"),
        "retain_mc_ratio": ratio("facts.retain.mc_acc"),
        "retain_agreement": lookup(after, "facts.retain.agreement"),
        "retain_token_agreement": lookup(after, "facts.retain.token_agreement"),
        "retain_other_mc": lookup(after, "facts.retain.other_subjects.mc_acc"),
        "retain_other_mc_before": lookup(before, "facts.retain.other_subjects.mc_acc"),
        "retain_other_gen": lookup(after, "facts.retain.other_subjects.gen_acc"),
        "retain_other_token_agreement": lookup(
            after, "facts.retain.other_subjects.token_agreement"
        ),
        "retain_same_mc": lookup(after, "facts.retain.same_subjects.mc_acc"),
        "retain_same_mc_before": lookup(before, "facts.retain.same_subjects.mc_acc"),
        "retain_same_gen": lookup(after, "facts.retain.same_subjects.gen_acc"),
        "retain_same_token_agreement": lookup(after, "facts.retain.same_subjects.token_agreement"),
        "perplexity_ratio": ratio("perplexity.perplexity"),
        "fluency_nll_ratio": ratio("fluency.forget.nll"),
        "fluency_nll_vs_fluent_wrong": lookup(after, "fluency.forget.nll_vs_fluent_wrong"),
        "fluency_entropy_ratio": ratio("fluency.forget.entropy"),
        "fluency_repetition": lookup(after, "fluency.forget.repetition"),
        "fluency_repetition_before": lookup(before, "fluency.forget.repetition"),
    }
    for task in tasks if tasks is not None else sorted(after.get("lm_eval") or {}):
        facts[f"{task}_acc"] = lookup(after, f"lm_eval.{task}.acc")
        facts[f"{task}_acc_before"] = lookup(before, f"lm_eval.{task}.acc")
    for name, value in (after.get("muse") or {}).items():
        key = "auc" if name == "privleak" else "rougeL_f1"
        if isinstance(value, dict) and key in value:
            facts[f"{name}_{key}"] = value[key]
            facts[f"{name}_{key}_before"] = lookup(before, f"muse.{name}.{key}")
        if name == "privleak" and isinstance(value, dict):
            facts["privleak"] = value.get("privleak")
    return {k: v for k, v in facts.items() if v is not None}
