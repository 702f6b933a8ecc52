"""Every run leaves a complete directory: resolved config, meta with provenance and status,
metrics written atomically, the log; multirun jobs get one directory each."""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from kuda_cli.cache import write_json_atomic
from kuda_cli.run import Run, config_hash, set_seed

from conftest import FAST_EVAL, read_json


def test_eval_run_directory_is_complete(kuda, tmp_path):
    run_dir = tmp_path / "run"
    done = kuda("eval", *FAST_EVAL, "seed=7", f"hydra.run.dir={run_dir}", check=True)
    assert {"config.yaml", "meta.json", "metrics.json", "kuda.log"} <= {
        p.name for p in run_dir.iterdir()
    }
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["stage"] == "eval" and config["seed"] == 7
    assert config["model"]["name"] == "tiny-random"
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved
    meta = read_json(run_dir / "meta.json")
    assert meta["status"] == "completed"
    assert meta["seed"] == 7 and meta["stage"] == "eval"
    assert meta["start_time"] <= meta["end_time"]
    assert meta["versions"]["torch"] == torch.__version__
    for package in ("python", "transformers", "lm_eval"):
        assert meta["versions"][package]
    assert len(meta["config_hash"]) == 64
    assert meta["device"]["type"] in ("cpu", "cuda")
    assert meta["model"]["num_layers"] == 4
    assert "commit" in meta["git"]
    ppl = read_json(run_dir / "metrics.json")["perplexity"]
    assert ppl["texts"] == 4 and ppl["tokens"] > 0
    assert math.isclose(ppl["perplexity"], math.exp(ppl["nll"]))
    assert "completed" in (run_dir / "kuda.log").read_text()
    assert "perplexity" in done.stderr  # the progress bar


def test_named_run_lands_in_timestamped_directory_with_the_name(kuda, tmp_path):
    kuda("eval", *FAST_EVAL, "name=probe", check=True)
    (run_dir,) = (tmp_path / "outputs" / "eval").iterdir()
    assert run_dir.name.endswith("_probe")
    assert read_json(run_dir / "meta.json")["name"] == "probe"


def test_multirun_makes_one_complete_directory_per_job(kuda, tmp_path):
    sweep = tmp_path / "sweep"
    kuda("eval", "-m", "seed=1,2", *FAST_EVAL, f"hydra.sweep.dir={sweep}", check=True)
    seeds = set()
    for job in ("0", "1"):
        meta = read_json(sweep / job / "meta.json")
        assert meta["status"] == "completed"
        assert (sweep / job / "metrics.json").is_file() and (sweep / job / "config.yaml").is_file()
        seeds.add(meta["seed"])
    assert seeds == {1, 2}
    # the same model on the same texts: the seed must not change the metric
    ppl = [read_json(sweep / j / "metrics.json")["perplexity"]["perplexity"] for j in "01"]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


def test_cfg_job_prints_the_composed_config_and_writes_nothing(kuda, tmp_path):
    done = kuda("unlearn", "--cfg", "job", "unlearn=rmu_zephyr", check=True)
    printed = yaml.safe_load(done.stdout)
    assert printed["stage"] == "unlearn" and printed["unlearn"]["method"] == "rmu"
    assert printed["unlearn"]["c"] == 6.5
    assert not (tmp_path / "outputs").exists()


def test_stage_help_shows_groups(kuda):
    done = kuda("eval", "--help", check=True)
    assert "kuda eval" in done.stdout and "unlearn: " in done.stdout


def test_user_error_during_the_run_exits_2_and_leaves_nothing(kuda, tmp_path):
    """Bad input found only while running (a file without the text field) is reported in one
    line, exit 2, and the run directory, holding nothing of the run's own, is removed."""
    (tmp_path / "texts.jsonl").write_text('{"body": "no text field here"}\n')
    done = kuda(
        "eval", *FAST_EVAL, "eval.perplexity.source=path", "eval.perplexity.path=texts.jsonl"
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("kuda: ")
    assert "no field 'text'" in done.stderr.strip().splitlines()[-1]
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]


