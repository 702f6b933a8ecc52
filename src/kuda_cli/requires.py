"""What a run cannot do without (`requires: [gpu, hub]`), checked before anything is loaded.

`gpu`: a CUDA device is visible. `hub`: every model, tokenizer and dataset the run would fetch
from the Hugging Face hub (those without a local path) can be fetched: `HF_HUB_OFFLINE` is not
set and a HEAD request to the hub endpoint answers within a few seconds. A run whose every
source is local needs no hub, whatever `requires` says. A missing requirement is a `ConfigError`:
one line, exit status 2, before any model is loaded.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kuda_cli.data.kinds import kind_of
from kuda_cli.data.sources import hub_splits
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate import metrics_of

TRUE = {"1", "ON", "YES", "TRUE"}
HUB_TIMEOUT_S = 5.0


def describe(cfg: DictConfig) -> str:
    """How the config names itself in messages: its experiment, else the stage."""
    experiment = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    if experiment is None and "hydra" not in cfg:  # inside a job: Hydra's node was removed
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            experiment = HydraConfig.get().runtime.choices.get("experiment")
    return f"experiment={experiment}" if experiment else f"kuda {cfg.stage}"


def hub_sources(cfg: DictConfig) -> list[str]:
    """`key (hub id)` for everything this run would fetch from the hub."""
    found: list[str] = []
    model = cfg.model
    if not model.get("path") and model.source == "hub":
        found.append(f"model ({model.id})")
    if model.get("tokenizer") and not Path(str(model.tokenizer)).expanduser().is_dir():
        found.append(f"model.tokenizer ({model.tokenizer})")
    kind = kind_of(cfg.data)
    splits: list[str] = []
    if cfg.stage == "unlearn":
        splits += kind.unlearn_splits
    if cfg.stage in ("trace", "unlearn") and cfg.locate.method == "causal_tracing":
        if not cfg.locate.get("from_run") and kind.probe_split(cfg.data):
            splits.append(kind.probe_split(cfg.data))
    found += hub_splits(cfg.data, splits)
    if cfg.stage in ("eval", "unlearn"):
        for metric in metrics_of(cfg.eval):
            found += metric.hub_sources(cfg)
    return list(dict.fromkeys(found))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=1)  # once per process: a sweep's jobs and its pre-flight share it
def hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now, or None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE:
        return "HF_HUB_OFFLINE is set"
    request = urllib.request.Request(hub_endpoint(), method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"{hub_endpoint()} is unreachable ({reason})"
    return None


@functools.lru_cache(maxsize=1)
def gpu_missing() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return "no CUDA device is visible (torch.cuda.is_available() is false)"


def check(cfg: DictConfig, *, gpu: bool = True, hub: bool = True) -> None:
    """Raise ConfigError naming the first requirement of `cfg.requires` that is not met.
    `gpu=False` skips the GPU check (a SLURM launcher submits from a node without one)."""
    wanted = list(cfg.get("requires") or [])
    who = describe(cfg)
    if gpu and "gpu" in wanted and (why := gpu_missing()):
        raise ConfigError(
            f"{who} needs a GPU but {why}; run it on a GPU machine, or submit it to a cluster "
            "with -m hydra/launcher=slurm (requires=[] skips this check)"
        )
    if hub and "hub" in wanted:
        sources = hub_sources(cfg)
        if sources and (why := hub_unreachable()):
            shown = ", ".join(sources[:3]) + (
                f" and {len(sources) - 3} more" if sources[3:] else ""
            )
            raise ConfigError(
                f"{who} needs the Hugging Face hub for {shown}, but {why}; pass local copies "
                "(model.path=DIR, data.<split>.path=FILE, eval.wmdp.<set>_path=FILE)"
            )
