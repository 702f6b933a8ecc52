"""kuda unlearn: locate the layers, evaluate the starting model (cached), unlearn with the chosen
method on the shared trainer, compute the diagnostics, evaluate the result; one run directory."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from shutil import ignore_patterns
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kuda_cli import distributed
from kuda_cli.cache import (
    MANIFEST,
    entry_lock,
    model_fingerprint,
    publish,
    staging_dir,
    verify_manifest,
    write_json_atomic,
)
from kuda_cli.errors import UserError
from kuda_cli.evaluate import STARTING_JUDGE, EvalContext, compute_metrics
from kuda_cli.evaluate.floors import forget_removed
from kuda_cli.evaluate.side_by_side import write_side_by_side
from kuda_cli.locate.layers import LAYERS_FILE, TRACE_DIR, read_layers
from kuda_cli.models.loading import LoadedModel, load_model, resolve_cache_root
from kuda_cli.run import Run, lookup, set_seed
from kuda_cli.stages.common import load_configured_model, locate_layers
from kuda_cli.unlearn import auto_tune, sharding
from kuda_cli.unlearn.batches import tokenize, unlearn_texts
from kuda_cli.unlearn.checkpoints import CHECKPOINT
from kuda_cli.unlearn.diagnostics import gradient_conflict, heldout_krd, retain_leak, swapped_in
from kuda_cli.unlearn.methods import MethodContext, get_method
from kuda_cli.unlearn.trainer import Trainer, used_indices
from kuda_cli.validate import validate_layers_against

log = logging.getLogger(__name__)
BEFORE = "before"
# eval.facts settings that change only what the unlearned model is scored on
AFTER_ONLY = ("floors", "retain_greedy")


def resolve_layers(cfg: DictConfig, loaded: LoadedModel, run: Run, model_key: str) -> list[int]:
    own = run.dir / TRACE_DIR / LAYERS_FILE  # written only by tracing: never with locate=fixed
    if not cfg.locate.from_run and own.exists():  # a resumed run: tracing is not redone...
        try:
            layers = read_layers(str(run.dir), loaded.num_layers, model_key, same_weights=True)
            log.info("resumed run: the layers this run traced before")
            return layers
        except UserError as err:  # ...unless what it wrote cannot be trusted
            log.warning("this run's earlier trace cannot be reused (%s): tracing again", err)
    return locate_layers(cfg, loaded, run.dir, run, model_key)


def main(cfg: DictConfig, run: Run) -> None:
    get_method(cfg.unlearn.method)  # an unimplemented method stops before any work
    loaded = load_configured_model(cfg, run)
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    ucfg = OmegaConf.to_object(cfg.unlearn)
    model_key = model_fingerprint(model)
    layers = resolve_layers(cfg, loaded, run, model_key)
    validate_layers_against(OmegaConf.merge(cfg, {"locate": {"layers": layers}}), loaded.num_layers)
    run.log_metrics({"locate": {"method": cfg.locate.method, "layers": layers}})

    texts = unlearn_texts(OmegaConf.to_object(cfg.data))
    forget = tokenize(tokenizer, texts.forget, ucfg.max_length, "forget", texts.forget_spans)
    retain = tokenize(tokenizer, texts.retain, ucfg.max_length, "retain")
    forget_heldout = tokenize(
        tokenizer,
        texts.forget_heldout,
        ucfg.max_length,
        "held-out forget",
        texts.forget_heldout_spans,
    )
    retain_heldout = tokenize(tokenizer, texts.retain_heldout, ucfg.max_length, "held-out retain")

    before = evaluate_before(cfg, loaded, run, model_key) if cfg.eval.metrics else None

    micro_steps = ucfg.steps * ucfg.grad_accum
    ctx = MethodContext(
        model=model,
        adapter=adapter,
        tokenizer=tokenizer,
        layers=layers,
        cfg=ucfg,
        forget=forget,
        retain=retain,
        forget_used=used_indices(len(forget), ucfg.batch_size, micro_steps, cfg.seed),
        retain_used=used_indices(len(retain), ucfg.batch_size, micro_steps, cfg.seed + 1),
        forget_heldout=forget_heldout,
        work_dir=run.dir,
        cache_dir=resolve_cache_root(cfg.cache_dir),
        model_key=model_key,
        seed=cfg.seed,
    )
    if ucfg.auto_tune.enabled:  # trials from the starting weights choose the learning rate
        ucfg, tuned = auto_tune.tune(
            ucfg, cfg.data, ctx, run.dir, auto_tune.trial_trainer(ctx, forget, retain)
        )
        ctx = replace(ctx, cfg=ucfg)
        run.log_metrics({"auto_tune": tuned})
        set_seed(cfg.seed)
    method = get_method(ucfg.method)(ctx)
    trainer = Trainer(
        model, tokenizer, method, ucfg, forget, retain, out_dir=run.dir, seed=cfg.seed
    )
    trained_layers = method.trained_layers
    main = distributed.is_main()  # several processes: process 0 evaluates and writes the rest
    # the starting values of what trains, on process 0's CPU (with unlearn.trainable=[all] a
    # whole model's weights): the starting model for the diagnostics and the fluency judge;
    # taken before a sharded run splits the parameters
    sharded = sharding.wanted(ucfg)
    starting = _cpu_copy(method.trainable_parameters()) if sharded and main else {}
    start_down = {
        layer: adapter.down_proj_weight(model, layer).detach().to("cpu", copy=True)
        for layer in (trained_layers if main else [])
    }
    trainer.setup()
    if not sharded and main:
        starting = _cpu_copy(trainer.params)
    if sharded:
        conflict = {"skipped": "the parameters are sharded (FSDP2)"}
    else:
        first_forget, _ = trainer.batches(0)
        conflict = gradient_conflict(
            method,
            trainer.params,
            first_forget,
            retain.batch(list(range(min(len(retain), ucfg.batch_size))), loaded.device),
            trainer.projector,
        )
    result = trainer.train()
    if not main:
        return
    params = trainer.params
    if sharded:  # process 0 alone from here: the whole model, from the final checkpoint
        loaded = _reload(cfg, run.dir / CHECKPOINT)
        model = loaded.model
        params = {n: p for n, p in model.named_parameters() if n in starting}
    diagnostics = method.diagnostics(params) if not sharded else {}
    if len(forget_heldout):  # one definition for every method, KUDA's included
        diagnostics["krd"] = heldout_krd(
            model,
            adapter,
            layers,
            forget_heldout,
            lambda: swapped_in(params, starting),
        )
    run.log_metrics(
        {
            "train": {
                "method": ucfg.method,
                "layers": trained_layers,
                "trainable_parameters": sum(p.numel() for p in params.values()),
                "sharded": sharded,
                "lora": bool(ucfg.lora.enabled),
                "steps": result.steps,
                "resumed_from": result.resumed_from,
                "seconds": result.seconds,
                "last": result.last,
                **_gpu_memory(loaded, model),
            },
            "diagnostics": {
                **diagnostics,
                "gradient_conflict": conflict,
                "retain_leak": retain_leak(
                    model,
                    adapter,
                    trained_layers,
                    start_down,
                    retain_heldout,
                    lambda: swapped_in(params, starting),
                ),
            },
        }
    )
    method.close()
    if cfg.eval.metrics:
        after = evaluate(
            cfg,
            loaded,
            run.dir,
            before,
            judge=starting_model_judge(loaded, params, starting),
        )
        run.log_metrics(after)
        if before is not None:
            tasks = list(cfg.eval.wmdp.tasks) if "lm_eval" in cfg.eval.metrics else None
            run.log_metrics({"summary": summarise(before, after, tasks)})
            log.info("summary: %s", json.dumps(run.metrics["summary"]))
            table = write_side_by_side(run.dir)
            if table is not None:
                print(f"\nGreedy answers before and after ({run.dir / 'answers.md'}):\n{table}\n")


def _gpu_memory(loaded: LoadedModel, model) -> dict[str, float]:
    """On a GPU: the peak allocated so far (load, originals, spectra, diagnostics, training)
    against the bf16 size of the model's weights (the figure docs/scale.md's memory model
    predicts)."""
    if loaded.device.type != "cuda":
        return {}
    import torch

    peak = torch.cuda.max_memory_allocated(loaded.device)
    bf16 = 2 * sum(p.numel() for p in model.parameters())
    return {"peak_gpu_gib": round(peak / 2**30, 3), "peak_over_bf16_weights": round(peak / bf16, 3)}


def _cpu_copy(params) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


def _reload(cfg: DictConfig, directory: Path) -> LoadedModel:
    """The model saved in `directory`, loaded as `cfg.model` says (dtype, device)."""
    spec = replace(OmegaConf.to_object(cfg.model), path=str(directory))
    return load_model(spec, cfg.cache_dir)


def starting_model_judge(loaded: LoadedModel, params, starting):
    """A judge for the fluency metric: the same model object with the starting weights of the
    trained parameters swapped in for as long as it scores."""

    @contextmanager
    def lend():
        with swapped_in(params, starting):
            yield loaded.model, loaded.tokenizer, STARTING_JUDGE

    return lend


def evaluate(cfg, loaded, out_dir: Path, before, *, judge=None, starting=False):
    """The metrics of `cfg.eval` on the loaded model. The starting model (`starting`) is
    scored on every figure a comparison needs (floors, retain answers: the reference); the
    unlearned one against it, without the floors (they belong to the starting model)."""
    eval_cfg = OmegaConf.to_object(cfg.eval)
    if starting:
        eval_cfg.facts = replace(eval_cfg.facts, floors=True, retain_greedy=True)
    else:
        eval_cfg.facts = replace(eval_cfg.facts, floors=False)
    if before is not None and before.get("reference") and not eval_cfg.facts.reference:
        eval_cfg.facts = replace(eval_cfg.facts, reference=before["reference"])
    ctx = EvalContext(
        loaded=loaded,
        eval=eval_cfg,
        data=OmegaConf.to_object(cfg.data),
        out_dir=out_dir,
        cache_dir=cfg.cache_dir,
        judge=judge,
    )
    results: dict[str, Any] = {}
    for _, found in compute_metrics(ctx):
        results.update(found)
    return results


def _before_key(cfg: DictConfig, model_key: str) -> str:
    evaluation = OmegaConf.to_container(cfg.eval, resolve=True)
    for key in AFTER_ONLY:  # the starting model is scored on all of them whatever they say
        evaluation["facts"].pop(key, None)
    blob = json.dumps(
        {
            "model": model_key,
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "eval": evaluation,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_before(cfg: DictConfig, loaded, run: Run, model_key: str) -> dict[str, Any] | None:
    """The starting model's metrics, in `before/` of the run directory and under `before` in
    metrics.json; cached under the cache root per (model, data, eval settings)."""
    if not cfg.eval.before or not distributed.is_main():
        return None
    out = run.dir / BEFORE
    key = _before_key(cfg, model_key)
    cached = resolve_cache_root(cfg.cache_dir) / "evals" / key
    # one process evaluates, the others sharing the cache wait and read its checked copy
    with entry_lock(cached):
        problem = verify_manifest(cached) if cached.exists() else "absent"
        if problem is None:
            log.info("starting model's evaluation from the cache %s", cached)
            shutil.copytree(cached, out, dirs_exist_ok=True, ignore=ignore_patterns(MANIFEST))
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            if problem != "absent":
                log.warning("cached evaluation %s cannot be trusted (%s): redone", cached, problem)
            shutil.rmtree(out, ignore_errors=True)  # nothing of an earlier attempt is cached
            out.mkdir(parents=True)
            metrics = evaluate(cfg, loaded, out, None, starting=True)
            write_json_atomic(out / "metrics.json", metrics)
            tmp = staging_dir(cached)
            shutil.copytree(out, tmp, dirs_exist_ok=True)
            publish(tmp, cached, {"key": key, "model": cfg.model.name, "data": cfg.data.name})
    run.log_metrics({"before": metrics})
    answers = out / "facts_answers.jsonl"
    return {**metrics, "reference": str(answers) if answers.exists() else None}


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
