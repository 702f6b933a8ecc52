"""The checkpoints of a run directory: what a resume needs, held once.

    checkpoint-<step>/   intermediate (every `save_every` steps): `trainer_state.pt` with the
                         trained tensors (the fp32 master copies where the model is in half
                         precision), the optimiser state (`save_optimizer`) and the schedule, and
                         `trainer_state.json`; sharded runs write a `torch.distributed.checkpoint`
                         directory instead of the .pt file. Only the newest `keep` stay.
    checkpoint/          final: the Hugging Face model (config, safetensors, tokenizer), and
                         `trainer_state.json` saying it is final; a LoRA run adds `adapter/`.

No intermediate one holds the model: a resume loads the starting model, recomputes what the method
compares against from it, then copies the trained tensors in. Every directory is written under a
`.tmp` name and renamed into place, so a kill at any moment leaves the previous complete one;
leftovers of a killed write (`*.tmp`) are removed by the next save.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from kuda_cli.cache import share_files

CHECKPOINT = "checkpoint"  # the final one: a Hugging Face model directory
STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
SHARDED_STATE = "sharded"  # the torch.distributed.checkpoint directory of a sharded run
_INTERMEDIATE = re.compile(rf"^{CHECKPOINT}-(\d+)$")


def intermediate_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"{CHECKPOINT}-{step}"


def read_state_json(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / STATE_JSON).read_text())
    except (OSError, ValueError):
        return None


def is_final(directory: Path) -> bool:
    state = read_state_json(directory)
    return bool(state and state.get("final"))


def has_state(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / STATE_FILE).exists() or (directory / SHARDED_STATE).is_dir()


def intermediates(out_dir: Path) -> list[tuple[int, Path]]:
    """The complete intermediate checkpoints, oldest first."""
    found = []
    for path in Path(out_dir).glob(f"{CHECKPOINT}-*"):
        match = _INTERMEDIATE.match(path.name)
        if match and path.is_dir() and has_state(path) and read_state_json(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(out_dir: Path) -> Path | None:
    """The final checkpoint when there is one, else the newest intermediate one (a checkpoint/
    of the older layout, holding a trainer state, counts as an intermediate), else None."""
    final = Path(out_dir) / CHECKPOINT
    if is_final(final):
        return final
    found = intermediates(out_dir)
    if found:
        return found[-1][1]
    if has_state(final) and read_state_json(final):
        return final  # written by an older kuda: the model, the trainer state beside it
    return None


def any_checkpoint(out_dir: Path) -> bool:
    return latest(out_dir) is not None


def write_state_json(directory: Path, payload: dict) -> None:
    (Path(directory) / STATE_JSON).write_text(json.dumps(payload, indent=2) + "\n")


def fresh_tmp(target: Path) -> Path:
    tmp = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def clear_leftovers(out_dir: Path) -> None:
    for tmp in Path(out_dir).glob(f"{CHECKPOINT}*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def put_in_place(tmp: Path, target: Path) -> None:
    """`tmp` becomes `target` (an existing `target` is replaced: a rerun of a final save),
    readable as the run's other files."""
    share_files(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def prune(out_dir: Path, keep: int) -> None:
    """Only the newest `keep` intermediate checkpoints stay (0: none, after the final one)."""
    found = intermediates(out_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def read_model_tensors(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face directory's safetensors (single file or sharded with an index)
    by name; a name missing from the files is an error naming it."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: directory / weight_map[name] for name in names if name in weight_map}
    else:
        files = {name: directory / "model.safetensors" for name in names}
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, wanted in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name in wanted:
                if name in present:
                    out[name] = f.get_tensor(name)
    missing = [n for n in names if n not in out]
    if missing:
        raise KeyError(f"{directory} holds no tensor {missing[0]!r}")
    return out
