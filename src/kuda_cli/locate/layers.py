"""trace/layers.json: the layers a trace selected, with what it traced (model, weights, data) and
a checksum of its content, read back by `kuda unlearn` (`locate.from_run`, or a resumed run)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from kuda_cli.cache import write_json_atomic
from kuda_cli.errors import UserError

log = logging.getLogger(__name__)
TRACE_DIR = "trace"  # under a run directory
LAYERS_FILE = "layers.json"


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
