"""`eval.attacks=[quant8]`: the run's metrics on the evaluated model with its decoder-block
linear weights quantized to 8 bits (round to nearest, one scale per output row by default), and
on the starting model quantized alike where it is at hand (evaluate/quantization.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kuda_cli.config import bounded
from kuda_cli.evaluate.attacks import Attack, AttackContext, register_attack
from kuda_cli.evaluate.quantization import quantization_attack


@dataclass
class Quant8Settings:
    group_size: int = bounded(0, ge=0)  # input columns per scale; 0: one scale per output row
    # HQQ's half-quadratic optimisation of the zero points (its best scheme) instead of
    # round-to-nearest on the min-max grid (what GPTQ and AWQ improve on, the default)
    optimize: bool = False


@register_attack("quant8", Quant8Settings)
class Quant8(Attack):
    @classmethod
    def run(cls, actx: AttackContext) -> dict[str, Any]:
        return quantization_attack(actx, bits=8)
