"""The loop every unlearning method shares, in plain PyTorch.

Per step: `grad_accum` forget micro-batches (and retain ones when the method asks), the method's
loss, backward, clipping, the optional null-space projection around the optimiser step, the
schedule, one row of `train_log.jsonl`. Intermediate checkpoints (`checkpoint-<step>/`: the
trained tensors, optimiser and schedule) are written every `save_every` steps, the final one
(`checkpoint/`: the Hugging Face model) at the end, each through a temporary directory and a
rename, so a kill at any moment leaves the last complete one (unlearn/checkpoints.py). A run that
finds a checkpoint in its directory continues from it; data order is a function of (seed, step),
so the resumed run ends with the weights an uninterrupted run would have.

Trained tensors of a half-precision model keep float32 master copies (`master_weights`); with
several processes the trained gradients are averaged (`kuda_cli.distributed`), or, when every
parameter trains, the model is sharded with FSDP2 (unlearn/sharding.py); `lora.enabled` trains
peft adapters instead of the weights (unlearn/lora.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kuda_cli import distributed
from kuda_cli.errors import UserError
from kuda_cli.models.precision import autocast
from kuda_cli.unlearn import checkpoints, lora, sharding
from kuda_cli.unlearn.batches import TokenSet, batch_indices
from kuda_cli.unlearn.checkpoints import CHECKPOINT, STATE_FILE
from kuda_cli.unlearn.methods import Method

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "STATE_FILE", "Trainer", "TrainingDiverged"]
LOG_FILE = "train_log.jsonl"


class TrainingDiverged(UserError):
    """The loss (or a weight) became NaN or infinite."""


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    seconds: float
    last: dict[str, float] = field(default_factory=dict)  # the last step's log row


def used_indices(n: int, batch_size: int, micro_steps: int, seed: int) -> list[int]:
    """Every item the trainer will draw in `micro_steps` micro-batches (sorted, unique)."""
    seen: set[int] = set()
    for m in range(micro_steps):
        seen.update(batch_indices(n, batch_size, m, seed))
        if len(seen) == n:
            break
    return sorted(seen)


def make_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_schedule(cfg, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = cfg.warmup_steps, cfg.steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(
        self,
        model,
        tokenizer,
        method: Method,
        cfg,  # kuda_cli.config.UnlearnConfig (or a subclass)
        forget: TokenSet,
        retain: TokenSet,
        *,
        out_dir: Path | None,
        seed: int = 0,
        progress: bool = True,
    ):
        self.model, self.tokenizer, self.method, self.cfg = model, tokenizer, method, cfg
        self.forget, self.retain = forget, retain
        self.out_dir = Path(out_dir) if out_dir else None
        self.seed = seed
        self.progress = progress
        self.device = next(model.parameters()).device
        self.params: dict[str, torch.nn.Parameter] = {}  # the model's trained parameters
        self.master: dict[str, torch.nn.Parameter] = {}  # their float32 copies, where kept
        self.projector = None
        self.sharded = False  # FSDP2 (unlearn.shard): the model's parameters are shards
        self.compute_dtype = next(model.parameters()).dtype
        self.lora = False
        self._collecting = False  # gradients go to the master copies only inside the loop

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Freeze all but the method's parameters, precompute what the method compares against,
        build the projector and the float32 master copies. Runs on the starting weights, also
        when resuming."""
        cfg = self.cfg
        sharding.warn_unused_launch(cfg)
        if sharding.wanted(cfg):
            distributed.init(self.device)
            self.compute_dtype = sharding.shard(self.model, self.method.ctx.adapter)
            self.sharded = True
        if cfg.lora.enabled:
            layers = None if "all" in cfg.trainable else self.method.trained_layers
            self.params = lora.attach(self.model, cfg, layers)
            self.lora = True
        else:
            self.params = self.method.trainable_parameters()
        if not self.params:
            raise UserError(
                "the method selects no trainable parameters; check unlearn.trainable and the layers"
            )
        wanted = set(map(id, self.params.values()))
        for p in self.model.parameters():
            p.requires_grad_(id(p) in wanted)
        self.model.eval()  # dropout off: the loop is deterministic
        with self._autocast():  # what the loss compares against, in the precision it runs in
            self.method.prepare()
        self.projector = self.method.projector(self.params)
        self._make_masters()
        self.optimizer = make_optimizer(self.cfg, list(self.optimised.values()))
        self.schedule = make_schedule(self.cfg, self.optimizer)

    def _make_masters(self) -> None:
        """Float32 copies of trained tensors kept in half precision (unlearn.master_weights):
        each gradient is added into its copy's as soon as backward produces it (and freed), the
        optimiser and the projector update the copy, the model gets it rounded after the step."""
        self.master = {}
        if self.cfg.master_weights and not self.sharded:  # FSDP2's shards are float32 already
            for name, p in self.params.items():
                if p.dtype in (torch.float16, torch.bfloat16):
                    self.master[name] = torch.nn.Parameter(p.detach().float().clone())
                    p.register_post_accumulate_grad_hook(self._to_master(self.master[name]))
        self.optimised = {n: self.master.get(n, p) for n, p in self.params.items()}
        if self.projector is not None:  # the projection acts on the float32 update
            self.projector.projectors = {
                n: (self.optimised[n], p, in_out)
                for n, (_, p, in_out) in self.projector.projectors.items()
            }

    def _to_master(self, master: torch.nn.Parameter):
        def hook(param: torch.Tensor) -> None:
            if not self._collecting:  # a diagnostic's backward: its own hooks read the grads
                return
            grad = param.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None

        return hook

    @torch.no_grad()
    def _sync_from_masters(self) -> None:
        for name, master in self.master.items():
            self.params[name].copy_(master)

    # ------------------------------------------------------------------ checkpoints
    def _state_json(self, step: int, last_row: dict[str, Any], final: bool) -> dict:
        return {"step": step, "steps": self.cfg.steps, "final": final, "last": last_row}

    def save(self, step: int, last_row: dict[str, Any]) -> None:
        """An intermediate checkpoint: what a resume needs, once (checkpoints.py)."""
        if self.out_dir is None:
            return
        target = checkpoints.intermediate_dir(self.out_dir, step)
        if self.sharded:
            tmp = target.with_name(f"{target.name}.tmp")
            if distributed.is_main():
                tmp = checkpoints.fresh_tmp(target)
            distributed.barrier()
            sharding.save(
                tmp / checkpoints.SHARDED_STATE,
                self.model,
                self.optimizer,
                self.cfg.save_optimizer,
            )
            distributed.barrier()
        elif distributed.is_main():  # the weights are the same on all processes
            tmp = checkpoints.fresh_tmp(target)
        if distributed.is_main():
            state = {
                "step": step,
                "schedule": self.schedule.state_dict(),
                "seed": self.seed,
            }
            if not self.sharded:
                state["params"] = {n: t.detach().cpu() for n, t in self.optimised.items()}
                if self.cfg.save_optimizer:
                    state["optimizer"] = self.optimizer.state_dict()
            torch.save(state, tmp / STATE_FILE)
            checkpoints.write_state_json(tmp, self._state_json(step, last_row, final=False))
            checkpoints.put_in_place(tmp, target)
            checkpoints.prune(self.out_dir, self.cfg.keep)
            log.info("checkpoint at step %d in %s", step, target)
        distributed.barrier()

    def save_final(self, step: int, last_row: dict[str, Any]) -> None:
        """The final checkpoint: the Hugging Face model (merged, for LoRA), nothing else that
        is large; the intermediate ones are removed once it is in place."""
        if self.out_dir is None:
            return
        state_dict = None
        if self.sharded:  # gathered to process 0's CPU, in the dtype the model was loaded in
            state_dict = sharding.full_state_dict(self.model, self.compute_dtype)
        elif self.lora:
            state_dict = lora.merged_state_dict(self.model)
        if distributed.is_main():
            target = self.out_dir / CHECKPOINT
            tmp = checkpoints.fresh_tmp(target)
            self.model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if self.lora:
                lora.save_adapter(self.model, self.params, tmp / lora.ADAPTER_DIR)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
            checkpoints.write_state_json(tmp, self._state_json(step, last_row, final=True))
            checkpoints.put_in_place(tmp, target)
            checkpoints.prune(self.out_dir, 0)
            checkpoints.clear_leftovers(self.out_dir)
            log.info("final checkpoint (step %d) in %s", step, target)
        distributed.barrier()

    def resume(self) -> int:
        """Load the newest checkpoint of this run directory if there is one; the step to start
        at (unlearn.steps when the final one is there)."""
        directory = checkpoints.latest(self.out_dir) if self.out_dir else None
        if directory is None:
            if self.out_dir is not None and distributed.is_main():
                self._truncate_log(0)  # killed before its first checkpoint: it starts over
            return 0
        if checkpoints.is_final(directory):
            return self._resume_final(directory)
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=False)
        if state["step"] > self.cfg.steps:
            raise UserError(
                f"{directory} is at step {state['step']}, past unlearn.steps={self.cfg.steps}; "
                "start a new run directory"
            )
        if self.sharded:
            with_optimizer = self.cfg.save_optimizer
            sharding.load(
                directory / checkpoints.SHARDED_STATE, self.model, self.optimizer, with_optimizer
            )
        else:
            if set(state["params"]) != set(self.params):
                raise UserError(
                    f"{directory} was written for other trainable parameters; start a new run "
                    "directory (the config changed)"
                )
            with torch.no_grad():
                for name, value in state["params"].items():
                    self.optimised[name].copy_(value.to(self.device))
            self._sync_from_masters()
            if state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                log.warning(
                    "%s holds no optimiser state (unlearn.save_optimizer=false): the optimiser "
                    "starts afresh, so the result differs from an uninterrupted run",
                    directory,
                )
        self.schedule.load_state_dict(state["schedule"])
        if distributed.is_main():
            self._truncate_log(state["step"])
        log.info("resuming from the checkpoint at step %d", state["step"])
        return int(state["step"])

    def _resume_final(self, directory: Path) -> int:
        """A finished run (killed while evaluating): the trained tensors from its final model;
        a sharded run's process 0 reloads the whole model from it instead (the stage)."""
        if not self.sharded:
            names = list(self.params)
            if self.lora:
                values = lora.read_adapter(directory, names)
            else:
                values = checkpoints.read_model_tensors(directory, names)
            with torch.no_grad():
                for name, value in values.items():
                    self.params[name].copy_(value.to(self.device))
                    if name in self.master:
                        self.master[name].copy_(value)
        log.info("the run finished training: its final checkpoint %s is used", directory)
        return self.cfg.steps

    def _truncate_log(self, step: int) -> None:
        path = self.out_dir / LOG_FILE
        if path.exists():
            rows = [r for r in path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r)["step"] <= step]
            path.write_text("".join(r + "\n" for r in kept))

    # ------------------------------------------------------------------ the loop
    def _autocast(self):
        return autocast(self.cfg.precision, self.device)

    def batches(self, micro_step: int) -> tuple[dict, dict | None]:
        bs = self.cfg.batch_size
        # several processes: each takes its share of the batch (distributed.shard)
        forget = self.forget.batch(
            distributed.shard(batch_indices(len(self.forget), bs, micro_step, self.seed)),
            self.device,
        )
        retain = None
        if self.method.needs_retain:
            indices = batch_indices(len(self.retain), bs, micro_step, self.seed + 1)
            retain = self.retain.batch(distributed.shard(indices), self.device)
        return forget, retain

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        directory = checkpoints.latest(self.out_dir) if self.out_dir else None
        if directory is not None:
            saved = checkpoints.read_state_json(directory)["step"]
            kept = f"the last good checkpoint (step {saved}) is kept in {directory}"
        else:
            kept = "no checkpoint was written yet (unlearn.save_every=N saves every N steps)"
        return TrainingDiverged(
            f"training diverged at step {step + 1}: {what}; lower unlearn.lr or set "
            f"unlearn.max_grad_norm; {kept}"
        )

    def train(self) -> TrainResult:
        if not self.params:
            self.setup()
        distributed.init(self.device)
        start = self.resume()
        if start == 0:
            self.method.initialise(self.optimised, self.projector)
            self._sync_from_masters()
        resumed = start if start else None
        started = time.perf_counter()
        log_path = self.out_dir / LOG_FILE if self.out_dir and distributed.is_main() else None
        row: dict[str, Any] = {}
        bar = tqdm(
            range(start, self.cfg.steps),
            initial=start,
            total=self.cfg.steps,
            desc=f"unlearn ({self.method.name})",
            unit="step",
            disable=not self.progress or not distributed.is_main(),
        )
        optimised = list(self.optimised.values())
        self._collecting = True
        try:
            for step in bar:
                row = self._step(step, optimised, time.perf_counter())
                if log_path is not None:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                done = step + 1
                if (
                    self.cfg.save_every
                    and done % self.cfg.save_every == 0
                    and done < self.cfg.steps
                ):
                    self.save(done, row)
        finally:
            self._collecting = False
        bar.close()
        if self.out_dir is not None and not checkpoints.is_final(self.out_dir / CHECKPOINT):
            self.save_final(self.cfg.steps, row)
        distributed.shutdown()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return TrainResult(
            steps=self.cfg.steps,
            resumed_from=resumed,
            seconds=round(time.perf_counter() - started, 3),
            last=row,
        )

    def _step(self, step: int, optimised: list[torch.Tensor], t0: float) -> dict[str, Any]:
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for a in range(self.cfg.grad_accum):
            forget, retain = self.batches(step * self.cfg.grad_accum + a)
            with self._autocast():
                loss, terms = self.method.loss(forget, retain)
            if distributed.any_rank(not torch.isfinite(loss), self.device):
                bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["loss"]
                raise self._diverged(step, f"the loss is {float(loss.detach())} ({', '.join(bad)})")
            (loss / self.cfg.grad_accum).backward()
            for k, v in {"loss": float(loss.detach()), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v / self.cfg.grad_accum
        if distributed.active():  # every process then takes the same step
            if not self.sharded:  # FSDP2 has reduce-scattered the sharded gradients itself
                distributed.average([p.grad for p in optimised])
            sums = distributed.mean_values(sums, self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            optimised, self.cfg.max_grad_norm or float("inf")
        )
        if self.projector is not None:
            self.projector.before_step()
        self.optimizer.step()
        if self.projector is not None:
            self.projector.after_step()
        self._sync_from_masters()
        lr = self.schedule.get_last_lr()[0]
        self.schedule.step()
        finite = all(bool(torch.isfinite(_local(p)).all()) for p in optimised)
        if distributed.any_rank(not finite, self.device):
            raise self._diverged(step, "a trained weight became NaN or infinite")
        return {
            "step": step + 1,
            **{k: round(v, 6) for k, v in sums.items()},
            "grad_norm": round(sharding.plain(grad_norm), 6),
            "lr": lr,
            "seconds": round(time.perf_counter() - t0, 4),
        }


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
