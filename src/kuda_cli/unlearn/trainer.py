"""The loop every unlearning method shares, in plain PyTorch.

Per step: `grad_accum` forget micro-batches (and retain ones when the method asks), the method's
loss, backward, clipping, the optional null-space projection around the optimiser step, the
schedule, one row of `train_log.jsonl`. Checkpoints (`checkpoint/`: Hugging Face model and
tokenizer, plus `trainer_state.pt`) are written every `save_every` steps and at the end, through
a temporary directory and a rename, so a kill at any moment leaves the last complete one. A run
that finds a checkpoint in its directory continues from it; data order is a function of
(seed, step), so the resumed run ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kuda_cli import distributed
from kuda_cli.errors import UserError
from kuda_cli.models.precision import autocast
from kuda_cli.unlearn.batches import TokenSet, batch_indices
from kuda_cli.unlearn.methods import Method

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
OLD_CHECKPOINT = f"{CHECKPOINT}.old"  # the previous one, while a new one is written
STATE_FILE = "trainer_state.pt"
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
        self.params: dict[str, torch.nn.Parameter] = {}
        self.projector = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Freeze all but the method's parameters, precompute what the method compares against,
        build the projector. Runs on the starting weights, also when resuming."""
        self.params = self.method.trainable_parameters()
        if not self.params:
            raise UserError(
                "the method selects no trainable parameters; check unlearn.trainable and the layers"
            )
        wanted = set(map(id, self.params.values()))
        for p in self.model.parameters():
            p.requires_grad_(id(p) in wanted)
        self.model.eval()  # dropout off: the loop is deterministic
        self.method.prepare()
        self.projector = self.method.projector(self.params)
        self.optimizer = make_optimizer(self.cfg, list(self.params.values()))
        self.schedule = make_schedule(self.cfg, self.optimizer)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> Path | None:
        if self.out_dir is None:
            return None
        final, old = self.out_dir / CHECKPOINT, self.out_dir / OLD_CHECKPOINT
        if not (final / STATE_FILE).exists() and (old / STATE_FILE).exists():
            if distributed.is_main():
                old.rename(final)  # killed between the two renames of a save
        return final

    def save(self, step: int, last_row: dict[str, Any]) -> None:
        if self.out_dir is None or not distributed.is_main():  # the weights are the same on all
            return
        final = self.checkpoint_dir()
        tmp = self.out_dir / f"{CHECKPOINT}.tmp"
        old = self.out_dir / OLD_CHECKPOINT
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "seed": self.seed,
        }
        torch.save(state, tmp / STATE_FILE)
        (tmp / "trainer_state.json").write_text(
            json.dumps({"step": step, "steps": self.cfg.steps, "last": last_row}, indent=2) + "\n"
        )
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint at step %d in %s", step, final)

    def resume(self) -> int:
        """Load the checkpoint of this run directory if there is one; the step to start at."""
        directory = self.checkpoint_dir()
        if directory is None or not (directory / STATE_FILE).exists():
            if directory is not None and distributed.is_main():
                self._truncate_log(0)  # killed before its first checkpoint: it starts over
            return 0
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=False)
        if set(state["params"]) != set(self.params):
            raise UserError(
                f"{directory} was written for other trainable parameters; start a new run "
                "directory (the config changed)"
            )
        if state["step"] > self.cfg.steps:
            raise UserError(
                f"{directory} is at step {state['step']}, past unlearn.steps={self.cfg.steps}; "
                "start a new run directory"
            )
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if distributed.is_main():
            self._truncate_log(state["step"])
        log.info("resuming from the checkpoint at step %d", state["step"])
        return int(state["step"])

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
        directory = self.checkpoint_dir()
        if directory is not None and (directory / "trainer_state.json").exists():
            saved = json.loads((directory / "trainer_state.json").read_text())["step"]
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
            self.method.initialise(self.params, self.projector)
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
            disable=not self.progress,
        )
        for step in bar:
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for a in range(self.cfg.grad_accum):
                forget, retain = self.batches(step * self.cfg.grad_accum + a)
                with self._autocast():
                    loss, terms = self.method.loss(forget, retain)
                if not torch.isfinite(loss):
                    bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["loss"]
                    raise self._diverged(
                        step, f"the loss is {float(loss.detach())} ({', '.join(bad)})"
                    )
                (loss / self.cfg.grad_accum).backward()
                for k, v in {"loss": float(loss.detach()), **terms}.items():
                    sums[k] = sums.get(k, 0.0) + v / self.cfg.grad_accum
            params = list(self.params.values())
            if distributed.active():  # every process then takes the same step
                distributed.average([p.grad for p in params])
                sums = distributed.mean_values(sums, self.device)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, self.cfg.max_grad_norm or float("inf")
            )
            if self.projector is not None:
                self.projector.before_step()
            self.optimizer.step()
            if self.projector is not None:
                self.projector.after_step()
            lr = self.schedule.get_last_lr()[0]
            self.schedule.step()
            if not all(torch.isfinite(p).all() for p in params):
                raise self._diverged(step, "a trained weight became NaN or infinite")
            row = {
                "step": step + 1,
                **{k: round(v, 6) for k, v in sums.items()},
                "grad_norm": round(float(grad_norm), 6),
                "lr": lr,
                "seconds": round(time.perf_counter() - t0, 4),
            }
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            done = step + 1
            if self.cfg.save_every and done % self.cfg.save_every == 0 and done < self.cfg.steps:
                self.save(done, row)
        bar.close()
        if start < self.cfg.steps or not (self.out_dir and (self.out_dir / CHECKPOINT).exists()):
            self.save(self.cfg.steps, row)
        distributed.shutdown()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return TrainResult(
            steps=self.cfg.steps,
            resumed_from=resumed,
            seconds=round(time.perf_counter() - started, 3),
            last=row,
        )
