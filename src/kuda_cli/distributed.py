"""Several processes, one per GPU (`accelerate launch` or `torchrun`), training one run.

Data parallel with replicated weights: every process holds the whole model, trains on its slice
of each batch, and the trained parameters' gradients are averaged across processes before the
optimiser step, so every process takes the same step. Process 0 alone writes the run directory
(config, meta, metrics, log, checkpoint) and evaluates after training. KUDA and RMU train three
`down_proj` matrices: the all-reduce moves those gradients only.

Nothing here does anything in a single process (`WORLD_SIZE` unset or 1): the default path is
unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

# Process 0 evaluates the starting model while the others wait at the first all-reduce.
TIMEOUT = timedelta(hours=6)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


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
    """Replace each tensor by its mean over the processes (one all-reduce for all of them)."""
    import torch
    import torch.distributed as dist

    tensors = [t for t in tensors if t is not None]
    if not active() or not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()


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
