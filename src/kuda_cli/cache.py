"""Checked cache entries, shared by every cache under the cache root (the embedded model, the
starting model's evaluations): a directory holds `kuda_manifest.json` with the size and sha256 of
every file under it, is built in a private temporary directory and renamed into place only when
complete, and is verified on every read. A directory without a manifest, or whose files do not
match it, is partial or damaged: it is rebuilt, never read. An exclusive file lock lets concurrent
runs sharing a cache root (multirun jobs, two sweeps, tests) build an entry once and never read a
half-written one."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "kuda_manifest.json"
CHUNK = 1 << 22


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, source: dict) -> None:
    """Record the size and sha256 of every file under `directory` (paths relative to it)."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in _files(directory)
    }
    (directory / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=2))


def verify_manifest(directory: Path) -> str | None:
    """None when every file the manifest lists is present with its size and checksum; otherwise
    the reason the directory cannot be trusted."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (an interrupted write)"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if not files or not isinstance(files, dict):
        return "empty manifest"
    for name, expected in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has the wrong size"
        if sha256_of(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` (created if needed), released when the block ends or the process
    dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def entry_lock(dest: Path):
    """The lock that guards building and reading the cache entry `dest`."""
    dest = Path(dest)
    return file_lock(dest.parent / f".{dest.name}.lock")


def staging_dir(dest: Path) -> Path:
    """A fresh private directory beside `dest` to build it in (readable by others: the cache
    may be shared)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    tmp.chmod(0o755)
    return tmp


def publish(tmp: Path, dest: Path, source: dict) -> None:
    """Write the manifest of the built directory `tmp` and rename it to `dest`, replacing a
    damaged entry there; on any failure `tmp` is removed and `dest` left as it was."""
    try:
        write_manifest(tmp, source)
        share_files(tmp)
        if Path(dest).exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_fingerprint(model) -> str:
    """Cheap content hash of a model (the key of every cache computed from its weights): the
    config and, per tensor, its name, shape, sum, |sum| and a position-weighted sum (so that
    moving values between positions changes it too), in float64."""
    import torch

    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            stats = torch.zeros(3, dtype=torch.float64, device=flat.device)
            for start in range(0, flat.numel(), 1 << 22):  # bounded extra memory at 7B
                chunk = flat[start : start + (1 << 22)].double()
                ramp = torch.arange(start + 1, start + 1 + chunk.numel(), device=flat.device)
                stats[0] += chunk.sum()
                stats[1] += chunk.abs().sum()
                stats[2] += (chunk * ramp.double() / flat.numel()).sum()
            digits = "".join(f"{v:.12e}" for v in stats.tolist())
            h.update(f"{name}{tuple(p.shape)}{digits}".encode())
    return h.hexdigest()


def shared_mode() -> int:
    """The permissions a plain `open` gives a new file (the umask's: 0644 by default)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def share_files(directory: Path) -> None:
    """Give every file under `directory` a plain file's permissions: safetensors (and so
    save_pretrained) writes its files 0600, which would keep a saved model or a shared cache
    entry from a teammate."""
    mode = shared_mode()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def shared_temp_file(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A temporary file beside `path` to be renamed onto it, with a plain file's permissions:
    mkstemp's 0600 would hide a run's meta.json and metrics.json, or a shared cache entry, from a
    teammate's kuda report on shared storage."""
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=suffix, dir=Path(path).parent)
    os.fchmod(fd, shared_mode())
    return fd, tmp


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    fd, tmp = shared_temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    torch = sys.modules.get("torch")  # a tensor means torch is imported
    if torch is not None and isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
