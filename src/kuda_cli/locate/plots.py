"""Plots of tracing results: ROME-style heatmaps (tokens x layers) of the indirect effect, and the
effect per layer at the last corrupted token with the selected window shaded. Figures are drawn
without pyplot (no global state, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kuda_cli.locate.effects import CATEGORIES
from kuda_cli.locate.tracing import KINDS

COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLORS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
XLABELS = {
    "hidden": "single restored layer",
    "mlp": "center of the window of {window} restored MLP layers",
    "attn": "center of the window of {window} restored attention layers",
}
TITLES = {
    "hidden": "Restoring the hidden state",
    "mlp": "Restoring MLP outputs",
    "attn": "Restoring attention outputs",
}


def heatmap(
    effect: np.ndarray,
    labels: Sequence[str],
    kind: str,
    path: str | Path,
    *,
    window: int,
    title: str = "",
    value_label: str = "indirect effect on p(target)",
) -> None:
    """`effect`: (rows, layers), one row per token (or token category); NaN rows stay blank."""
    rows, layers = effect.shape
    fig = Figure(figsize=(max(4.0, 0.16 * layers + 2.0), 0.28 * rows + 1.6), dpi=150)
    ax = fig.add_subplot()
    finite = effect[np.isfinite(effect)]
    top = float(finite.max()) if finite.size else 1.0
    bottom = min(0.0, float(finite.min())) if finite.size else 0.0
    mesh = ax.pcolormesh(
        np.ma.masked_invalid(effect), cmap=COLORMAPS[kind], vmin=bottom, vmax=max(top, 1e-9)
    )
    ax.invert_yaxis()
    ax.set_yticks(np.arange(rows) + 0.5, labels, fontsize=7)
    step = 5 if layers > 12 else 1
    ax.set_xticks(np.arange(0, layers, step) + 0.5, [str(i) for i in range(0, layers, step)])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(XLABELS[kind].format(window=window), fontsize=8)
    ax.set_title(title or TITLES[kind], fontsize=9)
    bar = fig.colorbar(mesh, ax=ax)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(value_label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def shorten(text: str, width: int = 48) -> str:
    """One line of at most `width` characters, for titles."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def token_labels(tokens: Sequence[str], span: tuple[int, int]) -> list[str]:
    """Tokens as plot labels, the corrupted ones marked with '*' (as ROME does)."""
    return [
        f"{tok.strip() or repr(tok)}{'*' if span[0] <= t < span[1] else ''}"
        for t, tok in enumerate(tokens)
    ]


def effect_by_layer(
    curves: dict[str, np.ndarray],
    selected: Sequence[int],
    path: str | Path,
    *,
    module: str,
    title: str = "Average indirect effect at the last corrupted token",
) -> None:
    """One line per module kind over the layers; the selected layers shaded."""
    fig = Figure(figsize=(6.0, 3.4), dpi=150)
    ax = fig.add_subplot()
    for kind, curve in curves.items():
        ax.plot(
            np.arange(len(curve)),
            curve,
            marker="o",
            markersize=3,
            label=kind,
            color=COLORS.get(kind),
        )
    if selected:
        ax.axvspan(
            min(selected) - 0.5,
            max(selected) + 0.5,
            color="0.85",
            zorder=0,
            label=f"selected ({module}): {min(selected)}-{max(selected)}",
        )
    ax.axhline(0.0, color="0.5", linewidth=0.6)
    ax.set_xlabel("layer (center of the restored window for mlp and attn)", fontsize=8)
    ax.set_ylabel("indirect effect on p(target)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def write_trace_plots(
    out: Path, encoded, traces, curves, averages, selected: list[int], locate
) -> None:
    """trace/'s PNGs: per kind the heatmap of `averages` (by token category, from effects.npz),
    one per probe for the first `locate.plot_probes`, and the effect by layer."""
    n = len(encoded)
    for kind in KINDS:
        heatmap(
            averages[kind],
            list(CATEGORIES),
            kind,
            out / f"heatmap_{kind}.png",
            window=locate.window,
            title=f"{TITLES[kind]}\naverage over {n} probes",
        )
        for i, (enc, tr) in enumerate(zip(encoded[: locate.plot_probes], traces, strict=False)):
            heatmap(
                tr.effect(kind),
                token_labels(enc.tokens, enc.span),
                kind,
                out / f"heatmap_{kind}_probe{i}.png",
                window=locate.window,
                title=f"{TITLES[kind]}\n{shorten(enc.probe.prompt)} -> "
                f"{enc.probe.target.strip()!r}",
            )
    effect_by_layer(curves, selected, out / "effect_by_layer.png", module=locate.module)
