"""Without the Hugging Face hub, a run that needs something the local cache lacks stops at once
with one line naming the option that gives a local copy; what the cache holds still loads, in
offline mode; a run that needs nothing from the hub asks nothing of the network.

The unreachable hub is simulated deterministically: HF_ENDPOINT names a closed local port (the
connection is refused at once) and HF_HOME an empty cache in tmp_path."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kuda_cli import requires
from kuda_cli.compose import compose
from kuda_cli.errors import ConfigError
from kuda_cli.planning import plan

CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens there
# Not a benchmark: the bound only tells a refusal made before any work (about 5 s on a loaded
# 2-core machine, mostly the interpreter starting) from the libraries' retry loop it replaces
# (huggingface_hub backs off 1+2+4+8+8 s per file: 23 s at least; 34-53 s measured).
NO_RETRY_LOOP_S = 20.0
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CACHED = ["model=hub", "model.id=kuda-test/cached"]  # a hub model cache_model puts in the cache


@pytest.fixture(autouse=True)
def without_hub(tmp_path, monkeypatch):
    """This process: the hub at a closed port, an empty cache, offline mode unset."""
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    requires.hub_unreachable.cache_clear()
    yield
    requires.hub_unreachable.cache_clear()


def kuda_offline(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`kuda ARGS` in a fresh process with this process's environment (the fixture's hub and
    cache, not conftest's HF_HUB_OFFLINE); also how long it took."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kuda_cli.cli", *args],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, time.monotonic() - start


def cache_model(tmp_path: Path, hub_id: str, tiny=None) -> None:
    """A hub cache entry for `hub_id` at `main`, as huggingface_hub lays it out: the tiny model's
    files when given, else a bare config.json."""
    repo = tmp_path / "hf" / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    if tiny is None:
        (snapshot / "config.json").write_text("{}")
    else:
        for part in tiny:
            part.save_pretrained(snapshot)


def cache_dataset(tmp_path: Path, prepared: str) -> None:
    """A prepared dataset in the datasets cache: <namespace>___<name>/<config>/<version>/<hash>."""
    (tmp_path / "hf" / "datasets" / prepared / "default" / "0.0.0" / "abc").mkdir(parents=True)


@pytest.mark.parametrize(
    ("args", "local"),
    [
        (["eval", "model=SomeOrg/some-model"], "pass a local copy: model.path=DIR"),
        (["eval", "eval=wmdp", "model=tiny-random"], "eval.wmdp.bio_path=FILE"),
    ],
)
def test_an_uncached_hub_item_is_refused_in_one_line_before_any_retry(tmp_path, args, local):
    done, elapsed = kuda_offline(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "not in the local Hugging Face cache" in lines[0] and local in lines[0]
    assert f"{CLOSED_PORT} is unreachable" in lines[0]
    assert not (tmp_path / "outputs").exists()
    assert elapsed < NO_RETRY_LOOP_S, f"{elapsed:.1f} s: the libraries' retries ran"


def test_a_cached_hub_model_loads_offline_while_the_hub_is_unreachable(tmp_path, tiny):
    cache_model(tmp_path, "kuda-test/cached-tiny", tiny)
    args = ["model=kuda-test/cached-tiny", "eval.metrics=[perplexity]"]
    done, _ = kuda_offline(tmp_path, "eval", *args, "eval.perplexity.max_texts=2")
    assert done.returncode == 0, done.stderr
    hub_lines = [line for line in done.stderr.splitlines() if CLOSED_PORT in line]
    assert len(hub_lines) == 1, hub_lines  # the probe's note: no library asked the hub again
    assert "load from the local Hugging Face cache (HF_HUB_OFFLINE=1)" in hub_lines[0]


def test_only_what_the_cache_lacks_is_refused(tmp_path):
    cfg = compose(["stage=eval", "eval=wmdp", "model=tiny-random"])
    cache_dataset(tmp_path, "cais___wmdp")  # both WMDP sets: one hub dataset
    with pytest.raises(ConfigError) as refused:
        requires.check(cfg)
    assert str(refused.value).startswith("eval.wmdp.mmlu_path (cais/mmlu) is not in the local")
    assert str(refused.value).endswith("pass a local copy: eval.wmdp.mmlu_path=FILE")
    cache_dataset(tmp_path, "cais___mmlu")
    requires.check(cfg)  # everything cached: the run goes on, offline
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_requires_hub_refuses_even_what_the_cache_holds(tmp_path):
    cache_model(tmp_path, "kuda-test/cached")
    cfg = compose(["stage=eval", *CACHED, "eval=none", "requires=[hub]"])
    with pytest.raises(ConfigError, match=r"needs the Hugging Face hub for model \(kuda-test"):
        requires.check(cfg)


class Hub(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request (HEAD /: the probe)."""

    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_sweep_probes_the_hub_once(monkeypatch):
    asked = []
    real = requires._ask_hub
    monkeypatch.setattr(requires, "_ask_hub", lambda timeout: asked.append(1) or real(timeout))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_address[1]}")
        uncached = ["model=hub", "model.id=SomeOrg/some-model"]
        plan("eval", [*uncached, "eval=none", "seed=1,2,3"], multirun=True)
        hub.shutdown()
    assert len(asked) == 1


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-random"])
def test_a_run_needing_nothing_from_the_hub_never_probes_it(model, monkeypatch):
    asked = []
    monkeypatch.setattr(requires, "_ask_hub", lambda timeout: asked.append(timeout))
    requires.check(compose(["stage=unlearn", f"model={model}"]), gpu=False)
    assert asked == []


def test_a_hub_that_accepts_but_never_answers_counts_as_unreachable_within_the_timeout(
    monkeypatch,
):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never replies
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        why = requires.hub_unreachable(timeout=0.5)
    assert why is not None and time.monotonic() - start < 2.0
