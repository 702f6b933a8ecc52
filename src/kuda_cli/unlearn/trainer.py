"""The loop every unlearning method shares, in plain PyTorch.

Per step: `grad_accum` forget micro-batches (and retain ones when the method asks), the method's
loss, backward, clipping, the optional null-space projection around the optimiser step, the
schedule, one row of `train_log.jsonl`; after the last step, the method's `finalise` (a last
change of the trained weights, e.g. negating what training added). Intermediate checkpoints
(`checkpoint-<step>/`: the trained tensors, optimiser and schedule) are written every
`save_every` steps, the final one (`checkpoint/`: the Hugging Face model) at the end, each
through a temporary directory and a rename, so a kill at any moment leaves the last complete one
(unlearn/checkpoint_files.py). A run that finds a checkpoint in its directory continues from it;
data order is a function of (seed, step), so the resumed run ends with the weights an
uninterrupted run would have.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kuda_cli import distributed
from kuda_cli.errors import UserError
from kuda_cli.models.precision import autocast
from kuda_cli.unlearn import checkpoint_files, lora, sharding
from kuda_cli.unlearn.batches import TokenSet, batch_indices
from kuda_cli.unlearn.checkpoint_files import CHECKPOINT, STATE_FILE
from kuda_cli.unlearn.methods import Method
from kuda_cli.unlearn.trainer_checkpoints import LOG_FILE, Checkpointing

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "LOG_FILE", "STATE_FILE", "Trainer", "TrainingDiverged"]


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


class Trainer(Checkpointing):
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
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.model, self.tokenizer, self.method, self.cfg = model, tokenizer, method, cfg
        self.forget, self.retain = forget, retain
        self.out_dir = Path(out_dir) if out_dir else None
        self.seed = seed
        self.progress = progress
        self.on_step = on_step  # given each log row after it is written (a tracker)
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
        directory = checkpoint_files.latest(self.out_dir) if self.out_dir else None
        if directory is not None:
            saved = checkpoint_files.read_state_json(directory)["step"]
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
                    if self.on_step is not None:
                        self.on_step(row)
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
        if start < self.cfg.steps:  # a run resumed from its final checkpoint has finalised
            self._finalise()
        if self.out_dir is not None and not checkpoint_files.is_final(self.out_dir / CHECKPOINT):
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

    @torch.no_grad()
    def _finalise(self) -> None:
        """The method's change to the trained weights after the last step, on the optimised
        tensors; the model gets them rounded, as after a step."""
        self.method.finalise(self.optimised)
        self._sync_from_masters()

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
            self.projector.step(self.optimizer)
        else:
            self.optimizer.step()
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
