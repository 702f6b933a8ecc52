"""Full-parameter training on several GPUs: PyTorch FSDP2 (`fully_shard`), the engine under
accelerate's FSDP2 plugin and torchtitan.

With `unlearn.trainable=[all]` and several processes (`unlearn.shard=auto`), every decoder layer
and the root module are sharded over the processes: each holds 1/N of the parameters, their
gradients and AdamW's states, in float32 (the master weights), and all-gathers one layer's
parameters in the model's dtype (bf16 at 7B) for its forward and backward
(`MixedPrecisionPolicy(param_dtype=<model dtype>, reduce_dtype=float32)`). Gradients are
reduce-scattered and averaged by FSDP itself. Intermediate checkpoints are
`torch.distributed.checkpoint` directories (every process writes its shard); the final one is
gathered to process 0 on the CPU and saved as a Hugging Face model.

Layer-restricted methods (KUDA, RMU: three `down_proj` matrices) keep the replicated data-parallel
path of `kuda_cli.distributed`, which moves those gradients only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from kuda_cli import distributed
from kuda_cli.models.adapter import Adapter

log = logging.getLogger(__name__)


def shards(cfg, processes: int) -> bool:
    """Whether a run of `cfg` over `processes` processes is sharded: `shard=auto` with several
    processes training every parameter (LoRA adapters are small: they replicate)."""
    return cfg.shard == "auto" and processes > 1 and "all" in cfg.trainable and not cfg.lora.enabled


def wanted(cfg) -> bool:
    """Whether this run shards, over the processes it was launched with."""
    return shards(cfg, distributed.world_size())


def launch_options() -> dict[str, bool]:
    """What an accelerate FSDP launch config (scripts/accelerate/fsdp2.yaml) asks of the
    sharding, from the environment `accelerate launch` sets: reshard after forward (ZeRO-3
    style, the default) and activation checkpointing (off by default)."""

    def flag(name: str, default: bool) -> bool:
        value = os.environ.get(name)
        return default if value is None else value.strip().lower() in ("1", "true", "yes")

    return {
        "reshard_after_forward": flag("FSDP_RESHARD_AFTER_FORWARD", True),
        "activation_checkpointing": flag("FSDP_ACTIVATION_CHECKPOINTING", False),
    }


def warn_unused_launch(cfg) -> None:
    """An FSDP launch for a run that replicates (KUDA, RMU, LoRA): said once, not silently."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not wanted(cfg):
        log.warning(
            "launched with an FSDP config, but this run replicates the model (only "
            "unlearn.trainable=[all] without LoRA is sharded); the launch settings are unused"
        )


def shard(model: nn.Module, adapter: Adapter) -> torch.dtype:
    """Shard `model` in place (decoder layers, then the root); returns the dtype its parameters
    had, in which forward passes run. The float32 copies are made one layer at a time, after
    that layer is sharded, so no process holds a whole float32 model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    options = launch_options()
    if options["activation_checkpointing"] and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [adapter.module(model, "layer", i) for i in range(adapter.num_layers(model))]
    for layer in layers:
        layer.to(torch.float32)  # sharded next: the float32 shards are the master weights
        fully_shard(layer, mp_policy=policy, reshard_after_forward=options["reshard_after_forward"])
    model.to(torch.float32)  # the rest (embeddings, final norm, head); the layers already are
    fully_shard(model, mp_policy=policy)
    log.info(
        "FSDP2: %d decoder layers and the root sharded over %d processes (compute in %s)",
        len(layers),
        distributed.world_size(),
        dtype,
    )
    return dtype


def full_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole model's weights on process 0's CPU, in `dtype` (every process must call it;
    the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    for key in list(state):  # one float32 tensor at a time replaced by its `dtype` copy
        state[key] = state[key].to(dtype)
    return state


def _state(model, optimizer, with_optimizer: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save(directory: Path, model, optimizer, with_optimizer: bool) -> None:
    """Every process writes its shards of the weights (and optimiser states) into `directory`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, with_optimizer), checkpoint_id=str(directory))


def load(directory: Path, model, optimizer, with_optimizer: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _state(model, optimizer, with_optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def plain(total: torch.Tensor) -> float:
    """clip_grad_norm_ over DTensors returns a DTensor: the plain number."""
    full = getattr(total, "full_tensor", None)
    return float(full() if full else total)
