"""One unlearning run on a loaded model, from the tokenised data to the trained weights: the
method's context (and unlearn.auto_tune's choice of learning rate), the shared trainer, the
starting values of what trains, the gradient conflict at the first batch, training, the whole
model again after a sharded run, and the diagnostics. It returns the records of metrics.json
(`auto_tune`, `train`, `diagnostics`); the stage writes them.

With several processes (a sharded run) every process trains; process 0 alone keeps the starting
values and computes the diagnostics, and is the only one that goes on after training."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kuda_cli import distributed
from kuda_cli.evaluate import STARTING_JUDGE, scored_texts
from kuda_cli.models.loading import LoadedModel, load_model, resolve_cache_root
from kuda_cli.unlearn import auto_tune, sharding
from kuda_cli.unlearn.batches import TokenSet, tokenize, unlearn_texts
from kuda_cli.unlearn.checkpoint_files import CHECKPOINT
from kuda_cli.unlearn.diagnostics import gradient_conflict, heldout_krd, retain_leak, swapped_in
from kuda_cli.unlearn.methods import Method, MethodContext, get_method
from kuda_cli.unlearn.trainer import Trainer, TrainResult, used_indices


@dataclass(frozen=True)
class UnlearnData:
    forget: TokenSet
    retain: TokenSet
    forget_heldout: TokenSet
    retain_heldout: TokenSet


def tokenized_data(cfg: DictConfig, tokenizer) -> UnlearnData:
    """The data's forget and retain texts and their held-out parts, tokenised for unlearning."""
    texts = unlearn_texts(OmegaConf.to_object(cfg.data))
    max_length = cfg.unlearn.max_length
    return UnlearnData(
        forget=tokenize(
            tokenizer,
            texts.forget,
            max_length,
            "forget",
            texts.forget_spans,
            texts.forget_answer_starts,
        ),
        retain=tokenize(
            tokenizer, texts.retain, max_length, "retain", answer_starts=texts.retain_answer_starts
        ),
        forget_heldout=tokenize(
            tokenizer,
            texts.forget_heldout,
            max_length,
            "held-out forget",
            texts.forget_heldout_spans,
        ),
        retain_heldout=tokenize(tokenizer, texts.retain_heldout, max_length, "held-out retain"),
    )


