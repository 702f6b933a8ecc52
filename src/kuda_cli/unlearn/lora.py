"""`unlearn.lora.enabled=true`: the methods whose class says `supports_lora` (those that train
whole weights: GA, GradDiff, NPO, SimNPO) train low-rank adapters (peft LoRA) instead of the
weights, the way 7-8B models fit one 40-80 GB GPU.

The adapters are injected into the model in place (`peft.inject_adapter_in_model`), so every
method calls the same model object; they start as the identity (B = 0), so the starting model is
the adapters set back to their initial values. The final checkpoint is the merged model
(W + B A * alpha / r, in the model's dtype: any tool loads it) with the adapter beside it in
`adapter/` (peft's format).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kuda_cli.errors import UserError

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"


def attach(model: nn.Module, cfg, layers: list[int] | None) -> dict[str, nn.Parameter]:
    """Inject the adapters (into `layers` only, or every layer for None); their parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    spec = cfg.lora
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
        bias="none",
    )
    dtype = next(model.parameters()).dtype
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # e.g. no module of these names in the layers
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(
            f"unlearn.lora could not attach adapters ({first}); set unlearn.lora.target_modules "
            "to module names of this model's layers"
        ) from err
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():  # in the model's dtype, like the weights they add to
        p.data = p.data.to(dtype)
    model._kuda_lora_config = config  # written beside the adapter weights
    return params


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the architecture names it, with every adapter merged into its
    weight (the model itself is left as it is)."""
    modules = _lora_modules(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for name, module in modules.items():
        key = f"{name}.weight"
        delta = module.get_delta_weight(ADAPTER_NAME)
        out[key] = (out[key].float() + delta.float()).to(out[key].dtype)
    return out


def save_adapter(model: nn.Module, params: dict[str, nn.Parameter], directory: Path) -> None:
    """The adapter weights (peft's names: no adapter name) and its config, in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"base_model.model.{n.replace(f'.{ADAPTER_NAME}.', '.')}": p.detach().cpu().contiguous()
        for n, p in params.items()
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = model._kuda_lora_config.to_dict()
    config["target_modules"] = sorted(config.get("target_modules") or [])
    config["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")


def read_adapter(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a final checkpoint, by the model's parameter names."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / ADAPTER_DIR / "adapter_model.safetensors"))
    return {n: saved[f"base_model.model.{n.replace(f'.{ADAPTER_NAME}.', '.')}"] for n in names}
