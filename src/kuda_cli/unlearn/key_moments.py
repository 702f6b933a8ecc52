"""The second moments of `down_proj` inputs ("keys") that the null-space projection reads
(unlearn/nullspace.py): over one token set, or several mixed by their shares (retain and general
text: `unlearn.nullspace.key_source`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kuda_cli.models.adapter import Adapter
from kuda_cli.models.hooks import trace
from kuda_cli.unlearn.batches import TokenSet


@dataclass(frozen=True)
class KeySet:
    """Tokens whose down_proj inputs enter the key moment, and their share of it."""

    name: str  # retain, general
    tokens: TokenSet
    share: float = 1.0  # of the combined moment, each set's moment a per-token mean
    label: str = ""  # the source and its settings (general text), for the cache key


@torch.no_grad()
def key_moments(
    model,
    adapter: Adapter,
    layers: list[int],
    tokens: TokenSet,
    *,
    batch_size: int = 8,
    desc: str = "retain keys",
) -> tuple[dict[int, torch.Tensor], int]:
    """`C_l = K_l K_l^T / n` (float64) of the down_proj inputs of `layers` over every
    non-padding token of `tokens`; the forward pass stops after the last of them."""
    sums, count = key_sums(model, adapter, layers, tokens, {}, batch_size=batch_size, desc=desc)
    return {layer: s.div_(count) for layer, s in sums.items()}, count


@torch.no_grad()
def key_sums(
    model,
    adapter: Adapter,
    layers: list[int],
    tokens: TokenSet,
    sums: dict[int, torch.Tensor],
    *,
    batch_size: int = 8,
    desc: str = "retain keys",
) -> tuple[dict[int, torch.Tensor], int]:
    """`sums[l] += K_l K_l^T` (float64) over every non-padding token of `tokens`, and the
    number of those tokens.

    One float64 sum per layer, allocated once (where `sums` has none) and added to in place: on
    CUDA by `addmm_`; on a CPU through one product buffer shared by the layers (`addmm_` rounds
    differently from a product then a sum there, and the sums stay bit-identical to
    `sum + keys.T @ keys`)."""
    device = next(model.parameters()).device
    names = {layer: adapter.module_name("down_proj", layer) for layer in layers}
    last = names[max(layers)]
    product: torch.Tensor | None = None
    count = 0
    for start in tqdm(range(0, len(tokens), batch_size), desc=desc, unit="batch"):
        batch = tokens.batch(list(range(start, min(start + batch_size, len(tokens)))), device)
        mask = batch["attention_mask"].bool()
        with trace(model, list(names.values()), outputs=False, inputs=True, stop_after=last) as rec:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer, name in names.items():
            keys = rec[name].input[mask].double()
            if layer not in sums:
                d_ff = keys.shape[-1]
                sums[layer] = torch.zeros(d_ff, d_ff, dtype=torch.float64, device=keys.device)
            if keys.device.type == "cuda":
                sums[layer].addmm_(keys.T, keys)
            else:
                if product is None or product.shape != sums[layer].shape:
                    product = torch.empty_like(sums[layer])
                sums[layer].add_(torch.matmul(keys.T, keys, out=product))
            del keys
        count += int(mask.sum())
    del product
    return sums, count


@torch.no_grad()
def mixed_key_moments(
    model, adapter: Adapter, layers: list[int], sets: list[KeySet], *, batch_size: int = 8
) -> tuple[dict[int, torch.Tensor], int]:
    """`sum_i share_i K_i K_i^T / n_i` over the key sets, and the keys counted. One set: its
    `key_moments`. Several: one float64 sum per layer, rescaled in place between sets (by
    c_prev / c_next, c = share / n, then by the last c), so it never holds a second moment."""
    if len(sets) == 1:
        only = sets[0]
        desc = f"{only.name} keys"
        return key_moments(model, adapter, layers, only.tokens, batch_size=batch_size, desc=desc)
    sums: dict[int, torch.Tensor] = {}
    total, previous = 0, None
    for key_set in sets:
        weight = key_set.share / max(sum(len(row) for row in key_set.tokens.ids), 1)
        for s in sums.values():
            s.mul_(previous / weight)
        _, count = key_sums(
            model,
            adapter,
            layers,
            key_set.tokens,
            sums,
            batch_size=batch_size,
            desc=f"{key_set.name} keys",
        )
        total, previous = total + count, weight
    for s in sums.values():
        s.mul_(previous)
    return sums, total
