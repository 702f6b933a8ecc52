"""Causal tracing, ROME-style: the probability of a probe's target in a clean run, in N runs whose
corrupted span got Gaussian noise on its token embeddings, and in those corrupted runs with the
clean state of one module at one (layer, token position) restored.

Restorations, per module kind, at layer l and position t:
  hidden  the output of decoder block l;
  mlp     the MLP outputs of the window of layers [l - w//2, l + w - w//2) (clipped to the model),
  attn    the attention outputs of that window.

Two implementations compute the same numbers:

* `naive`: ROME's loop, one forward pass over the N corrupted copies per (kind, layer, position),
  the clean state put back by a hook.
* `fast` (the default): a restoration at position t changes nothing at positions before t, nor
  anything below the first restored layer. So each restored sequence starts from the corrupted
  run's cached hidden states at that layer, runs positions t.. only (the corrupted run's keys and
  values of positions < t are the attention prefix), and only the layers above; all
  restorations of one position go through the decoder blocks together, a block at a time, each
  joining the batch at its first layer. Positions before the corrupted span are not traced at all:
  their clean and corrupted states are the same, so restoring them is a no-op (their restored
  probability is the corrupted one).

The fast path calls the model's own decoder blocks with the arguments the model itself passes to
them (captured once per position by a forward pre-hook), so it works for every family the
adapters name.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache

from kuda_cli.locate.probes import EncodedProbe
from kuda_cli.models.adapter import Adapter
from kuda_cli.models.hooks import StopForward, main_tensor, trace

KINDS = ("hidden", "mlp", "attn")
# ROME's token categories for averaging over prompts of different lengths
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


@dataclass
class ProbeTrace:
    """One probe's tracing results: probabilities of the target's first token."""

    clean: float
    corrupted: float  # mean over the noise samples
    restored: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (tokens, layers)
    corrupted_samples: np.ndarray | None = None  # (samples,)

    def effect(self, kind: str) -> np.ndarray:
        """Indirect effect: restored minus corrupted probability, (tokens, layers)."""
        return self.restored[kind] - self.corrupted


def restored_layers(kind: str, layer: int, num_layers: int, window: int) -> range:
    """The layers whose `kind` state is restored for a restoration "at" `layer`."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(num_layers, layer + window - window // 2))


def module_name(adapter: Adapter, kind: str, layer: int) -> str:
    return adapter.module_name("layer" if kind == "hidden" else kind, layer)


def embedding_std(model: nn.Module, adapter: Adapter, encoded: Sequence[EncodedProbe]) -> float:
    """Standard deviation of the embeddings of every corrupted token of every probe (ROME takes
    that of the subjects' token embeddings over its dataset)."""
    device = next(model.parameters()).device
    ids = [i for e in encoded for i in e.input_ids[e.span[0] : e.span[1]]]
    with torch.inference_mode():
        embeds = adapter.embedding(model)(torch.tensor(ids, device=device))
    return embeds.float().std().item()


def make_noise(samples: int, span_len: int, hidden: int, scale: float, seed: int) -> torch.Tensor:
    """(samples, span_len, hidden) Gaussian noise of std `scale`, from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, span_len, hidden, generator=generator) * scale


def noise_seed(seed: int, index: int) -> int:
    """The noise seed of probe `index` of a run seeded `seed` (well mixed: no two (seed, index)
    pairs share noise by accident)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def trace_probes(
    model: nn.Module,
    adapter: Adapter,
    encoded: Sequence[EncodedProbe],
    *,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    window: int = 10,
    naive: bool = False,
    batch_tokens: int = 16384,
) -> tuple[list[ProbeTrace], float]:
    """Trace every probe; the noise std is `noise` times the std of the corrupted tokens'
    embeddings over all probes, probe i's noise drawn from `noise_seed(seed, i)`. Returns the
    traces and the noise std."""
    std = noise * embedding_std(model, adapter, encoded)
    hidden = adapter.embedding(model).embedding_dim
    traces = []
    device = next(model.parameters()).device
    with attention(model, "eager" if device.type == "cpu" else None):
        for i, enc in enumerate(tqdm(encoded, desc="causal tracing", unit="probe")):
            span_len = enc.span[1] - enc.span[0]
            probe_noise = make_noise(samples, span_len, hidden, std, noise_seed(seed, i))
            traces.append(
                trace_probe(
                    model,
                    adapter,
                    enc,
                    probe_noise,
                    kinds=kinds,
                    window=window,
                    naive=naive,
                    batch_tokens=batch_tokens,
                )
            )
    return traces, std


