"""`eval.attacks=[quant4]`: the run's metrics on the evaluated model with its decoder-block
linear weights quantized to 4 bits (round to nearest, one scale per 128 input columns by
default, as GPTQ and AWQ checkpoints are), and on the starting model quantized alike where it
is at hand (evaluate/quantization.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kuda_cli.config import bounded
from kuda_cli.evaluate.attacks import Attack, AttackContext, register_attack
from kuda_cli.evaluate.quantization import quantization_attack


@dataclass
class Quant4Settings:
    # input columns per scale; 0 (or a size that does not divide a row): one per output row
    group_size: int = bounded(128, ge=0)
    # HQQ's half-quadratic optimisation of the zero points (its best scheme) instead of
    # round-to-nearest on the min-max grid (what GPTQ and AWQ improve on, the default)
    optimize: bool = False


@register_attack("quant4", Quant4Settings)
class Quant4(Attack):
    @classmethod
    def run(cls, actx: AttackContext) -> dict[str, Any]:
        return quantization_attack(actx, bits=4)
