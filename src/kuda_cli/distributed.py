"""Several processes, one per GPU (`accelerate launch` or `torchrun`), training one run.

Data parallel with replicated weights: every process holds the whole model, trains on its slice
of each batch, and the trained parameters' gradients are averaged across processes before the
optimiser step, so every process takes the same step. Process 0 alone writes the run directory
(config, meta, metrics, log, checkpoint) and evaluates after training. KUDA and RMU train three
`down_proj` matrices: the all-reduce moves those gradients only. Runs that train every parameter
shard it with FSDP2 instead (kuda_cli.unlearn.sharding).

Nothing here does anything in a single process (`WORLD_SIZE` unset or 1): the default path is
unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

# Process 0 evaluates the starting model while the others wait at the first all-reduce.
TIMEOUT = timedelta(hours=6)


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def environment_problem() -> str | None:
    """What is wrong with the launcher's variables, in one line, or None. A stray `RANK=1`
    without `WORLD_SIZE` (left by a job script, or a shell that ran torchrun) would make this
    process a silent non-main rank of a one-process run: nothing would be written."""
    for name in LAUNCH_VARIABLES:
        value = os.environ.get(name, "")
        if value and not value.isdigit():
            return f"{name}={value!r} is not a whole number; unset it or launch with torchrun"
    size = int(os.environ.get("WORLD_SIZE") or 1)
    if size < 1:
        return "WORLD_SIZE=0; unset it, or launch with accelerate launch / torchrun"
    for name in ("RANK", "LOCAL_RANK"):
        index = int(os.environ.get(name) or 0)
        if index >= size:
            return (
                f"{name}={index} is set but WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}: "
                f"a stray launcher variable; unset {name} (one process), or launch with "
                "accelerate launch / torchrun"
            )
    return None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """This process's index; 0 in a one-process run whatever a stray `RANK` says."""
    return int(os.environ.get("RANK", "0") or 0) if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def active() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init(device) -> None:
    """Join the process group (NCCL on CUDA, Gloo on the CPU) once."""
    import torch.distributed as dist

    if not active() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)


def shard(indices: list[int]) -> list[int]:
    """This process's share of a batch's items."""
    return indices[rank() :: world_size()] if active() else indices


def average(tensors: list) -> None:
    """Replace each tensor by its mean over the processes."""
    import torch
    import torch.distributed as dist

    tensors = [t for t in tensors if t is not None]
    if not active() or not tensors:
        return
    with torch.no_grad():
        # one tensor at a time, in place where it is float32: no whole-model buffer
        for t in tensors:
            work = t if t.dtype == torch.float32 else t.float()
            dist.all_reduce(work)
            work /= world_size()
            if work is not t:
                t.copy_(work)


def any_rank(flag: bool, device) -> bool:
    """Whether `flag` holds on any process (so that all of them stop together)."""
    import torch

    if not active():
        return bool(flag)
    import torch.distributed as dist

    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def mean_values(values: dict[str, float], device) -> dict[str, float]:
    """The per-process numbers of a log row, averaged over the processes."""
    import torch

    if not active() or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    average([tensor])
    return dict(zip(values, tensor.tolist(), strict=True))


def barrier() -> None:
    import torch.distributed as dist

    if active() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if active() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