def test_a_failing_job_of_a_sweep_is_kept_as_failed_and_the_others_run(kuda, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field here"}\n')
    (tmp_path / "good.jsonl").write_text('{"text": "Bees make honey."}\n')
    sweep = tmp_path / "sweep"
    done = kuda(
        "eval",
        "-m",
        *FAST_EVAL,
        "eval.perplexity.source=path",
        "eval.perplexity.path=bad.jsonl,good.jsonl",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 1  # the sweep ran to its end, then reports the failed job
    assert "2 jobs, 1 completed, 1 not completed (job 0 failed" in done.stderr.splitlines()[-1]
    assert read_json(sweep / "0" / "meta.json")["status"] == "failed"
    assert "no field 'text'" in read_json(sweep / "0" / "meta.json")["error"]
    assert read_json(sweep / "1" / "meta.json")["status"] == "completed"


def test_a_crashing_stage_marks_the_run_failed(tmp_path):
    """A bug (not bad input) keeps the directory, with status failed and the error recorded."""
    import subprocess

    code = (
        "import sys; from kuda_cli import cli, stages\n"
        "def boom(cfg, run): raise RuntimeError('boom')\n"
        "stages.STAGE_FUNCTIONS['eval'] = boom\n"
        "sys.exit(cli.main(['eval', 'model=tiny-random', 'hydra.run.dir=run']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode != 0
    meta = read_json(tmp_path / "run" / "meta.json")
    assert meta["status"] == "failed" and "boom" in meta["error"] and meta["end_time"]


def _fail_writes_midway(monkeypatch, directory, budget):
    """Every file opened for writing under `directory` takes `budget` characters, then the
    disk is full: the write stops partway, as a kill or ENOSPC would leave it."""
    real_open = io.open

    def open_failing(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        opened_elsewhere = not isinstance(file, int) and Path(file).parent != directory
        if "w" not in mode or opened_elsewhere:  # an int is os.fdopen's descriptor
            return handle
        real_write, left = handle.write, [budget]

        def write(text):
            real_write(text[: left[0]])
            handle.flush()
            if len(text) > left[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            left[0] -= len(text)
            return len(text)

        handle.write = write
        return handle

    monkeypatch.setattr(io, "open", open_failing)
    monkeypatch.setattr(builtins, "open", open_failing)


def test_metrics_write_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})
    _fail_writes_midway(monkeypatch, tmp_path, budget=20)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"a": 2, "b": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left
    with pytest.raises(TypeError):  # a value JSON cannot hold fails before anything is written
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_run_merges_nested_metrics(tmp_path):
    cfg = OmegaConf.create({"stage": "eval", "seed": 3, "name": None})
    run = Run.start(tmp_path / "r", cfg)
    run.log_metrics({"facts": {"forget": {"mc_acc": 0.5}}})
    run.log_metrics({"facts": {"retain": {"mc_acc": 0.9}}})
    assert read_json(tmp_path / "r" / "metrics.json") == {
        "facts": {"forget": {"mc_acc": 0.5}, "retain": {"mc_acc": 0.9}}
    }
    run.finish("completed")
    assert read_json(tmp_path / "r" / "meta.json")["status"] == "completed"


def test_seed_fixes_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    set_seed(5)
    first = draw()
    set_seed(5)
    assert draw() == first
    set_seed(6)
    assert draw() != first


def test_config_hash_depends_on_values_only():
    a = OmegaConf.create({"x": 1, "y": {"z": 2}})
    b = OmegaConf.create({"y": {"z": 2}, "x": 1})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(OmegaConf.create({"x": 2, "y": {"z": 2}}))


def test_user_error_after_results_were_written_keeps_the_run_as_failed(kuda, tmp_path):
    """Nothing is lost: once a metric has written its files, a later bad input marks the run
    failed instead of deleting it."""
    (tmp_path / "texts.jsonl").write_text('{"body": "no text field here"}\n')
    run = tmp_path / "run"
    done = kuda(
        "eval",
        "model=tiny-random",
        "eval.metrics=[facts,perplexity]",
        "eval.facts.all_prompts=false",
        "eval.perplexity.source=path",
        "eval.perplexity.path=texts.jsonl",
        f"hydra.run.dir={run}",
    )
    assert done.returncode == 2
    meta = read_json(run / "meta.json")
    assert meta["status"] == "failed" and "no field 'text'" in meta["error"]
    assert (run / "facts_answers.jsonl").is_file()


def test_a_trace_sweep_is_reused_whatever_the_unlearning_settings(tmp_path):
    """`make table-facts` and `make ablation-kuda` share one trace sweep and pass their ARGS to
    it too: a change of unlearning or evaluation settings must not make the completed trace "a
    run of another config"; a change of what tracing uses must. Runs written before the
    stage-aware hash (whole-config hash in meta.json) still match their own config."""
    from kuda_cli.compose import compose
    from kuda_cli.errors import ConfigError
    from kuda_cli.planning import plan
    from kuda_cli.run import config_hash, config_hashes

    sweep = tmp_path / "trace"

    def write_job(cfg, whole=False):
        (sweep / "0").mkdir(parents=True, exist_ok=True)
        meta = {
            "stage": "trace",
            "status": "completed",
            "config_hash": config_hash(cfg, whole=whole),
        }
        (sweep / "0" / "meta.json").write_text(json.dumps(meta))

    base = ["model=tiny-random", "data=facts", "locate.max_probes=2"]
    traced = compose([*base, "stage=trace"])
    write_job(traced)
    pinned = [*base, f"hydra.sweep.dir={sweep}"]
    for changed in (["unlearn.lr=0.5"], ["unlearn=rmu", "eval.before=false"]):
        assert plan("trace", [*pinned, *changed], True).sweep.done_before == [0]
    with pytest.raises(ConfigError, match="holds a run of another config"):
        plan("trace", [*pinned, "locate.samples=3"], True)
    # the unlearn stage still hashes its unlearning settings
    unlearn = compose([*base, "stage=unlearn"])
    assert config_hash(unlearn) != config_hash(compose([*base, "stage=unlearn", "unlearn.lr=0.5"]))
    # an older trace run, hashed whole, matches its own config only
    write_job(traced, whole=True)
    assert config_hash(traced, whole=True) in config_hashes(traced)
    assert plan("trace", pinned, True).sweep.done_before == [0]
    with pytest.raises(ConfigError, match="holds a run of another config"):
        plan("trace", [*pinned, "unlearn.lr=0.5"], True)
