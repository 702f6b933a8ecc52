"""Shared fixtures: tiny random models built in memory, and a helper that runs the `kuda`
command in a subprocess inside a temporary working directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def loaded():
    """The tiny random model, loaded once per test module (attacks give it back unchanged)."""
    from kuda_cli.config import ModelConfig, TinySpec
    from kuda_cli.models.loading import load_model

    return load_model(ModelConfig(name="t", source="tiny-random", tiny=TinySpec(), device="cpu"))


@pytest.fixture
def lm_eval_contexts(monkeypatch) -> list[str]:
    """The contexts of every loglikelihood request lm-eval makes of a Hugging Face model."""
    from lm_eval.models.huggingface import HFLM

    contexts: list[str] = []
    scored = HFLM.loglikelihood

    def spy(self, requests, *args, **kwargs):
        contexts.extend(r.args[0] for r in requests)
        return scored(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    return contexts


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


def memorise(model, tokenizer, texts: list[str], steps: int = 30, lr: float = 1e-2) -> None:
    """Fine-tune `model` on `texts` until it has them by heart (a membership attack's members)."""
    import torch

    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def read_json(path: Path):
    return json.loads(Path(path).read_text())


SLOWED = Path(__file__).with_name("slowed_kuda.py")


def log_rows(cwd: Path, pattern: str) -> int:
    """Rows of the train log(s) matching `pattern` under cwd (0 while none exists)."""
    return max((len(p.read_text().splitlines()) for p in cwd.glob(pattern)), default=0)


def kuda_killed(
    args: list[str],
    cwd: Path,
    log: str,
    rows: int,
    *,
    env: dict | None = None,
    timeout=300,
    sig: int = signal.SIGKILL,
) -> int:
    """Run `kuda ARGS` (steps slowed to 0.2 s, tests/slowed_kuda.py) in cwd and SIGKILL it (or
    send `sig`) from outside once the train log `log` (a glob under cwd) holds `rows` rows, as
    `kill -9` would; its return code (-9 when killed, else what it exited with)."""
    with open(cwd / "killed.stderr", "a") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SLOWED), *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if log_rows(cwd, log) >= rows:
                proc.send_signal(sig)
                break
            time.sleep(0.01)
        else:
            if proc.poll() is None:  # never reached `rows`: do not leave it running
                proc.kill()
                proc.wait()
                raise AssertionError(f"kuda {' '.join(args)} did not reach {rows} rows in {log}")
        return proc.wait(timeout=timeout)


def install_plugin(tmp_path: Path, monkeypatch, group: str, name: str, module: str, yamls: dict):
    """A plug-in as a user outside kuda ships one: its module in a site directory with a
    distribution whose entry point names it (`group`, `name`), its YAML options in a config
    directory; returns the override that makes Hydra search that directory."""
    site = tmp_path / "site"
    dist = site / f"{name}_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / f"{name}_plugin.py").write_text(module)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {name}_plugin\n")
    for path, text in yamls.items():
        (tmp_path / "conf" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / path).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def method_on(name: str, model, tokenizer, forget, retain, *, context=None, **overrides):
    """(method, cfg): unlearning method `name` on token sets `forget` and `retain`, trained
    layers [1], its schema's config with batch_size 2 and `overrides`; every item drawn unless
    `context` (MethodContext fields) says otherwise."""
    from omegaconf import OmegaConf

    from kuda_cli.models.adapter import get_adapter
    from kuda_cli.unlearn.methods import MethodContext, get_method

    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(get_method(name).schema),
            {"method": name, "batch_size": 2, **overrides},
        )
    )
    fields = {
        "forget_used": list(range(len(forget))),
        "retain_used": list(range(len(retain))),
        **(context or {}),
    }
    ctx = MethodContext(model, get_adapter(model), tokenizer, [1], cfg, forget, retain, **fields)
    return get_method(name)(ctx), cfg
