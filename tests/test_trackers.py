"""logger=tensorboard|csv|wandb|mlflow: each tracker, read back with its own tools after a
two-step `kuda unlearn` on the tiny model, holds the training log's figures at their steps, the
evaluation's metrics and the resolved config; a missing package stops the command before any
work; a tracker that fails mid-run costs the run nothing."""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kuda_cli import cli
from kuda_cli.compose import compose
from kuda_cli.run import Run, config_hash

from conftest import FAST_EVAL, read_json

TINY_RUN = [*FAST_EVAL, "locate=fixed", "locate.layers=[1]", "unlearn.steps=2"]


def unlearned(kuda, tmp_path: Path, *logger: str) -> Path:
    """A finished two-step run mirrored to the tracker of `logger` (overrides): its directory."""
    kuda("unlearn", *TINY_RUN, *logger, "hydra.run.dir=run", check=True)
    return tmp_path / "run"


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    return [(row["step"], row["loss"]) for row in rows]


def after_perplexity(run_dir: Path) -> float:
    return read_json(run_dir / "metrics.json")["perplexity"]["perplexity"]


def test_tensorboard_events_hold_each_steps_loss_the_metrics_and_the_config(kuda, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run_dir = unlearned(kuda, tmp_path, "logger=tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(s, pytest.approx(v, rel=1e-6)) for s, v in train_losses(run_dir)]
    [after] = [(e.step, e.value) for e in events.Scalars("perplexity.perplexity")]
    assert after == (2, pytest.approx(after_perplexity(run_dir), rel=1e-6))
    assert [e.step for e in events.Scalars("before.perplexity.perplexity")] == [0]
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["unlearn.steps"].number_value == 2
    assert hparams["model.name"].string_value == "tiny-random"


def csv_figures(run_dir: Path) -> list[tuple[int, str, float]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["key"], float(r["value"])) for r in csv.DictReader(f)]


def test_csv_rows_hold_each_steps_loss_the_metrics_and_the_config(kuda, tmp_path):
    run_dir = unlearned(kuda, tmp_path, "logger=csv")
    rows = csv_figures(run_dir)
    losses = [(step, value) for step, key, value in rows if key == "train/loss"]
    assert losses == train_losses(run_dir)
    assert (2, "perplexity.perplexity", pytest.approx(after_perplexity(run_dir))) in rows
    with open(run_dir / "csv" / "params.csv", newline="") as f:
        params = {r["key"]: r["value"] for r in csv.DictReader(f)}
    assert params["unlearn.steps"] == "2" and params["locate.layers"] == "[1]"


def test_eval_stage_metrics_reach_the_tracker_at_step_0(kuda, tmp_path):
    kuda("eval", *FAST_EVAL, "logger=csv", "hydra.run.dir=run", check=True)
    metrics = read_json(tmp_path / "run" / "metrics.json")
    wanted = (0, "perplexity.perplexity", pytest.approx(metrics["perplexity"]["perplexity"]))
    assert wanted in csv_figures(tmp_path / "run")


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header, then LevelDB-log chunks (crc32, length,
    type: 1 whole, 2 first, 3 middle, 4 last) in 32 KiB blocks, each record a protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    raw, block, pos, records, chunk = path.read_bytes(), 32768, 7, [], b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if left < 7 or (length, kind) == (0, 0):  # a block's padding
            pos += left
            continue
        chunk += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def wandb_key(item) -> str:
    """A history or config item's key (wandb splits a key holding "/" into `nested_key`)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_each_steps_loss_the_metrics_and_the_config(
    kuda, tmp_path, monkeypatch
):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)  # offline by the config alone
    run_dir = unlearned(kuda, tmp_path, "logger=wandb", "logger.mode=offline")
    [offline] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(offline)
    history = [
        {wandb_key(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    losses = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert losses == train_losses(run_dir)
    after = [
        (h["_step"], h["perplexity.perplexity"]) for h in history if "perplexity.perplexity" in h
    ]
    assert after == [(2, pytest.approx(after_perplexity(run_dir)))]  # at the last step
    config = {
        wandb_key(item): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["unlearn.steps"] == 2 and config["model.name"] == "tiny-random"


def test_mlflow_store_holds_the_config_each_steps_loss_and_the_metrics(kuda, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = unlearned(kuda, tmp_path, "logger=mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("kuda").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["unlearn.steps"] == "2"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == train_losses(run_dir)
    assert found.data.metrics["perplexity.perplexity"] == pytest.approx(after_perplexity(run_dir))


def test_a_missing_tracker_package_is_one_line_with_the_fix_exit_2_no_run_directory(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what import finds when not installed
    monkeypatch.chdir(tmp_path)
    # what would run without the check is short (a bug costs seconds, not a failed suite)
    code = cli.main(["unlearn", *TINY_RUN, "eval=none", "logger=tensorboard"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and "logger=tensorboard" in lines[0], lines
    assert "pip install 'kuda-cli[trackers]'" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_a_tracker_failing_mid_run_is_a_warning_and_the_metrics_are_kept(
    tmp_path, monkeypatch, caplog
):
    from kuda_cli.trackers.csv import CsvTracker

    def broken(self, figures, step):
        raise OSError("disk gone")

    monkeypatch.setattr(CsvTracker, "log_figures", broken)
    cfg = compose(["stage=eval", "logger=csv"])
    run = Run.start(tmp_path / "r", OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    run.log_metrics({"a": {"b": 1.0}})
    run.log_metrics({"c": 2.0})
    run.finish("completed")
    assert read_json(tmp_path / "r" / "metrics.json") == {"a": {"b": 1.0}, "c": 2.0}
    warned = [r for r in caplog.records if "logger=csv failed" in r.getMessage()]
    assert len(warned) == 1 and "disk gone" in warned[0].getMessage()
    assert read_json(tmp_path / "r" / "meta.json")["status"] == "completed"


def test_the_tracker_is_not_part_of_the_config_hash():
    """A sweep re-run with a tracker skips the jobs it completed without one."""
    plain = compose(["stage=unlearn", "model=tiny-random"])
    tracked = compose(["stage=unlearn", "model=tiny-random", "logger=wandb", "logger.tags=[a]"])
    assert config_hash(plain) == config_hash(tracked)
    assert config_hash(plain, whole=True) == config_hash(tracked, whole=True)
