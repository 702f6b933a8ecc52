"""What a run cannot do without, checked before anything is loaded and before any directory is
made. A missing requirement is a `ConfigError`: one line, exit status 2.

The hub, for every run: `hub_sources` lists the models, tokenizers and datasets the run would
fetch from the Hugging Face hub (those without a local path). A run with none asks nothing of the
network. Otherwise one quick request per process (`hub_unreachable`: HF_HUB_OFFLINE is not set and
the endpoint answers within a few seconds) decides: a source missing from the local cache stops the
run, naming the override that gives a local copy; cached ones then load in offline mode, without
the libraries' retries. `requires: [gpu, hub]` asks for more: `gpu`, a CUDA device; `hub`, a hub
that answers, even for what the cache holds (the table experiments set both).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kuda_cli.data.kinds import kind_of
from kuda_cli.data.sources import hub_splits
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate import metrics_of
from kuda_cli.hub import HubSource, cached, offline_mode, use_cache_only

HUB_TIMEOUT_S = 3.0


def describe(cfg: DictConfig) -> str:
    """How the config names itself in messages: its experiment, else the stage."""
    experiment = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    if experiment is None and "hydra" not in cfg:  # inside a job: Hydra's node was removed
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            experiment = HydraConfig.get().runtime.choices.get("experiment")
    return f"experiment={experiment}" if experiment else f"kuda {cfg.stage}"


def hub_sources(cfg: DictConfig) -> list[HubSource]:
    """Everything this run would fetch from the hub."""
    found: list[HubSource] = []
    model = cfg.model
    revision = model.get("revision")
    if not model.get("path") and model.source == "hub":
        found.append(HubSource("model", model.id, "model.path=DIR", "model", revision))
    if model.get("tokenizer") and not Path(str(model.tokenizer)).expanduser().is_dir():
        local = "model.tokenizer=DIR"
        found.append(HubSource("model.tokenizer", str(model.tokenizer), local, "model", revision))
    kind = kind_of(cfg.data)
    splits: list[str] = []
    if cfg.stage == "unlearn":
        splits += kind.unlearn_splits
    if cfg.stage in ("trace", "unlearn") and cfg.locate.method == "causal_tracing":
        if not cfg.locate.get("from_run") and kind.probe_split(cfg.data):
            splits.append(kind.probe_split(cfg.data))
    found += hub_splits(cfg.data, splits)
    if cfg.stage == "unlearn":
        from kuda_cli.unlearn.methods import get_method

        found += get_method(cfg.unlearn.method).hub_sources(cfg)
    if cfg.stage in ("eval", "unlearn"):
        for metric in metrics_of(cfg.eval):
            found += metric.hub_sources(cfg)
    return list(dict.fromkeys(found))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=1)  # once per process: a sweep's jobs and its pre-flight share it
def hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now, or None when it answers within `timeout` seconds."""
    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    answer: list[str | None] = []
    # in a thread: a resolver that hangs (no DNS server reachable) is not bound by the timeout
    asking = threading.Thread(target=lambda: answer.append(_ask_hub(timeout)), daemon=True)
    asking.start()
    asking.join(timeout)
    return answer[0] if answer else f"{hub_endpoint()} did not answer within {timeout:g} s"


def _ask_hub(timeout: float) -> str | None:
    """One HEAD request to the endpoint (through the environment's proxies, as the libraries)."""
    request = urllib.request.Request(hub_endpoint(), method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:  # it answered; a gateway's 5xx: the hub behind did not
        return f"{hub_endpoint()} answered HTTP {err.code}" if err.code >= 500 else None
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"{hub_endpoint()} is unreachable ({getattr(err, 'reason', err)})"
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
    if hub:
        check_hub(cfg, strict="hub" in wanted)


def _listed(sources: list[HubSource]) -> str:
    more = len(sources) - 3
    return ", ".join(map(str, sources[:3])) + (f" and {more} more" if more > 0 else "")


def _local_copies(sources: list[HubSource]) -> str:
    return " ".join(dict.fromkeys(source.local for source in sources))


def check_hub(cfg: DictConfig, *, strict: bool = False) -> None:
    """Raise ConfigError when the run needs from the hub what it cannot get: a source the local
    cache lacks while the hub is unreachable (with `strict`, any source). When the hub is
    unreachable and the cache holds everything, the process goes offline and says so."""
    sources = hub_sources(cfg)
    if not sources or not (why := hub_unreachable()):
        return
    if strict:
        raise ConfigError(
            f"{describe(cfg)} needs the Hugging Face hub for {_listed(sources)}, but {why}; pass "
            f"local copies ({_local_copies(sources)}), or requires=[] to use cached copies"
        )
    missing = [source for source in sources if not cached(source)]
    if missing:
        one = len(missing) == 1
        raise ConfigError(
            f"{_listed(missing)} {'is' if one else 'are'} not in the local Hugging Face cache and "
            f"{why}; pass {'a local copy' if one else 'local copies'}: {_local_copies(missing)}"
        )
    if use_cache_only():
        print(
            f"kuda: {why}; {_listed(sources)} load from the local Hugging Face cache "
            "(HF_HUB_OFFLINE=1)",
            file=sys.stderr,
        )
