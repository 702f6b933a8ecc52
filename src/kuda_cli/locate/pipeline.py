"""Finding the layers to unlearn: `locate=fixed`'s, a previous trace run's, or traced now on the
data's probes (effects.npz, heatmaps and layers.json written into the run's trace/ directory)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from kuda_cli.errors import UserError
from kuda_cli.locate.effects import effect_arrays
from kuda_cli.locate.layers import TRACE_DIR, read_layers, write_layers
from kuda_cli.locate.plots import write_trace_plots
from kuda_cli.locate.probes import build_probes, choose, encode, probe_source
from kuda_cli.locate.select import last_subject_scores, select_window
from kuda_cli.locate.tracing import KINDS, trace_probes
from kuda_cli.models.loading import LoadedModel
from kuda_cli.models.precision import autocast, resolve_precision

if TYPE_CHECKING:
    from kuda_cli.run import Run

log = logging.getLogger(__name__)


def locate_layers(
    cfg: DictConfig, loaded: LoadedModel, run_dir: Path, run: Run, model_key: str
) -> list[int]:
    """The layers to unlearn: `locate=fixed`'s, a previous trace run's, or traced now (writing
    the same files as `kuda trace` into run_dir/trace/)."""
    if cfg.locate.method == "fixed":
        return list(cfg.locate.layers)
    if cfg.locate.from_run:
        layers = read_layers(cfg.locate.from_run, loaded.num_layers, model_key)
        log.info("layers %s from %s", layers, cfg.locate.from_run)
        return layers
    return trace_layers(cfg, loaded, run_dir, run, model_key)


def trace_layers(
    cfg: DictConfig, loaded: LoadedModel, run_dir: Path, run: Run, model_key: str
) -> list[int]:
    """Trace the data's probes, write run_dir/trace/, and return the selected layers."""
    locate = cfg.locate
    source = probe_source(cfg)
    chosen = choose(build_probes(cfg), locate.max_probes, cfg.seed)
    if not chosen:
        raise UserError(f"data={cfg.data.name} gave no probes to trace")
    max_tokens = locate.get("max_tokens")
    encoded = [encode(loaded.tokenizer, p, max_tokens) for p in chosen]
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
    log.info(
        "tracing %d probes (%s), %d noise samples each, %d layers (%s), %s",
        len(encoded),
        source,
        locate.samples,
        loaded.num_layers,
        ", ".join(KINDS),
        resolve_precision(locate.precision, loaded.device),
    )
    precision = resolve_precision(locate.precision, loaded.device)
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
        "probe_source": source,
        "max_tokens": max_tokens,
        "truncated_probes": truncated,
        "samples": locate.samples,
        "precision": precision,
        "noise_std": noise_std,
        "window": locate.window,
        "model": cfg.model.name,
        "model_key": model_key,
        "data": cfg.data.name,
    }
    write_layers(out, summary)
    clean = float(np.mean([t.clean for t in traces]))
    corrupted = float(np.mean([t.corrupted for t in traces]))
    run.log_metrics(
        {
            "trace": {
                "layers": selection.layers,
                "module": locate.module,
                "window_score": selection.score,
                "probes": len(encoded),
                "truncated_probes": truncated,
                "clean_prob": clean,
                "corrupted_prob": corrupted,
                "noise_std": noise_std,
                "seconds": round(seconds, 1),
            }
        }
    )
    log.info(
        "selected layers %s (%s effect at the last subject token, window mean %.4f); "
        "p(target) clean %.3f, corrupted %.3f; %.0f s",
        selection.layers,
        locate.module,
        selection.score,
        clean,
        corrupted,
        seconds,
    )
    return selection.layers