@contextlib.contextmanager
def attention(model: nn.Module, implementation: str | None):
    """Run the model with another attention implementation (None: leave it), then restore it.
    On the CPU, the restorations' short queries (a few positions against a prefix of ten or so,
    times thousands of rows) run 11% faster end to end with the plain matmul-softmax attention
    than with the fused SDPA kernel, whose per-head set-up dominates at that size."""
    current = getattr(model.config, "_attn_implementation", None)
    if implementation is None or current in (None, implementation):
        yield
        return
    _set_attention(model, implementation)
    try:
        yield
    finally:
        _set_attention(model, current)


def _set_attention(model: nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.56
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


# CPU features with bf16 matrix units: AMX tiles (Intel Sapphire Rapids and later) or AVX-512
# BF16 (Cooper Lake, AMD Zen 4 and later); there a bf16 matmul runs 2-4x faster than float32
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16_units(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags name a bf16 matrix unit."""
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()
    }
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are faster than float32 ones here: CUDA with bf16 support,
    or a CPU with bf16 matrix units (Linux /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return cpu_has_bf16_units(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` made concrete: `bfloat16` where `fast_bf16`, else `float32`."""
    if precision == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a tracing precision (`float32` or `bfloat16`)."""
    if precision == "bfloat16" and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _add_noise(span: tuple[int, int], noise: torch.Tensor) -> Callable:
    def edit(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, span[0] : span[1]] += noise.to(out.dtype)
        return out

    return edit


@dataclass
class _Runs:
    """What the clean and the corrupted passes leave for the restorations."""

    clean_prob: float
    clean: dict[str, torch.Tensor]  # module name -> (tokens, hidden) clean output
    corrupted_probs: torch.Tensor  # (samples,)
    block_in: list[torch.Tensor] = field(default_factory=list)  # per layer (samples, T, hidden)
    block_out: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (samples, heads, T, dim)
    values: list[torch.Tensor] = field(default_factory=list)


def _clean_and_corrupted(
    model: nn.Module,
    adapter: Adapter,
    enc: EncodedProbe,
    noise: torch.Tensor,
    kinds: Sequence[str],
    *,
    keep_corrupted: bool,
) -> _Runs:
    device = next(model.parameters()).device
    num_layers = adapter.num_layers(model)
    ids = torch.tensor([enc.input_ids], device=device)
    names = [module_name(adapter, kind, k) for kind in kinds for k in range(num_layers)]
    with trace(model, names) as rec:
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
    clean = {name: rec[name].output[0] for name in names}
    clean_prob = target_probs(logits, enc.target_id).item()

    samples = noise.shape[0]
    layers = [adapter.layer_name(k) for k in range(num_layers)] if keep_corrupted else []
    edit = {adapter.embed: _add_noise(enc.span, noise.to(device))}
    with trace(model, layers, inputs=True, edit=edit) as rec:
        out = model(input_ids=ids.expand(samples, -1), use_cache=keep_corrupted, logits_to_keep=1)
    runs = _Runs(clean_prob, clean, target_probs(out.logits[:, -1], enc.target_id))
    if keep_corrupted:
        runs.block_in = [rec[name].input for name in layers]
        runs.block_out = [rec[name].output for name in layers]
        cache = _returned_cache(out)
        runs.keys = [layer.keys for layer in cache.layers]
        runs.values = [layer.values for layer in cache.layers]
        if any(k.shape[-2] != len(enc.input_ids) for k in runs.keys):
            raise ValueError(
                f"probe {enc.probe.id!r} ({len(enc.input_ids)} tokens) is longer than the "
                "model's sliding attention window; trace it with naive=True"
            )
    return runs


def trace_probe(
    model: nn.Module,
    adapter: Adapter,
    enc: EncodedProbe,
    noise: torch.Tensor,
    *,
    kinds: Sequence[str] = KINDS,
    window: int = 10,
    naive: bool = False,
    batch_tokens: int = 16384,
) -> ProbeTrace:
    """Trace one probe. `noise`: (samples, span length, hidden), added to the corrupted span's
    embeddings. `batch_tokens`: restored tokens per forward pass (fast path)."""
    with torch.inference_mode():
        runs = _clean_and_corrupted(model, adapter, enc, noise, kinds, keep_corrupted=not naive)
        restore = _restore_naive if naive else _restore_fast
        restored = restore(model, adapter, enc, noise, runs, kinds, window, batch_tokens)
    corrupted = runs.corrupted_probs.cpu().numpy()
    return ProbeTrace(
        clean=runs.clean_prob,
        corrupted=float(corrupted.mean()),
        restored={k: v.astype(np.float64) for k, v in restored.items()},
        corrupted_samples=corrupted,
    )


# ----------------------------------------------------------------------------- naive
def _restore_naive(model, adapter, enc, noise, runs, kinds, window, batch_tokens):
    device = next(model.parameters()).device
    num_layers, tokens = adapter.num_layers(model), len(enc.input_ids)
    ids = torch.tensor([enc.input_ids], device=device).expand(noise.shape[0], -1)
    add_noise = _add_noise(enc.span, noise.to(device))
    out = {}
    for kind in kinds:
        out[kind] = np.zeros((tokens, num_layers))
        for layer in range(num_layers):
            span = restored_layers(kind, layer, num_layers, window)
            names = [module_name(adapter, kind, k) for k in span]
            for t in range(tokens):
                edit = {name: _set_position(t, runs.clean[name][t]) for name in names}
                with trace(model, [], outputs=False, edit={adapter.embed: add_noise, **edit}):
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


def _cache_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes a KV cache by: `cache` from transformers 5.x on,
    `past_key_values` before (5.x still accepts it, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out) -> Cache:
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
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_keyword(model): prefix})
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _restore_fast(model, adapter, enc, noise, runs, kinds, window, batch_tokens):
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


# ----------------------------------------------------------------------------- summaries
def token_categories(enc: EncodedProbe) -> list[int | None]:
    """ROME's category of each token (an index into CATEGORIES; None before the span)."""
    start, end = enc.span
    last = len(enc.input_ids) - 1
    out: list[int | None] = []
    for t in range(len(enc.input_ids)):
        if t == last:
            out.append(5)
        elif t < start:
            out.append(None)
        elif t == start:
            out.append(0 if end - start > 1 else 2)
        elif t < end - 1:
            out.append(1)
        elif t == end - 1:
            out.append(2)
        elif t == end:
            out.append(3)
        else:
            out.append(4)
    return out


def average_by_category(matrices: Sequence[np.ndarray], encoded: Sequence[EncodedProbe]):
    """Mean over probes of (tokens, layers) matrices folded into ROME's token categories
    (tokens of one category are averaged within a probe first): (categories, layers), NaN where
    no probe has the category."""
    num_layers = matrices[0].shape[1]
    sums = np.zeros((len(CATEGORIES), num_layers))
    counts = np.zeros(len(CATEGORIES))
    for matrix, enc in zip(matrices, encoded, strict=True):
        cats = token_categories(enc)
        for c in range(len(CATEGORIES)):
            cols = [t for t, cat in enumerate(cats) if cat == c]
            if cols:
                sums[c] += matrix[cols].mean(axis=0)
                counts[c] += 1
    with np.errstate(invalid="ignore"):
        return sums / counts[:, None]
