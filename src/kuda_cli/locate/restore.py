"""The restorations of causal tracing: a module's clean state put back into the corrupted runs,
ROME's loop (`restore_naive`) or the batched incremental path (`restore_fast`, see
`kuda_cli.locate.tracing`), and the probabilities read off the LM head."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from kuda_cli.models.adapter import Adapter
from kuda_cli.models.hooks import StopForward, main_tensor, trace


def restored_layers(kind: str, layer: int, num_layers: int, window: int) -> range:
    """The layers whose `kind` state is restored for a restoration "at" `layer`."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(num_layers, layer + window - window // 2))


def module_name(adapter: Adapter, kind: str, layer: int) -> str:
    return adapter.module_name("layer" if kind == "hidden" else kind, layer)


def target_probs(logits: torch.Tensor, target: int) -> torch.Tensor:
    """Softmax probability of `target` under each row of (rows, vocab) logits."""
    logits = logits.float()
    return (logits[:, target] - logits.logsumexp(-1)).exp()


HEAD_ROWS = 128  # rows of logits at a time: float32 copies of 128 x vocab stay in cache


def head_probs(model, adapter, hidden: torch.Tensor, target: int) -> torch.Tensor:
    """Probability of `target` at each row of (rows, hidden) last-position states: final norm,
    LM head (and Gemma 2/3's logit soft-capping), softmax, a block of rows at a time."""
    norm = model.get_submodule(adapter.final_norm)
    head = model.get_submodule(adapter.lm_head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    out = []
    for rows in hidden.split(HEAD_ROWS):
        logits = head(norm(rows))
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out.append(target_probs(logits, target))
    return torch.cat(out)


def _set_position(t: int, value: torch.Tensor, rows: torch.Tensor | None = None) -> Callable:
    """An edit that writes `value` at position `t` (of the given rows, or every row)."""

    def edit(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        if rows is None:
            out[:, t] = value
        else:
            out[rows, t] = value
        return out

    return edit


def add_noise(span: tuple[int, int], noise: torch.Tensor) -> Callable:
    def edit(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, span[0] : span[1]] += noise.to(out.dtype)
        return out

    return edit


@dataclass
class Runs:
    """What the clean and the corrupted passes leave for the restorations."""

    clean_prob: float
    clean: dict[str, torch.Tensor]  # module name -> (tokens, hidden) clean output
    corrupted_probs: torch.Tensor  # (samples,)
    block_in: list[torch.Tensor] = field(default_factory=list)  # per layer (samples, T, hidden)
    block_out: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (samples, heads, T, dim)
    values: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------- naive
def restore_naive(model, adapter, enc, noise, runs, kinds, window, batch_tokens):
    device = next(model.parameters()).device
    num_layers, tokens = adapter.num_layers(model), len(enc.input_ids)
    ids = torch.tensor([enc.input_ids], device=device).expand(noise.shape[0], -1)
    noisy = add_noise(enc.span, noise.to(device))
    out = {}
    for kind in kinds:
        out[kind] = np.zeros((tokens, num_layers))
        for layer in range(num_layers):
            span = restored_layers(kind, layer, num_layers, window)
            names = [module_name(adapter, kind, k) for k in span]
            for t in range(tokens):
                edit = {name: _set_position(t, runs.clean[name][t]) for name in names}
                with trace(model, [], outputs=False, edit={adapter.embed: noisy, **edit}):
                    logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
                out[kind][t, layer] = target_probs(logits, enc.target_id).mean().item()
    return out


# ----------------------------------------------------------------------------- fast
@dataclass(frozen=True)
class _Row:
    """One restored sequence: module kind, traced layer, noise sample."""

    kind: str
    layer: int
    sample: int
    start: int  # first decoder block whose computation differs from the corrupted run
    edited: range  # layers whose mlp/attn output is restored (empty for hidden)


def _rows(kinds, num_layers: int, samples: int, window: int) -> list[_Row]:
    """Every restoration that needs computing, sorted by the block where it starts."""
    rows = []
    for kind in kinds:
        for layer in range(num_layers):
            span = restored_layers(kind, layer, num_layers, window)
            # hidden: block `layer`'s output is restored, so blocks from layer + 1 on differ
            start = layer + 1 if kind == "hidden" else span.start
            if start < num_layers:
                edited = range(0) if kind == "hidden" else span
                rows += [_Row(kind, layer, n, start, edited) for n in range(samples)]
    return sorted(rows, key=lambda r: r.start)


def _swap_cache(value, cache: Cache):
    return cache if isinstance(value, Cache) else value


def cache_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes a KV cache by: `cache` from transformers 5.x on,
    `past_key_values` before (5.x still accepts it, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out) -> Cache:
    """The KV cache a forward with `use_cache=True` returned, under either version's name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _block_arguments(model, adapter, enc, runs, t: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the model passes to each decoder block when it runs positions t.. after
    a cached prefix of t positions: masks, position ids and rotary embeddings as the model
    itself builds them."""
    device = next(model.parameters()).device
    num_layers = adapter.num_layers(model)
    captured: list[tuple[tuple, dict]] = [((), {})] * num_layers
    handles = []

    def capture(k):
        def hook(module, args, kwargs):
            captured[k] = (args[1:], dict(kwargs))
            if k == num_layers - 1:  # nothing else is needed: skip the block and the head
                raise StopForward

        return hook

    for k in range(num_layers):
        block = adapter.module(model, "layer", k)
        handles.append(block.register_forward_pre_hook(capture(k), with_kwargs=True))
    prefix = DynamicCache(
        ddp_cache_data=[
            (keys[:1, :, :t], values[:1, :, :t])
            for keys, values in zip(runs.keys, runs.values, strict=True)
        ]
    )
    try:
        ids = torch.tensor([enc.input_ids[t:]], device=device)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): prefix})
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def restore_fast(model, adapter, enc, noise, runs, kinds, window, batch_tokens):
    num_layers, tokens, samples = adapter.num_layers(model), len(enc.input_ids), noise.shape[0]
    probs = {kind: np.zeros((tokens, num_layers, samples)) for kind in kinds}
    corrupted = runs.corrupted_probs.cpu().numpy()
    for kind in kinds:  # before the span, clean and corrupted states are the same
        probs[kind][: enc.span[0]] = corrupted
    if "hidden" in kinds:  # the last block's output feeds the head only at the last position
        probs["hidden"][:, -1] = corrupted
        probs["hidden"][-1, -1] = runs.clean_prob
    rows = _rows(kinds, num_layers, samples, window)
    for t in range(enc.span[0], tokens):
        arguments = _block_arguments(model, adapter, enc, runs, t)
        size = max(1, batch_tokens // (tokens - t))  # sequences of tokens - t positions
        for first in range(0, len(rows), size):
            chunk = rows[first : first + size]
            p = _run_chunk(model, adapter, enc, runs, arguments, chunk, t).cpu().numpy()
            for row, value in zip(chunk, p, strict=True):
                probs[row.kind][t, row.layer, row.sample] = value
    return {kind: probs[kind].mean(-1) for kind in kinds}


def _run_chunk(model, adapter, enc, runs, arguments, chunk: list[_Row], t: int) -> torch.Tensor:
    """Target probabilities of restored sequences (sorted by start), positions t.. only, each
    joining the batch at its first differing block."""
    num_layers = adapter.num_layers(model)
    device = runs.block_in[0].device
    sample_of = torch.tensor([r.sample for r in chunk], device=device)
    edits = {}
    for kind in ("mlp", "attn"):
        for k in range(num_layers):
            idx = [i for i, r in enumerate(chunk) if r.kind == kind and k in r.edited]
            if idx:
                name = adapter.module_name(kind, k)
                rows = torch.tensor(idx, device=device)
                edits[name] = _set_position(0, runs.clean[name][t], rows)
    hidden = runs.block_in[0].new_zeros((0, len(enc.input_ids) - t, runs.block_in[0].shape[-1]))
    joined = 0
    with trace(model, [], outputs=False, edit=edits):
        for k in range(num_layers):
            new = [r for r in chunk[joined:] if r.start == k]
            if new:
                hidden = torch.cat([hidden, _entry_states(adapter, runs, new, k, t)])
                joined += len(new)
            if joined == 0:
                continue
            active = sample_of[:joined]
            cache = DynamicCache(
                ddp_cache_data=[(None, None)] * k
                + [(runs.keys[k][active, :, :t], runs.values[k][active, :, :t])]
            )
            args, kwargs = arguments[k]
            args = tuple(_swap_cache(a, cache) for a in args)
            kwargs = {key: _swap_cache(v, cache) for key, v in kwargs.items()}
            block = adapter.module(model, "layer", k)
            hidden = main_tensor(block(hidden, *args, **kwargs))
    return head_probs(model, adapter, hidden[:, -1], enc.target_id)


def _entry_states(adapter, runs, rows: list[_Row], k: int, t: int) -> torch.Tensor:
    """Inputs of block k, positions t.., for restorations that start there."""
    out = []
    for r in rows:
        if r.kind == "hidden":  # block k-1's corrupted output with position t restored
            state = runs.block_out[k - 1][r.sample, t:].clone()
            state[0] = runs.clean[adapter.layer_name(k - 1)][t]
        else:
            state = runs.block_in[k][r.sample, t:]
        out.append(state)
    return torch.stack(out)
