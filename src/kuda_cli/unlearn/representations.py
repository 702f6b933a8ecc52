"""Original representations of the starting model, computed once and kept in memory or on disk,
so a loss can compare against them without a second copy of the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kuda_cli.models.hooks import trace
from kuda_cli.unlearn.batches import TokenSet

SHARD_BYTES = 256 * 2**20


class RepresentationStore:
    """Per (item, site) a (tokens, hidden) tensor without padding. `mode="disk"` spills shards
    of safetensors to `directory` and reads them back lazily."""

    def __init__(self, mode: str = "memory", directory: Path | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"unknown store mode {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("a disk store needs a directory")
        self.mode = mode
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, torch.Tensor] = {}
        self._where: dict[str, Path] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    @staticmethod
    def key(index: int, site: str) -> str:
        return f"{index}|{site}"

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._where or key in self._pending

    def put(self, index: int, site: str, value: torch.Tensor) -> None:
        key = self.key(index, site)
        value = value.detach().to("cpu").contiguous()
        if self.mode == "memory":
            self._memory[key] = value
            return
        self._pending[key] = value
        self._pending_bytes += value.numel() * value.element_size()
        if self._pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.mode != "disk" or not self._pending:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        shard = self.directory / f"shard-{len(set(self._where.values())):05d}.safetensors"
        save_file(self._pending, str(shard))
        self._where.update({key: shard for key in self._pending})
        self._pending, self._pending_bytes = {}, 0

    def get(self, index: int, site: str) -> torch.Tensor:
        key = self.key(index, site)
        if key in self._memory:
            return self._memory[key]
        if key in self._pending:
            return self._pending[key]
        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def padded(self, indices: list[int], site: str, width: int, device) -> torch.Tensor:
        """(batch, width, hidden), zeros at padding."""
        rows = [self.get(i, site) for i in indices]
        out = torch.zeros((len(rows), width, rows[0].shape[-1]), dtype=rows[0].dtype)
        for r, row in enumerate(rows):
            out[r, : len(row)] = row
        return out.to(device)

    def nbytes(self) -> int:
        tensors = [*self._memory.values(), *self._pending.values()]
        on_disk = sum(p.stat().st_size for p in set(self._where.values()) if p.exists())
        return sum(t.numel() * t.element_size() for t in tensors) + on_disk

    def close(self) -> None:
        """Drop what the store holds (disk shards included)."""
        self._memory.clear()
        self._pending.clear()
        if self.mode == "disk" and self.directory and self.directory.exists():
            shutil.rmtree(self.directory)
        self._where.clear()


@torch.no_grad()
def record_sites(
    model,
    tokens: TokenSet,
    indices: list[int],
    sites: list[str],
    store: RepresentationStore,
    *,
    batch_size: int = 8,
    desc: str = "original representations",
) -> None:
    """Run `model` on the items `indices` and store the outputs of the modules `sites` at their
    non-padding tokens. The forward pass stops after the deepest site."""
    device = next(model.parameters()).device
    names = list(sites)
    todo = [i for i in dict.fromkeys(indices) if any(store.key(i, s) not in store for s in names)]
    order = sorted(todo, key=lambda i: len(tokens.ids[i]))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            chunk = order[start : start + batch_size]
            batch = tokens.batch(chunk, device)
            with trace(model, names, stop_after=deepest(model, names), detach=True) as rec:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            lengths = batch["attention_mask"].sum(1).tolist()
            for r, index in enumerate(chunk):
                for site in names:
                    store.put(index, site, rec[site].output[r, : lengths[r]])
    finally:
        model.train(was_training)
    store.flush()


def deepest(model, names: list[str]) -> str:
    """The module among `names` whose forward ends last: registration order follows depth, and
    a block ends after its children."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    last = max(names, key=order.__getitem__)
    parents = [n for n in names if last.startswith(n + ".")]
    return min(parents, key=len) if parents else last


def krd(
    now: RepresentationStore,
    before: RepresentationStore,
    sites: dict[int, str],
    indices: list[int],
    focus: list[list[int]] | None = None,
) -> dict[str, float]:
    """KRD: mean 1 - cos between two stores' representations of the items `indices`, per layer
    (`l<layer>`, over the tokens `focus` marks, every token when None) and averaged over the
    layers (`mean`). About 0: unchanged; about 1: orthogonal."""
    per_layer = {}
    for layer, site in sites.items():
        values = []
        for i in indices:
            value = 1 - F.cosine_similarity(
                now.get(i, site).float(), before.get(i, site).float(), dim=-1
            )
            if focus is not None:
                value = value[torch.tensor(focus[i], dtype=torch.bool)]
            values.append(value)
        per_layer[f"l{layer}"] = float(torch.cat(values).mean())
    return {"mean": sum(per_layer.values()) / len(per_layer), **per_layer}
