"""Task Vector (task arithmetic, Ilharco et al. 2023) as MUSE runs it: fine-tune the starting
model on the forget texts (gradient descent on NLL_forget: the *reinforced* model), then move the
starting weights against what the fine-tune added,

    theta_unlearned = theta_start - alpha * (theta_reinforced - theta_start)

The trainer's steps are the reinforcement. `prepare` keeps the starting values of the trained
tensors on the host, in their own dtype (exact: the float32 master copies start from them), and
`finalise`, after the last step, replaces each trained tensor by the formula above in float32.
Intermediate checkpoints hold reinforced weights (a resume goes on reinforcing), the final one the
unlearned weights (the trainer does not finalise a run resumed from it). Tensors that do not train
keep their values; with `trainable: [all]` (the default) that is MUSE's negation of every
floating-point tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuda_cli.config import UnlearnConfig, bounded, listed
from kuda_cli.unlearn.methods import Method, register_method, sequence_nll


def negated_update(start: torch.Tensor, trained: torch.Tensor, alpha: float) -> torch.Tensor:
    """`start - alpha * (trained - start)`: the starting weights minus the scaled task vector."""
    return start - alpha * (trained - start)


def _shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of an FSDP2-sharded tensor (a DTensor), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@dataclass
class TaskVectorMethod(UnlearnConfig):
    method: str = "task_vector"
    lr: float = bounded(1e-5, gt=0)  # the reinforcement's (MUSE: 1e-5)
    trainable: list[str] = listed("all", distinct=True)
    # the negated task vector's scale: MUSE's code defaults to 1, its news and books scripts pass 5
    alpha: float = bounded(1.0, gt=0)


@register_method("task_vector", TaskVectorMethod)
class TaskVector(Method):
    display_name = "Task Vector"
    supports_lora = False
    lora_refusal = (
        "negates each trained tensor's update (negated LoRA factors do not negate their product)"
    )

    def prepare(self) -> None:
        self.start = {
            name: _shard(param).detach().to("cpu", copy=True)
            for name, param in self.trainable_parameters().items()
        }

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        nll = sequence_nll(self.ctx.model, forget)
        return nll, {"forget_nll": float(nll.detach())}

    @torch.no_grad()
    def finalise(self, params: dict[str, torch.Tensor]) -> None:
        for name, param in params.items():
            trained = _shard(param)
            start = self.start[name].to(trained.device, torch.float32)
            trained.copy_(negated_update(start, trained.float(), self.cfg.alpha))

    def close(self) -> None:
        self.start = {}
