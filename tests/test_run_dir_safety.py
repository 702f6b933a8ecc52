"""A run directory is never someone else's. A pinned `hydra.run.dir` is used only when it is new,
empty, or holds an unfinished kuda run of the same config; a run refused while running removes
only what its command made; a stray launcher variable, a tuning choice that reaches outside the
method's settings, a run directory that cannot be written are refused before any work; SIGTERM
leaves a run marked failed with its end time; the run's JSON files are as readable as its
config.yaml."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch

from kuda_cli import cli
from kuda_cli.cache import write_json_atomic

from conftest import FAST_EVAL, kuda_killed, read_json

TINY_UNLEARN = [
    "unlearn",
    "model=tiny-random",
    "locate=fixed",
    "locate.layers=[1,2]",
    "eval=none",
    "unlearn.steps=2",
    "unlearn.batch_size=2",
]


def snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory`, by relative path, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def refused(capsys, *argv: str) -> str:
    """Run `kuda ARGV` in-process; assert exit 2 with one line on stderr; return the line."""
    code = cli.main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("kuda: "), lines
    return lines[0]


def another_configs_unfinished_run(directory) -> None:
    """What a killed `kuda unlearn` of another config leaves: meta.json at running, a checkpoint."""
    checkpoint = directory / "checkpoints" / "step-000300"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"A's optimiser")
    (directory / "config.yaml").write_text("unlearn:\n  lr: 0.003\n")
    meta = {
        "stage": "unlearn",
        "status": "running",
        "config_hash": "0" * 64,
        "command": "kuda unlearn unlearn.lr=3e-3",
    }
    (directory / "meta.json").write_text(json.dumps(meta))


def test_a_pinned_directory_holding_another_configs_unfinished_run_is_refused_untouched(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    another_configs_unfinished_run(tmp_path / "a")
    before = snapshot(tmp_path / "a")
    line = refused(capsys, *TINY_UNLEARN, "unlearn.lr=1e-5", f"hydra.run.dir={tmp_path / 'a'}")
    assert "unfinished run of another config" in line
    assert "kuda unlearn unlearn.lr=3e-3" in line  # how to continue it instead
    assert snapshot(tmp_path / "a") == before


@pytest.mark.parametrize("held", [["config.yaml"], ["config.yaml", "notes.txt"]])
def test_a_pinned_directory_holding_user_files_is_refused_and_nothing_is_overwritten(
    tmp_path, monkeypatch, capsys, held
):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "proj"
    mine.mkdir()
    for name in held:
        (mine / name).write_text(f"the user's own {name}\n")
    before = snapshot(mine)
    line = refused(capsys, "eval", *FAST_EVAL, f"hydra.run.dir={mine}")
    assert "holds no kuda run" in line and "config.yaml" in line
    assert snapshot(mine) == before
    assert sorted(p.name for p in mine.iterdir()) == sorted(held)


def test_a_run_refused_while_running_leaves_a_pinned_empty_directory_in_place(kuda, tmp_path):
    """The error is found only while running (a text file without the text field): what the
    command wrote goes, the directory the user made stays."""
    (tmp_path / "texts.jsonl").write_text('{"body": "no text field here"}\n')
    (tmp_path / "mine").mkdir()
    done = kuda(
        "eval",
        *FAST_EVAL,
        "eval.perplexity.source=path",
        "eval.perplexity.path=texts.jsonl",
        "hydra.run.dir=mine",
    )
    assert done.returncode == 2, done.stderr
    assert "no field 'text'" in done.stderr.strip().splitlines()[-1]
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_a_run_refused_while_running_removes_the_pinned_directory_it_made(kuda, tmp_path):
    (tmp_path / "texts.jsonl").write_text('{"body": "no text field here"}\n')
    done = kuda(
        "eval",
        *FAST_EVAL,
        "eval.perplexity.source=path",
        "eval.perplexity.path=texts.jsonl",
        "hydra.run.dir=new",
    )
    assert done.returncode == 2, done.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["a_file", "a_file/sub", "/proc/kuda-cannot-write-here"])
def test_a_run_directory_that_is_a_file_or_cannot_be_written_is_refused(
    tmp_path, monkeypatch, capsys, where
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("the user's file\n")
    line = refused(capsys, "eval", *FAST_EVAL, f"hydra.run.dir={where}")
    assert f"hydra.run.dir={where}" in line
    assert "is a file" in line or "cannot write" in line
    assert (tmp_path / "a_file").read_text() == "the user's file\n"
    assert not (tmp_path / "outputs").exists()


def test_a_sweep_directory_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("the user's file\n")
    line = refused(capsys, "eval", "-m", *FAST_EVAL, "seed=1,2", "hydra.sweep.dir=a_file")
    assert "hydra.sweep.dir=a_file" in line and "is a file" in line


def test_a_sweep_job_directory_holding_user_files_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep" / "1").mkdir(parents=True)
    (tmp_path / "sweep" / "1" / "notes.txt").write_text("mine\n")
    line = refused(capsys, "eval", "-m", *FAST_EVAL, "seed=1,2", "hydra.sweep.dir=sweep")
    assert "job 1" in line and "notes.txt" in line
    assert (tmp_path / "sweep" / "1" / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize(
    ("variables", "named"),
    [({"RANK": "1"}, "RANK=1"), ({"LOCAL_RANK": "3"}, "LOCAL_RANK=3"), ({"WORLD_SIZE": "x"}, "x")],
)
def test_a_stray_launcher_variable_is_refused_before_any_work(
    tmp_path, monkeypatch, capsys, variables, named
):
    """`RANK=1` without WORLD_SIZE made the process a silent non-main rank: exit 0, no files."""
    monkeypatch.chdir(tmp_path)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    assert named in refused(capsys, "eval", *FAST_EVAL)
    assert not (tmp_path / "outputs").exists()


def test_a_tuning_choice_cannot_set_keys_outside_the_methods_settings(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    choice = tmp_path / "choice.yaml"
    choice.write_text("overrides:\n  unlearn.lr: 0.001\n  model.trust_remote_code: true\n")
    line = refused(capsys, *TINY_UNLEARN, f"tune.choice={choice}")
    assert "model.trust_remote_code" in line
    line = refused(capsys, "pick", "tune.runs=[x]", "tune.carry=[model.trust_remote_code]")
    assert "tune.carry lists model.trust_remote_code" in line


def test_sigterm_marks_the_run_failed_with_its_end_time_and_reason(tmp_path):
    args = [*TINY_UNLEARN, "unlearn.steps=40", "hydra.run.dir=run"]
    code = kuda_killed(args, tmp_path, "run/train_log.jsonl", 2, sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, (tmp_path / "killed.stderr").read_text()
    meta = read_json(tmp_path / "run" / "meta.json")
    assert meta["status"] == "failed" and meta["end_time"] and meta["duration_s"] > 0
    assert "SIGTERM" in meta["error"]
    assert "stopped by SIGTERM" in (tmp_path / "killed.stderr").read_text()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_json_files_get_the_permissions_of_a_plain_write(tmp_path, umask):
    """meta.json and metrics.json as readable as config.yaml: a teammate's kuda report on shared
    storage reads them (mkstemp alone makes them 0600)."""
    from safetensors.torch import save_file

    from kuda_cli.unlearn.checkpoint_files import put_in_place
    from kuda_cli.unlearn.nullspace import Spectrum, _save

    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "meta.json", {"status": "running"})
        _save(tmp_path / "spectrum.safetensors", Spectrum(torch.ones(2), torch.eye(2), 3))
        (tmp_path / "checkpoint.tmp").mkdir()
        save_file({"w": torch.ones(2)}, tmp_path / "checkpoint.tmp" / "model.safetensors")
        put_in_place(tmp_path / "checkpoint.tmp", tmp_path / "checkpoint")
        (tmp_path / "config.yaml").write_text("seed: 0\n")
    finally:
        os.umask(previous)
    names = ("meta.json", "spectrum.safetensors", "checkpoint/model.safetensors", "config.yaml")
    for name in names:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_an_eval_runs_files_are_all_as_readable_as_its_config(kuda, tmp_path):
    kuda("eval", *FAST_EVAL, "hydra.run.dir=run", check=True)
    wanted = stat.S_IMODE((tmp_path / "run" / "config.yaml").stat().st_mode)
    for name in ("meta.json", "metrics.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == wanted, name
