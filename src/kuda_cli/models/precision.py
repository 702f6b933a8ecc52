"""Precision of matrix products: which dtype `auto` means on this device, and the autocast
context of a precision. Tracing resolves `auto` to bf16 where bf16 is fast; unlearning runs
`auto` without autocast (the loss in the model's own dtype)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

# CPU features with bf16 matrix units: AMX tiles (Intel Sapphire Rapids and later) or AVX-512
# BF16 (Cooper Lake, AMD Zen 4 and later); there a bf16 matmul runs 2-4x faster than float32
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16_units(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags name a bf16 matrix unit."""
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()
    }
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are faster than float32 ones here: CUDA with bf16 support,
    or a CPU with bf16 matrix units (Linux /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return cpu_has_bf16_units(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` made concrete: `bfloat16` where `fast_bf16`, else `float32`."""
    if precision == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision: bf16 autocast for `bfloat16` (float32 elsewhere),
    none for `float32` and `auto` (the model's own dtype)."""
    if precision == "bfloat16" and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
