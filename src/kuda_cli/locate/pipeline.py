"""Finding the layers to unlearn: `locate=fixed`'s, a previous trace run's, this run's own earlier
trace (a resumed run), or traced now on the data's probes (effects.npz, heatmaps and layers.json
written into the run's trace/ directory). The entry points return the layers and, when they
traced, the `trace` record for the run's metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from kuda_cli.errors import UserError
from kuda_cli.locate.effects import effect_arrays
from kuda_cli.locate.layers import LAYERS_FILE, TRACE_DIR, read_layers, write_layers
from kuda_cli.locate.plots import write_trace_plots
from kuda_cli.locate.probes import EncodedProbe, build_probes, choose, encode, probe_source
from kuda_cli.locate.select import last_subject_scores, select_window
from kuda_cli.locate.tracing import KINDS, trace_probes
from kuda_cli.models.loading import LoadedModel
from kuda_cli.models.precision import autocast, resolve_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Located:
    layers: list[int]
    trace: dict[str, Any] | None = None  # metrics.json's `trace` when traced now


def find_layers(cfg: DictConfig, loaded: LoadedModel, run_dir: Path, model_key: str) -> Located:
    """The layers to unlearn: those this run traced before (a resumed run, unless what it wrote
    cannot be trusted); else `locate=fixed`'s, a previous trace run's, or traced now (writing
    the same files as `kuda trace` into run_dir/trace/)."""
    own = Path(run_dir) / TRACE_DIR / LAYERS_FILE  # written only by tracing: never with fixed
    if not cfg.locate.from_run and own.exists():  # a resumed run: tracing is not redone...
        try:
            layers = read_layers(str(run_dir), loaded.num_layers, model_key, same_weights=True)
            log.info("resumed run: the layers this run traced before")
            return Located(layers)
        except UserError as err:  # ...unless what it wrote cannot be trusted
            log.warning("this run's earlier trace cannot be reused (%s): tracing again", err)
    if cfg.locate.method == "fixed":
        return Located(list(cfg.locate.layers))
    if cfg.locate.from_run:
        layers = read_layers(cfg.locate.from_run, loaded.num_layers, model_key)
        log.info("layers %s from %s", layers, cfg.locate.from_run)
        return Located(layers)
    return trace_layers(cfg, loaded, run_dir, model_key)


def trace_layers(cfg: DictConfig, loaded: LoadedModel, run_dir: Path, model_key: str) -> Located:
    """Trace the data's probes, write run_dir/trace/, and return the selected layers."""
    locate = cfg.locate
    encoded = encoded_probes(cfg, loaded.tokenizer)
    precision = resolve_precision(locate.precision, loaded.device)
    log.info(
        "tracing %d probes (%s), %d noise samples each, %d layers (%s), %s",
        len(encoded),
        probe_source(cfg),
        locate.samples,
        loaded.num_layers,
        ", ".join(KINDS),
        precision,
    )
    start = time.perf_counter()
    with autocast(precision, loaded.device):
        traces, noise_std = trace_probes(
            loaded.model,
            loaded.adapter,
            encoded,
            samples=locate.samples,
            noise=locate.noise,
            seed=cfg.seed,
            window=locate.window,
            batch_tokens=locate.batch_tokens,
        )
    seconds = time.perf_counter() - start
    out = Path(run_dir) / TRACE_DIR
    out.mkdir(parents=True, exist_ok=True)
    summary = write_trace(out, cfg, encoded, traces, precision, noise_std, model_key)
    clean = float(np.mean([t.clean for t in traces]))
    corrupted = float(np.mean([t.corrupted for t in traces]))
    log.info(
        "selected layers %s (%s effect at the last subject token, window mean %.4f); "
        "p(target) clean %.3f, corrupted %.3f; %.0f s",
        summary["layers"],
        locate.module,
        summary["window_score"],
        clean,
        corrupted,
        seconds,
    )
    record = {
        "layers": summary["layers"],
        "module": locate.module,
        "window_score": summary["window_score"],
        "probes": len(encoded),
        "truncated_probes": summary["truncated_probes"],
        "clean_prob": clean,
        "corrupted_prob": corrupted,
        "noise_std": noise_std,
        "seconds": round(seconds, 1),
    }
    return Located(summary["layers"], record)


def encoded_probes(cfg: DictConfig, tokenizer) -> list[EncodedProbe]:
    """The data's probes (at most locate.max_probes, chosen by the seed), tokenised for tracing:
    left-truncated to locate.max_tokens prompt tokens."""
    chosen = choose(build_probes(cfg), cfg.locate.max_probes, cfg.seed)
    if not chosen:
        raise UserError(f"data={cfg.data.name} gave no probes to trace")
    max_tokens = cfg.locate.get("max_tokens")
    encoded = [encode(tokenizer, p, max_tokens) for p in chosen]
    truncated = sum(1 for e in encoded if e.truncated)
    if truncated:
        log.info(
            "%d of %d probes left-truncated to locate.max_tokens=%d prompt tokens (%d tokens "
            "dropped in all)",
            truncated,
            len(encoded),
            max_tokens,
            sum(e.truncated for e in encoded),
        )
    return encoded


def write_trace(
    out: Path,
    cfg: DictConfig,
    encoded: list[EncodedProbe],
    traces: list,
    precision: str,
    noise_std: float,
    model_key: str,
) -> dict[str, Any]:
    """Select the window of layers from the traces and write out/effects.npz, the plots and
    out/layers.json; returns what layers.json holds."""
    locate = cfg.locate
    last = [e.last_subject for e in encoded]
    curves = {k: last_subject_scores([t.effect(k) for t in traces], last) for k in KINDS}
    selection = select_window(curves[locate.module], locate.select_window)
    arrays = effect_arrays(encoded, traces, curves)
    np.savez_compressed(out / "effects.npz", **arrays)
    averages = {kind: arrays[f"{kind}_effect_avg"] for kind in KINDS}
    write_trace_plots(out, encoded, traces, curves, averages, selection.layers, locate)
    summary = {
        "layers": selection.layers,
        "module": locate.module,
        "position": "last corrupted (subject) token",
        "window_score": selection.score,
        "scores": [float(s) for s in curves[locate.module]],
        "select_window": locate.select_window,
        "probes": len(encoded),
        "probe_source": probe_source(cfg),
        "max_tokens": locate.get("max_tokens"),
        "truncated_probes": sum(1 for e in encoded if e.truncated),
        "samples": locate.samples,
        "precision": precision,
        "noise_std": noise_std,
        "window": locate.window,
        "model": cfg.model.name,
        "model_key": model_key,
        "data": cfg.data.name,
    }
    write_layers(out, summary)
    return summary