class UnlearnSession:
    """`auto_tune()` (when unlearn.auto_tune.enabled), then `train()`, then the unlearned model
    in `loaded` and `starting_judge()` for its evaluation, then `close()`."""

    def __init__(
        self,
        cfg: DictConfig,
        loaded: LoadedModel,
        layers: list[int],
        data: UnlearnData,
        run_dir: Path,
        model_key: str,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.on_step = on_step  # given each row of train_log.jsonl (the run's tracker)
        self.cfg, self.loaded, self.layers, self.data = cfg, loaded, layers, data
        self.adapter = loaded.adapter
        self.run_dir = Path(run_dir)
        self.ucfg = OmegaConf.to_object(cfg.unlearn)
        self.ctx = self._method_context(model_key)
        self.method: Method | None = None
        self.params: dict[str, Any] = {}  # the trained parameters, after train()
        self.starting: dict[str, Any] = {}  # their starting values, on process 0's CPU

    def _method_context(self, model_key: str) -> MethodContext:
        ucfg, cfg, data = self.ucfg, self.cfg, self.data
        micro_steps = ucfg.steps * ucfg.grad_accum
        return MethodContext(
            model=self.loaded.model,
            adapter=self.adapter,
            tokenizer=self.loaded.tokenizer,
            layers=self.layers,
            cfg=ucfg,
            forget=data.forget,
            retain=data.retain,
            forget_used=used_indices(len(data.forget), ucfg.batch_size, micro_steps, cfg.seed),
            retain_used=used_indices(len(data.retain), ucfg.batch_size, micro_steps, cfg.seed + 1),
            forget_heldout=data.forget_heldout,
            work_dir=self.run_dir,
            cache_dir=resolve_cache_root(cfg.cache_dir),
            model_key=model_key,
            seed=cfg.seed,
            data=OmegaConf.to_object(cfg.data),
            eval_texts=partial(scored_texts, cfg),
        )

    def auto_tune(self) -> dict[str, Any]:
        """Trials from the starting weights choose the learning rate; returns metrics.json's
        `auto_tune`. The caller reseeds before training."""
        trial = auto_tune.trial_trainer(self.ctx, self.data.forget, self.data.retain)
        self.ucfg, tuned = auto_tune.tune(self.ucfg, self.cfg.data, self.ctx, self.run_dir, trial)
        self.ctx = replace(self.ctx, cfg=self.ucfg)
        return tuned

    def train(self) -> dict[str, Any] | None:
        """Train; on process 0, metrics.json's `train` and `diagnostics` (None on the others)."""
        ucfg, model = self.ucfg, self.loaded.model
        method = self.method = get_method(ucfg.method)(self.ctx)
        trainer = Trainer(
            model,
            self.loaded.tokenizer,
            method,
            ucfg,
            self.data.forget,
            self.data.retain,
            out_dir=self.run_dir,
            seed=self.cfg.seed,
            on_step=self.on_step,
        )
        trained_layers = method.trained_layers
        main = distributed.is_main()
        # the starting values of what trains, on process 0's CPU (with unlearn.trainable=[all] a
        # whole model's weights): the starting model for the diagnostics and the fluency judge;
        # taken before a sharded run splits the parameters
        sharded = sharding.wanted(ucfg)
        starting = _cpu_copy(method.trainable_parameters()) if sharded and main else {}
        start_down = {
            layer: self.adapter.down_proj_weight(model, layer).detach().to("cpu", copy=True)
            for layer in (trained_layers if main else [])
        }
        trainer.setup()
        if not sharded and main:
            starting = _cpu_copy(trainer.params)
        conflict = self._gradient_conflict(trainer, sharded)
        result = trainer.train()
        if not main:
            return None
        self.params, self.starting = trainer.params, starting
        if sharded:  # process 0 alone from here: the whole model, from the final checkpoint
            self.loaded = _reload(self.cfg, self.run_dir / CHECKPOINT)
            self.params = {n: p for n, p in self.loaded.model.named_parameters() if n in starting}
        diagnostics = self._diagnostics(sharded)
        train = self._train_record(result, trained_layers, sharded)
        diagnostics["gradient_conflict"] = conflict
        diagnostics["retain_leak"] = retain_leak(
            self.loaded.model,
            self.adapter,
            trained_layers,
            start_down,
            self.data.retain_heldout,
            self._starting_swapped_in,
        )
        return {"train": train, "diagnostics": diagnostics}

    def _gradient_conflict(self, trainer: Trainer, sharded: bool) -> dict[str, Any]:
        """Between the forget loss and the retain NLL at the first batches, before any step."""
        if sharded:
            return {"skipped": "the parameters are sharded (FSDP2)"}
        retain = self.data.retain
        first_forget, _ = trainer.batches(0)
        return gradient_conflict(
            trainer.method,
            trainer.params,
            first_forget,
            retain.batch(list(range(min(len(retain), self.ucfg.batch_size))), self.loaded.device),
            trainer.projector,
        )

    def _diagnostics(self, sharded: bool) -> dict[str, Any]:
        """The method's own diagnostics (unsharded runs) and the held-out forget KRD."""
        diagnostics = self.method.diagnostics(self.params) if not sharded else {}
        if len(self.data.forget_heldout):  # one definition for every method, KUDA's included
            diagnostics["krd"] = heldout_krd(
                self.loaded.model,
                self.adapter,
                self.layers,
                self.data.forget_heldout,
                self._starting_swapped_in,
            )
        return diagnostics

    def _train_record(self, result: TrainResult, trained_layers, sharded: bool) -> dict[str, Any]:
        return {
            "method": self.ucfg.method,
            "layers": trained_layers,
            "trainable_parameters": sum(p.numel() for p in self.params.values()),
            "sharded": sharded,
            "lora": bool(self.ucfg.lora.enabled),
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "seconds": result.seconds,
            "last": result.last,
            **_gpu_memory(self.loaded),
        }

    def _starting_swapped_in(self):
        return swapped_in(self.params, self.starting)

    def starting_judge(self):
        """A judge for the fluency metric: the same model object with the starting weights of the
        trained parameters swapped in for as long as it scores."""

        @contextmanager
        def lend():
            with swapped_in(self.params, self.starting):
                yield self.loaded.model, self.loaded.tokenizer, STARTING_JUDGE

        return lend

    def close(self) -> None:
        self.method.close()


def _gpu_memory(loaded: LoadedModel) -> dict[str, float]:
    """On a GPU: the peak allocated so far (load, originals, spectra, diagnostics, training)
    against the bf16 size of the model's weights (the figure docs/scale.md's memory model
    predicts)."""
    if loaded.device.type != "cuda":
        return {}
    import torch

    peak = torch.cuda.max_memory_allocated(loaded.device)
    bf16 = 2 * sum(p.numel() for p in loaded.model.parameters())
    return {"peak_gpu_gib": round(peak / 2**30, 3), "peak_over_bf16_weights": round(peak / bf16, 3)}


def _cpu_copy(params) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


def _reload(cfg: DictConfig, directory: Path) -> LoadedModel:
    """The model saved in `directory`, loaded as `cfg.model` says (dtype, device)."""
    spec = replace(OmegaConf.to_object(cfg.model), path=str(directory))
    return load_model(spec, cfg.cache_dir)
