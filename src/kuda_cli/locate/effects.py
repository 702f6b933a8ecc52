"""Tracing results summarised: ROME's token categories, averages over probes of different
lengths, and the arrays of trace/effects.npz."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kuda_cli.locate.probes import EncodedProbe
from kuda_cli.locate.tracing import KINDS, ProbeTrace

# ROME's token categories for averaging over prompts of different lengths
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


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


def effect_arrays(
    encoded: list[EncodedProbe], traces: list[ProbeTrace], curves: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-probe results padded to the longest probe (NaN / empty token), their averages by
    ROME's token categories, and the per-layer effect at the last subject token."""
    n, width = len(encoded), max(len(e.input_ids) for e in encoded)
    num_layers = traces[0].restored[KINDS[0]].shape[1]
    tokens = np.full((n, width), "", dtype=object)
    arrays: dict[str, np.ndarray] = {}
    for kind in KINDS:
        restored = np.full((n, width, num_layers), np.nan)
        for i, (enc, tr) in enumerate(zip(encoded, traces, strict=True)):
            restored[i, : len(enc.input_ids)] = tr.restored[kind]
        corrupted = np.array([t.corrupted for t in traces])[:, None, None]
        arrays[f"{kind}_restored"] = restored
        arrays[f"{kind}_effect"] = restored - corrupted
        arrays[f"{kind}_effect_avg"] = average_by_category(
            [t.effect(kind) for t in traces], encoded
        )
        arrays[f"{kind}_effect_last_subject"] = curves[kind]
    for i, enc in enumerate(encoded):
        tokens[i, : len(enc.tokens)] = enc.tokens
    arrays.update(
        tokens=tokens.astype(str),
        length=np.array([len(e.input_ids) for e in encoded]),
        span=np.array([e.span for e in encoded]),
        target_token=np.array([e.target_id for e in encoded]),
        probe_id=np.array([e.probe.id for e in encoded]),
        prompt=np.array([e.probe.prompt for e in encoded]),
        target=np.array([e.probe.target for e in encoded]),
        clean_prob=np.array([t.clean for t in traces]),
        corrupted_prob=np.array([t.corrupted for t in traces]),
        corrupted_samples=np.array([t.corrupted_samples for t in traces]),
        categories=np.array(CATEGORIES),
    )
    return arrays
