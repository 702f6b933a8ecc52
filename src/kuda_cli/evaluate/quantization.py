"""The quantization attacks (`quant8`, `quant4`): every linear weight of the decoder blocks
rounded to nearest on a b-bit min-max grid (codes 0 .. 2^b - 1 with a zero point, one step and
zero per output row or per group of input columns) by HQQ's quantizer without its zero-point
optimisation (the round-to-nearest that GPTQ and AWQ improve on), and replaced by its dequantized
values in the model's dtype: the weights a quantized deployment computes with, on any device.

An update smaller than half a step rounds back to the starting weight's code, and the starting
model's knowledge returns (Zhang et al. 2024, "Catastrophic failure of LLM unlearning via
quantization"): the attack reports the share of changed weights that do, and scores the starting
model quantized the same way as the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kuda_cli.evaluate.attack_facts import removed_against, with_removed
from kuda_cli.evaluate.attacks import AttackContext, rescore, restored
from kuda_cli.evaluate.metrics.facts import Facts
from kuda_cli.run import lookup


def group_of(cols: int, group_size: int) -> int:
    """Input columns per step: `group_size`, or the whole row for 0 or a size that does not
    divide it."""
    return group_size if group_size and cols % group_size == 0 else cols


def rtn(
    weight: torch.Tensor, bits: int, group_size: int, optimize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as uint8, dequantized weight in its dtype) of a 2-D weight; `optimize`: HQQ's
    half-quadratic search of the zero points instead of the plain min-max ones."""
    from hqq.core.quantize import Quantizer

    codes, meta = Quantizer.quantize(
        weight.detach(),
        nbits=bits,
        channel_wise=True,
        group_size=group_of(weight.shape[1], group_size),
        optimize=optimize,
        round_zero=False,
        axis=1,
        bitpack=False,
        compute_dtype=torch.float32,
        device=str(weight.device),
    )
    meta["compute_dtype"] = torch.float32
    values = Quantizer.dequantize(codes, meta)
    return codes.reshape(weight.shape).to(torch.uint8), values.to(weight.dtype)


def linear_weights(model: nn.Module, layers: str) -> dict[str, nn.Parameter]:
    """The weight of every linear module inside the decoder blocks (`layers`: their ModuleList)."""
    blocks = model.get_submodule(layers)
    return {
        f"{layers}.{name}.weight": module.weight
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear)
    }


@torch.no_grad()
def quantize_in_place(
    model: nn.Module,
    layers: str,
    bits: int,
    group_size: int,
    keep: dict | None = None,
    optimize: bool = False,
) -> dict[str, torch.Tensor]:
    """Replace each decoder-block linear weight by its quantized value; the codes (on the host)
    of the weights `keep` names, at its mask's positions (all of them without `keep`)."""
    codes = {}
    for name, weight in linear_weights(model, layers).items():
        found, values = rtn(weight, bits, group_size, optimize)
        weight.copy_(values)
        if keep is None:
            codes[name] = found.cpu()
        elif name in keep:
            codes[name] = found.cpu()[keep[name]]
    return codes


def changed_weights(model: nn.Module, layers: str, other: dict[str, torch.Tensor]):
    """Per decoder-block linear weight that differs from `other`'s (host tensors by name), the
    mask of the entries that do."""
    masks = {}
    for name, weight in linear_weights(model, layers).items():
        mask = weight.detach().cpu() != other[name]
        if mask.any():
            masks[name] = mask
    return masks


def quantization_attack(actx: AttackContext, bits: int) -> dict[str, Any]:
    """The run's metrics on the model quantized to `bits`; where the starting model is at hand,
    the same for it quantized alike (`starting`) and the share of the changed weights whose code
    is the starting weight's (`round_back`)."""
    model, layers = actx.model, actx.ctx.loaded.adapter.layers
    group_size, optimize = actx.settings.group_size, actx.settings.optimize
    out: dict[str, Any] = {"bits": bits, "group_size": group_size, "optimize": optimize}
    masks = starting_codes = None
    with restored(model) as evaluated:
        if actx.starting_model is not None:
            with actx.starting_model():
                masks = changed_weights(model, layers, evaluated)
                starting_codes = quantize_in_place(model, layers, bits, group_size, masks, optimize)
                out["starting"] = rescore(actx, judge=None, under="starting")
            model.load_state_dict(evaluated)
        codes = quantize_in_place(model, layers, bits, group_size, masks or {}, optimize)
        out.update(with_removed(rescore(actx), actx))
    if starting_codes is not None:
        out["round_back"] = round_back(starting_codes, codes)
    reference = lookup(out, f"starting.{Facts.name}.forget")
    if reference is not None and "forget_removed" in out:
        # a 4-bit model loses knowledge by itself: what quantization restores is judged against
        # the starting model quantized alike
        against = removed_against(actx.before_dir, reference, out[Facts.name]["forget"])
        out["forget_removed"]["against_quantized_start"] = against
    return out


def round_back(starting: dict[str, torch.Tensor], codes: dict[str, torch.Tensor]):
    """Of the weights the evaluated model changed (their codes by name, in the same order), how
    many have the starting weight's code."""
    changed = sum(c.numel() for c in starting.values())
    same = sum(int((codes[n] == c).sum()) for n, c in starting.items())
    return {"changed": changed, "same_code": same, "share": same / changed if changed else None}
