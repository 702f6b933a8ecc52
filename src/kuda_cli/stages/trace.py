"""kuda trace: causal tracing on the data's probes. Writes trace/effects.npz, ROME-style heatmaps,
trace/effect_by_layer.png and trace/layers.json (the selected window of layers).

`locate_layers` gives `kuda unlearn` its layers: the fixed ones, those of a previous trace run
(`locate.from_run`), or traced inline into the run's own trace/ directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from kuda_cli.cache import model_fingerprint
from kuda_cli.data.facts import load_facts, probes, select_domains
from kuda_cli.data.sources import load_split
from kuda_cli.errors import UserError
from kuda_cli.locate import plots
from kuda_cli.locate.probes import (
    EncodedProbe,
    TraceProbe,
    choose,
    encode,
    from_facts,
    from_qa,
    from_wmdp,
)
from kuda_cli.locate.select import last_subject_scores, select_window
from kuda_cli.locate.tracing import (
    CATEGORIES,
    KINDS,
    ProbeTrace,
    autocast,
    average_by_category,
    resolve_precision,
    trace_probes,
)
from kuda_cli.models.loading import LoadedModel
from kuda_cli.run import Run, write_json_atomic
from kuda_cli.stages.common import load_configured_model

log = logging.getLogger(__name__)
TRACE_DIR = "trace"
LAYERS_FILE = "layers.json"


def run(cfg: DictConfig, run: Run) -> None:
    loaded = load_configured_model(cfg, run)
    if cfg.locate.method == "fixed" or cfg.locate.from_run:
        log.info("kuda trace always traces: locate=fixed and locate.from_run apply to kuda unlearn")
    trace_layers(cfg, loaded, run.dir, run, model_fingerprint(loaded.model))


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


def _checksum(summary: dict) -> str:
    body = {k: v for k, v in summary.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_layers(out: Path, summary: dict) -> None:
    """trace/layers.json, with the checksum of its content (checked by read_layers)."""
    write_json_atomic(out / LAYERS_FILE, {**summary, "checksum": _checksum(summary)})


def read_layers(
    from_run: str, num_layers: int, model_key: str | None = None, *, same_weights: bool = False
) -> list[int]:
    """The layers a trace run selected, from its checked trace/layers.json (files written before
    checksums existed load unchecked). When it traced other weights than model_key: a warning,
    or (same_weights) a UserError."""
    path = Path(from_run).expanduser() / TRACE_DIR / LAYERS_FILE
    fix = "pass the directory of a completed kuda trace run as locate.from_run"
    try:
        summary = json.loads(path.read_text())
        layers = summary["layers"]
        if "checksum" in summary and summary["checksum"] != _checksum(summary):
            raise ValueError("its content does not match its checksum: it was edited or damaged")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"locate.from_run={from_run}: cannot read {path} ({err}); {fix}") from err
    traced = summary.get("model_key")
    if model_key and traced and traced != model_key:
        if same_weights:
            raise UserError(f"{path} was traced on other weights than this run's model")
        log.warning(
            "%s was traced on other weights than this run's model (%s): its layers are used as "
            "given",
            path,
            summary.get("model", "unknown"),
        )
    if not (
        isinstance(layers, list)
        and layers
        and all(isinstance(i, int) and 0 <= i < num_layers for i in layers)
    ):
        raise UserError(
            f"locate.from_run={from_run}: {path} holds layers {layers!r}, not layer indices of "
            f"this model (0..{num_layers - 1}); {fix} on the same model"
        )
    return layers


def build_probes(cfg: DictConfig) -> list[TraceProbe]:
    """Tracing probes from the data group: the forget facts' prompts (subject corrupted), WMDP
    questions or MUSE forget QA (question corrupted)."""
    data = cfg.data
    if data.kind == "facts":
        forget = select_domains(load_facts(data.path), list(data.forget_domains), "forget")
        return from_facts(probes(forget), cfg.locate.span)
    if data.kind == "corpus":
        fields = ("question", "choices", "answer")
        rows = load_split(OmegaConf.to_object(data.questions), "data.questions", fields)
        return from_wmdp(rows, "data.questions")
    if data.kind == "muse":
        split = OmegaConf.to_object(data.knowmem_forget)
        return from_qa(load_split(split, "data.knowmem_forget", ("question", "answer")))
    raise UserError(f"data={data.name} (kind {data.kind}) has no probes for tracing")


def trace_layers(
    cfg: DictConfig, loaded: LoadedModel, run_dir: Path, run: Run, model_key: str
) -> list[int]:
    """Trace the data's probes, write run_dir/trace/, and return the selected layers."""
    locate = cfg.locate
    chosen = choose(build_probes(cfg), locate.max_probes, cfg.seed)
    if not chosen:
        raise UserError(f"data={cfg.data.name} gave no probes to trace")
    encoded = [encode(loaded.tokenizer, p) for p in chosen]
    log.info(
        "tracing %d probes, %d noise samples each, %d layers (%s), %s",
        len(encoded),
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
    np.savez_compressed(out / "effects.npz", **effect_arrays(encoded, traces, curves))
    write_plots(out, encoded, traces, curves, selection.layers, locate)
    summary = {
        "layers": selection.layers,
        "module": locate.module,
        "position": "last corrupted (subject) token",
        "window_score": selection.score,
        "scores": [float(s) for s in curves[locate.module]],
        "select_window": locate.select_window,
        "probes": len(encoded),
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


def write_plots(out: Path, encoded, traces, curves, selected: list[int], locate) -> None:
    n = len(encoded)
    for kind in KINDS:
        average = average_by_category([t.effect(kind) for t in traces], encoded)
        plots.heatmap(
            average,
            list(CATEGORIES),
            kind,
            out / f"heatmap_{kind}.png",
            window=locate.window,
            title=f"{plots.TITLES[kind]}\naverage over {n} probes",
        )
        for i, (enc, tr) in enumerate(zip(encoded[: locate.plot_probes], traces, strict=False)):
            plots.heatmap(
                tr.effect(kind),
                plots.token_labels(enc.tokens, enc.span),
                kind,
                out / f"heatmap_{kind}_probe{i}.png",
                window=locate.window,
                title=f"{plots.TITLES[kind]}\n{plots.shorten(enc.probe.prompt)} -> "
                f"{enc.probe.target.strip()!r}",
            )
    plots.effect_by_layer(curves, selected, out / "effect_by_layer.png", module=locate.module)
