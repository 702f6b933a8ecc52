"""The run directory: resolved config, meta (provenance and status), metrics (atomic writes), seeds.

Everything a run produces goes under its directory; `Run` owns the files every stage shares, and
mirrors the config, the training log's rows and the metrics into the chosen tracker (`logger`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kuda_cli import __version__, distributed
from kuda_cli.cache import write_json_atomic
from kuda_cli.trackers import Tracking, params_of

STATUSES = ("running", "completed", "failed")
BOOTSTRAP_FILES = {"config.yaml", "meta.json", "kuda.log", ".hydra"}
# what each run directory held when this command planned it (None: it did not exist), so that
# a failed run removes only what this command made; planning fills it, in the same process
_FOUND: dict[str, frozenset[str] | None] = {}


def note_found(directory: Path) -> None:
    """Remember what `directory` holds now, before Hydra or the run writes anything in it."""
    directory = Path(directory)
    found = frozenset(p.name for p in directory.iterdir()) if directory.is_dir() else None
    _FOUND[str(directory.resolve())] = found


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# groups a stage's results do not depend on: a trace is the same whatever the unlearning and
# evaluation settings, so changing those (a new default, `make table-facts ARGS=unlearn.lr=..`)
# does not make the trace sweep the tables share "a run of another config"
UNUSED_BY_STAGE = {"trace": ("unlearn", "eval", "report", "tune")}


# what does not change a run's results: where it continues, Hydra's node, the tracker it is
# mirrored to (a sweep re-run with logger=wandb skips its completed jobs)
NOT_HASHED = ("hydra", "resume", "logger")


def config_hash(cfg: DictConfig, *, whole: bool = False) -> str:
    """sha256 of the resolved job config, keys sorted: equal configs hash equal. NOT_HASHED
    keys do not count (a resumed run has the config of the run it continues), nor
    the groups the stage does not use (`whole=True`: they do, as before 2026-12-01)."""
    unused = () if whole else UNUSED_BY_STAGE.get(str(cfg.get("stage")), ())
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in NOT_HASHED + unused])
    resolved = OmegaConf.to_container(job, resolve=True)
    blob = json.dumps(resolved, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def config_hashes(cfg: DictConfig) -> frozenset[str]:
    """The hashes a run of this config may carry in its meta.json: today's, and the whole-config
    hash runs written before the stage-aware one carry."""
    return frozenset({config_hash(cfg), config_hash(cfg, whole=True)})


def git_state(where: Path) -> dict[str, Any]:
    """Commit and dirtiness of the checkout kuda runs from (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "kuda": __version__}
    for dist in ("torch", "transformers", "lm_eval", "hydra-core", "datasets", "accelerate"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def device_description() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
        }
    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "count": os.cpu_count(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_meta(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def completed_with(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether `run_dir` holds a completed run of this very config (same config hash)."""
    meta = read_meta(run_dir)
    return bool(
        meta and meta.get("status") == "completed" and meta.get("config_hash") in config_hashes(cfg)
    )


class Run:
    """One run directory. `start` writes config.yaml and meta.json (status running); the stage
    adds its files and metrics; `finish` records the end time and final status."""

    def __init__(self, directory: Path, cfg: DictConfig):
        self.dir = Path(directory)
        self.cfg = cfg
        self.meta: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.tracking: Tracking | None = None  # the tracker (logger) mirroring the run

    @classmethod
    def start(cls, directory: Path, cfg: DictConfig, overrides: list[str] | None = None) -> Run:
        run = cls(directory, cfg)
        previous = read_meta(run.dir)
        run.dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            (run.dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        run.meta = {
            "stage": cfg.stage,
            "name": cfg.get("name"),
            "status": "running",
            "start_time": now(),
            "end_time": None,
            "duration_s": None,
            "seed": cfg.seed,
            "config_hash": config_hash(cfg),
            "overrides": list(overrides or []),
            "command": " ".join(["kuda", cfg.stage, *(overrides or [])]),
            "git": git_state(Path(__file__).resolve().parent),
            "versions": package_versions(),
            "device": device_description(),
            "host": socket.gethostname(),
            "argv": sys.argv,
        }
        if previous:  # a resumed run keeps the story of its earlier attempts
            run.meta["attempts"] = [
                *previous.get("attempts", []),
                {k: previous.get(k) for k in ("start_time", "end_time", "status", "error")},
            ]
        run.write_meta()
        if distributed.is_main() and cfg.get("logger") is not None:
            params = params_of(OmegaConf.to_container(cfg, resolve=True))  # config.yaml's
            run.tracking = Tracking(OmegaConf.to_object(cfg.logger), run.dir, params)
        set_seed(cfg.seed)
        return run

    def write_meta(self) -> None:
        if distributed.is_main():  # several processes: process 0 keeps the run's files
            write_json_atomic(self.dir / "meta.json", self.meta)

    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        self.write_meta()

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Merge `metrics` (nested dicts) into metrics.json, atomically."""
        _deep_merge(self.metrics, metrics)
        if distributed.is_main():
            write_json_atomic(self.dir / "metrics.json", self.metrics)
        if self.tracking is not None:
            self.tracking.log_metrics(flatten(metrics))

    def log_step(self, row: dict[str, Any]) -> None:
        """One row of the training log (train_log.jsonl, written by the trainer), to the
        tracker."""
        if self.tracking is not None:
            self.tracking.log_step(row)

    def finish(self, status: str, error: str | None = None) -> None:
        assert status in STATUSES
        if distributed.is_main() and not (self.dir / "metrics.json").exists():
            write_json_atomic(self.dir / "metrics.json", self.metrics)
        end = datetime.now(timezone.utc)
        start = datetime.fromisoformat(self.meta["start_time"])
        self.update_meta(
            status=status,
            end_time=end.isoformat(timespec="seconds"),
            duration_s=round((end - start).total_seconds(), 3),
            error=error,
        )
        if self.tracking is not None:
            self.tracking.close(status)

    def discard(self) -> bool:
        """Undo a run refused by a check found while running: remove what this command made
        (the directory itself when it made it) if that is nothing but what `start` and Hydra
        wrote. False (the run is kept, to be marked failed) when the directory held something
        before this command, when the run wrote results, or when nobody planned it."""
        if not self.dir.is_dir() or not distributed.is_main():
            return True
        key = str(self.dir.resolve())
        if key not in _FOUND:
            return False
        found = _FOUND[key]
        if found:  # an unfinished run continued here: its record stays, marked failed
            return False
        if any(p.name not in BOOTSTRAP_FILES for p in self.dir.iterdir()):
            return False
        if found is None:
            shutil.rmtree(self.dir)
            return True
        for made in self.dir.iterdir():  # an empty directory the user pinned stays, empty
            if made.is_dir():
                shutil.rmtree(made)
            else:
                made.unlink()
        return True


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


# ----------------------------------------------------------------------------- reading runs
def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def lookup(metrics: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of nested dicts, or None."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def natural_key(path: Path) -> list:
    """Sort key that orders the numbered job directories of a sweep as numbers (2 before 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(patterns: list[str], exclude: Path) -> list[Path]:
    """The run directories under `patterns`, a sweep's jobs in their numbered order."""
    found = set()
    for pattern in patterns:
        for match in glob.glob(str(Path(pattern).expanduser()), recursive=True):
            for meta in Path(match).glob("**/meta.json"):  # "**" includes `match` itself
                if meta.is_file() and meta.parent.resolve() != exclude.resolve():
                    found.add(meta.parent)
    return sorted(found, key=natural_key)
