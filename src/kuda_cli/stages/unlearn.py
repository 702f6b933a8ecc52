"""kuda unlearn: locate the layers, evaluate the starting model (cached), unlearn with the chosen
method on the shared trainer, compute the diagnostics, evaluate the result; one run directory."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kuda_cli import distributed
from kuda_cli.cache import model_fingerprint
from kuda_cli.evaluate import STARTING_JUDGE
from kuda_cli.evaluate.runner import evaluate, evaluate_before
from kuda_cli.evaluate.side_by_side import write_side_by_side
from kuda_cli.evaluate.summary import summarise
from kuda_cli.locate.pipeline import find_layers
from kuda_cli.models.loading import LoadedModel, load_model, resolve_cache_root
from kuda_cli.run import Run, set_seed
from kuda_cli.stages.common import load_configured_model, recorded
from kuda_cli.unlearn import auto_tune, sharding
from kuda_cli.unlearn.batches import tokenize, unlearn_texts
from kuda_cli.unlearn.checkpoints import CHECKPOINT
from kuda_cli.unlearn.diagnostics import gradient_conflict, heldout_krd, retain_leak, swapped_in
from kuda_cli.unlearn.methods import MethodContext, get_method
from kuda_cli.unlearn.trainer import Trainer, used_indices
from kuda_cli.validate import validate_layers_against

log = logging.getLogger(__name__)


def main(cfg: DictConfig, run: Run) -> None:
    get_method(cfg.unlearn.method)  # an unimplemented method stops before any work
    loaded = load_configured_model(cfg, run)
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    ucfg = OmegaConf.to_object(cfg.unlearn)
    model_key = model_fingerprint(model)
    layers = recorded(run, find_layers(cfg, loaded, run.dir, model_key))
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
