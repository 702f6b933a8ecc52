"""The trainer's checkpoints: saving what a resume needs once, finding and loading the newest
one (the layout is unlearn/checkpoint_files.py's). A mixin of `unlearn.trainer.Trainer`, which
provides the model, the trained tensors (`params`, their float32 `master` copies, `optimised`),
the optimiser, the schedule and the run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from kuda_cli import distributed
from kuda_cli.errors import UserError
from kuda_cli.unlearn import checkpoint_files, lora, sharding
from kuda_cli.unlearn.checkpoint_files import CHECKPOINT, STATE_FILE

log = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"


class Checkpointing:
    def _state_json(self, step: int, last_row: dict[str, Any], final: bool) -> dict:
        return {"step": step, "steps": self.cfg.steps, "final": final, "last": last_row}

    def save(self, step: int, last_row: dict[str, Any]) -> None:
        """An intermediate checkpoint: what a resume needs, once (checkpoint_files.py)."""
        if self.out_dir is None:
            return
        target = checkpoint_files.intermediate_dir(self.out_dir, step)
        if self.sharded:
            tmp = target.with_name(f"{target.name}.tmp")
            if distributed.is_main():
                tmp = checkpoint_files.fresh_tmp(target)
            distributed.barrier()
            sharding.save(
                tmp / checkpoint_files.SHARDED_STATE,
                self.model,
                self.optimizer,
                self.cfg.save_optimizer,
            )
            distributed.barrier()
        elif distributed.is_main():  # the weights are the same on all processes
            tmp = checkpoint_files.fresh_tmp(target)
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
            checkpoint_files.write_state_json(tmp, self._state_json(step, last_row, final=False))
            checkpoint_files.put_in_place(tmp, target)
            checkpoint_files.prune(self.out_dir, self.cfg.keep)
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
            tmp = checkpoint_files.fresh_tmp(target)
            self.model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if self.lora:
                lora.save_adapter(self.model, self.params, tmp / lora.ADAPTER_DIR)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
            checkpoint_files.write_state_json(tmp, self._state_json(step, last_row, final=True))
            checkpoint_files.put_in_place(tmp, target)
            checkpoint_files.prune(self.out_dir, 0)
            checkpoint_files.clear_leftovers(self.out_dir)
            log.info("final checkpoint (step %d) in %s", step, target)
        distributed.barrier()

    def resume(self) -> int:
        """Load the newest checkpoint of this run directory if there is one; the step to start
        at (unlearn.steps when the final one is there)."""
        directory = checkpoint_files.latest(self.out_dir) if self.out_dir else None
        if directory is None:
            if self.out_dir is not None and distributed.is_main():
                self._truncate_log(0)  # killed before its first checkpoint: it starts over
            return 0
        if checkpoint_files.is_final(directory):
            return self._resume_final(directory)
        # tensors, numbers and dicts only: a run directory from elsewhere cannot run code here
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        if state["step"] > self.cfg.steps:
            raise UserError(
                f"{directory} is at step {state['step']}, past unlearn.steps={self.cfg.steps}; "
                "start a new run directory"
            )
        if self.sharded:
            with_optimizer = self.cfg.save_optimizer
            sharding.load(
                directory / checkpoint_files.SHARDED_STATE,
                self.model,
                self.optimizer,
                with_optimizer,
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
                values = checkpoint_files.read_model_tensors(directory, names)
            with torch.no_grad():
                for name, value in values.items():
                    self.params[name].copy_(value.to(self.device))
                    if name in self.master:
                        self.master[name].copy_(value)
        log.info("the run finished training: its final checkpoint %s is used", directory)
        return self.cfg.steps

    def _truncate_log(self, step: int) -> None:
        """Keep the log's rows up to `step`; a row cut short by a kill mid-append is dropped."""
        path = self.out_dir / LOG_FILE
        if path.exists():
            kept = [r for r in path.read_text().splitlines() if _row_step(r) <= step]
            path.write_text("".join(r + "\n" for r in kept))


def _row_step(row: str) -> float:
    """The step of a train-log row; infinity for a blank or torn one (never kept)."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
