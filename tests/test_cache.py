"""Every cache checks what it reads: the key of caches computed from weights changes when the
weights change, a damaged entry of the starting model's evaluation is redone (never read), and
processes filling one entry at once build it once and never read a half-written one."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from kuda_cli.cache import (
    MANIFEST,
    entry_lock,
    model_fingerprint,
    publish,
    staging_dir,
    verify_manifest,
)

from conftest import FAST_EVAL, read_json


def test_the_model_fingerprint_changes_with_any_weight_and_only_with_the_weights(tiny):
    model, _ = tiny
    key = model_fingerprint(model)
    assert model_fingerprint(model) == key
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight[3, 5] += 1e-4
        assert model_fingerprint(model) != key
        weight[3, 5] -= 1e-4
        assert model_fingerprint(model) == key
        a, b = weight[0, 0].item(), weight[7, 9].item()  # a swap keeps the sums
        weight[0, 0], weight[7, 9] = b, a
        assert model_fingerprint(model) != key


def _build(dest: str, builds: str, reads: str) -> None:
    """What evaluate_starting does: under the entry's lock, read a verified entry or build it
    (slowly, a file at a time) and publish it."""
    dest = Path(dest)
    with entry_lock(dest):
        if dest.exists() and verify_manifest(dest) is None:
            content = (dest / "b.txt").read_text() + (dest / "sub" / "a.txt").read_text()
        else:
            tmp = staging_dir(dest)
            (tmp / "sub").mkdir()
            (tmp / "b.txt").write_text("b" * 1000)
            time.sleep(0.2)
            (tmp / "sub" / "a.txt").write_text("a" * 1000)
            with open(builds, "a") as f:
                f.write("built\n")
            publish(tmp, dest, {"test": True})
            content = "b" * 1000 + "a" * 1000
    with open(reads, "a") as f:
        f.write(f"{len(content)}\n")


def test_processes_filling_one_entry_at_once_build_it_once_and_read_it_whole(tmp_path):
    dest, builds, reads = tmp_path / "evals" / "key", tmp_path / "builds", tmp_path / "reads"
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_build, args=(str(dest), str(builds), str(reads))) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)  # spawned interpreters import torch: slow on a loaded machine
        assert p.exitcode == 0
    assert builds.read_text().splitlines() == ["built"]
    assert reads.read_text().split() == ["2000"] * 4
    assert verify_manifest(dest) is None
    assert not [p for p in dest.parent.iterdir() if ".partial-" in p.name]


def test_a_damaged_file_in_a_checked_entry_is_found(tmp_path):
    tmp = staging_dir(tmp_path / "entry")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x.jsonl").write_text('{"a": 1}\n')
    publish(tmp, tmp_path / "entry", {"test": True})
    entry = tmp_path / "entry"
    assert verify_manifest(entry) is None
    assert "sub/x.jsonl" in json.loads((entry / MANIFEST).read_text())["files"]
    (entry / "sub" / "x.jsonl").write_text('{"a": 2}\n')  # same size, other content
    assert verify_manifest(entry) == "sub/x.jsonl does not match its checksum"


@pytest.mark.parametrize("damage", ["edited", "manifest removed"])
def test_a_damaged_cached_starting_evaluation_is_redone(kuda, tmp_path, monkeypatch, damage):
    """The second run finds the first run's cached evaluation edited (valid JSON, another
    perplexity) or without its manifest (an interrupted write): it evaluates again, and what it
    reports is the model's real figure, not the edited one."""
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    args = ["unlearn", *FAST_EVAL, "locate=fixed", "locate.layers=[1]", "unlearn.steps=1"]
    kuda(*args, "hydra.run.dir=first", check=True)
    (entry,) = [p for p in (tmp_path / "cache" / "evals").iterdir() if p.is_dir()]
    truth = read_json(entry / "metrics.json")["perplexity"]["perplexity"]
    if damage == "edited":
        metrics = read_json(entry / "metrics.json")
        metrics["perplexity"]["perplexity"] = 1.0
        (entry / "metrics.json").write_text(json.dumps(metrics))
    else:
        (entry / MANIFEST).unlink()
    done = kuda(*args, "hydra.run.dir=second", check=True)
    assert "cannot be trusted" in done.stdout + done.stderr
    before = read_json(tmp_path / "second" / "metrics.json")["before"]
    assert before["perplexity"]["perplexity"] == pytest.approx(truth, rel=1e-6)
    assert verify_manifest(entry) is None  # rewritten whole
    third = kuda(*args, "hydra.run.dir=third", check=True)
    assert "from the cache" in third.stdout + third.stderr
