"""Model loading: a hub id or a local directory through `from_pretrained`, the embedded default
(converted once into the cache), or a tiny random model for tests. Every path returns the same
`LoadedModel`: model in eval mode on its device, tokenizer with a pad token, architecture adapter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kuda_cli import distributed
from kuda_cli.config import ModelConfig
from kuda_cli.errors import UserError
from kuda_cli.models.adapter import Adapter, get_adapter
from kuda_cli.models.embedded import ensure_embedded
from kuda_cli.models.tiny import tiny_random

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    adapter: Adapter
    device: torch.device
    origin: str  # where the weights came from: hub id, directory, "tiny-random"

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "model.device=cuda but no CUDA GPU is visible; use model.device=cpu or auto"
        )
    if name == "cuda" and distributed.active():  # one process per GPU (accelerate launch)
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """`auto`: the checkpoint's own dtype on a GPU; float32 on the CPU, where half precision is
    slow and bf16 matmuls are not always supported."""
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get("KUDA_CACHE") or "~/.cache/kuda"
    return Path(root).expanduser()


def load_model(spec: ModelConfig, cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    device = resolve_device(spec.device)
    if spec.path:
        model, tokenizer = _from_pretrained(_local_dir(spec.path), spec, device)
        origin = str(spec.path)
    elif spec.source == "hub":
        model, tokenizer = _from_pretrained(spec.id, spec, device)
        origin = spec.id
    elif spec.source == "embedded":
        directory = ensure_embedded(spec.embedded, resolve_cache_root(cache_dir))
        model, tokenizer = _from_pretrained(str(directory), spec, device)
        origin = f"{spec.embedded.package}=={spec.embedded.version} ({directory})"
    elif spec.source == "tiny-random":
        model, tokenizer = tiny_random(spec.tiny)
        dtype = resolve_dtype(spec.dtype, device)
        model = model.to(device=device, dtype=torch.float32 if dtype == "auto" else dtype)
        origin = "tiny-random"
    else:
        raise UserError(f"model.source={spec.source!r} needs model.path=DIR")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    adapter = get_adapter(model)
    log.info(
        "loaded %s (%s, %d layers, %.1fM parameters, %s, %s)",
        spec.name,
        origin,
        adapter.num_layers(model),
        sum(p.numel() for p in model.parameters()) / 1e6,
        next(model.parameters()).dtype,
        device,
    )
    return LoadedModel(model, tokenizer, adapter, device, origin)


def _local_dir(path: str) -> str:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UserError(f"model.path={path} is not a directory; pass a save_pretrained directory")
    if not (directory / "config.json").is_file():
        raise UserError(
            f"model.path={path} has no config.json; pass a directory written by save_pretrained "
            "(or a run's checkpoint/ directory)"
        )
    return str(directory)


def _from_pretrained(name_or_path: str, spec: ModelConfig, device: torch.device):
    dtype = resolve_dtype(spec.dtype, device)
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    # on a GPU the weights go straight to it, shard by shard: no host copy of a 7B model
    placement = {"device_map": device} if device.type == "cuda" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or name_or_path, **common)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, **common, **placement
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not load model {name_or_path!r} ({first}); if the hub is unreachable, "
            "download it elsewhere and pass model.path=DIR"
        ) from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UserError(
                f"model {name_or_path!r} needs custom code; review it, then pass "
                "model.trust_remote_code=true"
            ) from err
        raise
    return (model if placement else model.to(device)), tokenizer
