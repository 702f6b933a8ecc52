"""Shared fixtures: tiny random models built in memory, and a helper that runs the `kuda`
command in a subprocess inside a temporary working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach a model or dataset hub; set before transformers reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from kuda_cli.config import TinySpec
from kuda_cli.models.tiny import tiny_random

try:  # rouge_score (a test oracle) imports absl, whose handler keeps the sys.stderr of its import
    # time (pytest's capture) and closes that stream when an in-process `kuda` run's logging
    # setup (Hydra's dictConfig) shuts the old handlers down: every later test then fails to
    # report. The real stderr is one absl leaves open.
    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
except ImportError:
    pass

FAST_EVAL = [
    "model=tiny-random",
    "eval.metrics=[perplexity]",
    "eval.perplexity.max_texts=4",
    "eval.perplexity.max_length=64",
]


@pytest.fixture
def tiny():
    model, tokenizer = tiny_random(
        TinySpec(num_layers=3, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    )
    return model.eval(), tokenizer


@pytest.fixture
def kuda(tmp_path):
    """Run `kuda ARGS...` in tmp_path; returns the CompletedProcess."""

    def run(
        *args: str, cwd: Path | None = None, check: bool = False
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "kuda_cli.cli", *args],
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kuda {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    return run


def read_json(path: Path):
    return json.loads(Path(path).read_text())
