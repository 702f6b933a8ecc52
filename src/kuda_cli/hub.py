"""What a run would fetch from the Hugging Face hub, and whether the local cache holds it already.

A `HubSource` is one model, tokenizer or dataset that a config names without a local path: the
key that names it, its hub id, and the override that gives a local copy instead. `cached` looks
where transformers and datasets look offline (`HF_HUB_CACHE`, `HF_DATASETS_CACHE`, both under
`HF_HOME` by default), reading the environment when called and importing neither library, so a
check that finds everything cached costs a few file lookups. `use_cache_only` puts the process in
the libraries' offline mode, where a cached copy loads without waiting on an unreachable hub.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# a repository's files that say a model or tokenizer was downloaded (its snapshot has one)
MODEL_FILES = ("config.json", "tokenizer_config.json")
COMMIT = re.compile(r"[0-9a-f]{40}")
TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads a yes in HF_HUB_OFFLINE


@dataclass(frozen=True)
class HubSource:
    key: str  # the config key that names it: model, data.forget, eval.wmdp.bio_path
    hub_id: str
    local: str  # the override that replaces the download: model.path=DIR, data.forget.path=FILE
    repo_type: str = "dataset"  # or "model" (a model's or a tokenizer's repository)
    revision: str | None = None  # a model's branch, tag or commit (None: main)

    def __str__(self) -> str:
        return f"{self.key} ({self.hub_id})"


def hf_home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(os.environ.get("HF_HOME") or default).expanduser()


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloaded repositories (models and tokenizers here)."""
    chosen = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(chosen).expanduser() if chosen else hf_home() / "hub"


def datasets_cache() -> Path:
    """Where datasets keeps prepared datasets: what `load_dataset` reads in offline mode."""
    chosen = os.environ.get("HF_DATASETS_CACHE")
    return Path(chosen).expanduser() if chosen else hf_home() / "datasets"


def _snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    """The snapshot directory of `revision` in a hub cache repository, if it was downloaded."""
    revision = revision or "main"
    if COMMIT.fullmatch(revision):
        return repo_dir / "snapshots" / revision
    ref = repo_dir / "refs" / revision
    return repo_dir / "snapshots" / ref.read_text().strip() if ref.is_file() else None


def _dataset_dir(hub_id: str) -> str:
    """The directory `datasets` names a hub dataset by in its cache (CachedDatasetModuleFactory:
    the name part in snake case, the namespace kept, joined by ___)."""
    *namespace, name = hub_id.split("/")
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()
    return "___".join([*namespace, name])


def cached(source: HubSource) -> bool:
    """Whether the local Hugging Face cache holds `source`, so it loads without the hub."""
    if source.repo_type == "model":
        repo = hub_cache() / f"models--{source.hub_id.replace('/', '--')}"
        snapshot = _snapshot(repo, source.revision)
        return snapshot is not None and any((snapshot / f).is_file() for f in MODEL_FILES)
    prepared = datasets_cache() / _dataset_dir(source.hub_id)
    return any(path.is_dir() for path in prepared.glob("*/*/*"))


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE


def use_cache_only() -> bool:
    """Put this process in the Hugging Face libraries' offline mode (HF_HUB_OFFLINE=1): cached
    files load at once instead of after each library's retries. False when it was already."""
    if offline_mode():
        return False
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    # the libraries read the variables once, when imported: one imported already is told here
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
        constants.HF_HUB_OFFLINE = True
    if (config := sys.modules.get("datasets.config")) is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    return True
