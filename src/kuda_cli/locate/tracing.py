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

The restorations themselves are in `kuda_cli.locate.restore`. The fast path calls the model's
own decoder blocks with the arguments the model itself passes to them (captured once per
position by a forward pre-hook), so it works for every family the adapters name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kuda_cli.config import LocateConfig
from kuda_cli.locate.probes import EncodedProbe
from kuda_cli.locate.restore import (
    Runs,
    add_noise,
    module_name,
    restore_fast,
    restore_naive,
    returned_cache,
    target_probs,
)
from kuda_cli.models.adapter import Adapter
from kuda_cli.models.hooks import trace

KINDS = ("hidden", "mlp", "attn")


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
    samples: int = LocateConfig.samples,
    noise: float = LocateConfig.noise,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    window: int = LocateConfig.window,
    naive: bool = False,
    batch_tokens: int = LocateConfig.batch_tokens,
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


def _clean_and_corrupted(
    model: nn.Module,
    adapter: Adapter,
    enc: EncodedProbe,
    noise: torch.Tensor,
    kinds: Sequence[str],
    *,
    keep_corrupted: bool,
) -> Runs:
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
    edit = {adapter.embed: add_noise(enc.span, noise.to(device))}
    with trace(model, layers, inputs=True, edit=edit) as rec:
        out = model(input_ids=ids.expand(samples, -1), use_cache=keep_corrupted, logits_to_keep=1)
    runs = Runs(clean_prob, clean, target_probs(out.logits[:, -1], enc.target_id))
    if keep_corrupted:
        runs.block_in = [rec[name].input for name in layers]
        runs.block_out = [rec[name].output for name in layers]
        cache = returned_cache(out)
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
    window: int = LocateConfig.window,
    naive: bool = False,
    batch_tokens: int = LocateConfig.batch_tokens,
) -> ProbeTrace:
    """Trace one probe. `noise`: (samples, span length, hidden), added to the corrupted span's
    embeddings. `batch_tokens`: restored tokens per forward pass (fast path)."""
    with torch.inference_mode():
        runs = _clean_and_corrupted(model, adapter, enc, noise, kinds, keep_corrupted=not naive)
        restore = restore_naive if naive else restore_fast
        restored = restore(model, adapter, enc, noise, runs, kinds, window, batch_tokens)
    corrupted = runs.corrupted_probs.cpu().numpy()
    return ProbeTrace(
        clean=runs.clean_prob,
        corrupted=float(corrupted.mean()),
        restored={k: v.astype(np.float64) for k, v in restored.items()},
        corrupted_samples=corrupted,
    )
