"""Bad input stops the command before any work: one line naming the key and what is allowed,
exit status 2, no run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kuda_cli import cli
from kuda_cli.overrides import fit_eval_to_data, job_override_lists, rewrite_model_shortcut
from kuda_cli.planning import _fresh, preflight


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fail(capsys, *argv: str) -> str:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    return err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["unlearn", "unlearn.lr=-1"], ["unlearn.lr=-1.0", "> 0"]),
        (["unlearn", "model=nope"], ["model=nope", "smollm2-135m", "tiny-random"]),
        (["eval", "unlearn.foo=1"], ["unknown key unlearn.foo", "lr"]),
        (["eval", "+unlearn.foo=1"], ["unknown key unlearn.foo"]),
        (["eval", "foo=1"], ["unknown key foo", "seed"]),
        (["eval", "unlearn.lr=abc"], ["unlearn.lr", "'abc'", "Float"]),
        (["eval", "seed=x"], ["seed", "Integer"]),
        (["unlearn", "seed=-5"], ["seed=-5", ">= 0"]),
        (["unlearn", "seed=4294967296"], ["seed=4294967296", "<= 4294967295"]),
        (["eval", "model=tiny-random", "model.tiny.init_seed=-1"], ["model.tiny.init_seed=-1"]),
        (
            ["unlearn", "data.retain_domains=[chemistry,capitals]"],
            ["chemistry are both forgotten and retained", "data.retain_domains"],
        ),
        (["eval", "model.dtype=int8"], ["model.dtype='int8'", "bfloat16"]),
        (["eval", "unlearn.nullspace.form=soft"], ["unlearn.nullspace.form", "relaxed", "hard"]),
        (["eval", "data=nope"], ["data=nope", "wmdp_bio", "facts"]),
        (["eval", "unlearn=nope"], ["unlearn=nope", "kuda", "rmu"]),
        (
            ["eval", "model=tiny-random", "locate=fixed", "locate.layers=[4]"],
            ["locate.layers", "layer 4", "0..3"],
        ),
        (["eval", "model=tiny-random", "locate=fixed", "locate.layers=[-1]"], ["layer -1"]),
        (["eval", "unlearn.layers=[30]"], ["unlearn.layers", "0..29"]),
        (["eval", "locate=fixed"], ["locate.layers"]),
        (["eval", "model=tiny-random", "locate.select_window=9"], ["locate.select_window=9"]),
        (["eval", "eval=muse"], ["eval=muse", "data=facts", "pass eval=facts"]),
        (["eval", "data=muse_news", "eval=facts"], ["data=muse_news", "pass eval=muse"]),
        (["eval", "model=tiny-random", "model.tiny.hidden_size=30"], ["model.tiny.hidden_size"]),
        (["eval", "stage=trace"], ["stage is set by the command"]),
        (["eval", "name=a/b"], ["name='a/b'", "one word"]),
        (["eval", "locate.layers=[a]"], ["locate.layers[0]", "Integer"]),
        (["eval", "model.path=/nonexistent/dir"], ["model.path=/nonexistent/dir", "not a dir"]),
        (
            ["eval", "eval.perplexity.source=path", "eval.perplexity.path=nope.jsonl"],
            ["eval.perplexity.path=nope.jsonl", "does not exist"],
        ),
        (["eval", "eval.perplexity.source=path"], ["needs eval.perplexity.path"]),
        (["eval", "eval.facts.reference=no/such/run"], ["eval.facts.reference=no/such/run"]),
        (["eval", "eval.facts.reference=."], ["eval.facts.reference=.", "facts_answers.jsonl"]),
        (["eval", "eval=wmdp", "eval.wmdp.bio_path=nope.jsonl"], ["eval.wmdp.bio_path=nope"]),
        (
            ["eval", "data=muse_news", "eval=muse", "data.verbmem.path=x.jsonl"],
            ["data.verbmem.path=x.jsonl", "does not exist"],
        ),
        (["eval", "-m", "seed=1,x"], ["seed", "Integer"]),
        (["eval", "-m", "seed=interval(0,1)"], ["seed=interval(0,1)", "not interval()"]),
        (["eval", "-m", "unlearn=glob(zzz*)"], ["unlearn=glob(zzz*) sweeps over no value"]),
        (["eval", "-m", "seed=range(3,1)"], ["seed=range(3,1) sweeps over no value"]),
        (["eval", "-m", "seed=choice(1"], ["cannot parse override", "choice(1"]),
        (["eval", "-m", "seed=range(0,0)"], ["seed=range(0,0) sweeps over no value", "(0,3)"]),
        (["eval", "-m", "seed=choice()"], ["seed=choice() sweeps over no value", "choice(0,1)"]),
        (["eval", "-m", "seed=range(0,0),1"], ["cannot list another sweep", "seed=0,1,5"]),
        (
            ["unlearn", "model=tiny-random", "locate=fixed", "locate.layers=[2,2]"],
            ["locate.layers has 2 more than once", "pass locate.layers=[2]"],
        ),
        (
            ["unlearn", "model=tiny-random", "locate.layers=[2,2]", "unlearn=ga"],
            ["locate.layers has 2 more than once"],
        ),
        (
            ["unlearn", "model=tiny-random", "unlearn.lr=inf"],
            ["unlearn.lr=inf is not a finite number", "> 0"],
        ),
        (
            ["unlearn", "model=tiny-random", "unlearn.lr=-inf"],
            ["unlearn.lr=-inf is not a finite number"],
        ),
        (
            ["unlearn", "model=tiny-random", "tune.baseline=nan"],
            ["tune.baseline=nan is not a finite number"],
        ),
        (
            ["unlearn", "model=tiny-random", "unlearn.auto_tune.factors=[1,inf]"],
            ["auto_tune.factors has inf"],
        ),
        (
            ["unlearn", "model=tiny-random", "data.forget_domains=[]"],
            ["data.forget_domains=[] must name at least one item", "=[chemistry]"],
        ),
        (
            ["unlearn", "model=tiny-random", "unlearn.steps=10000000000000"],
            ["unlearn.steps=10000000000000", "<= 10000000", "12 days"],
        ),
        (["bogus"], ["unknown stage 'bogus'", "unlearn"]),
        (["eval", "--frobnicate"], ["--frobnicate"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_directory(capsys, in_tmp, argv, expected):
    err = fail(capsys, *argv)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kuda: ")
    for fragment in expected:
        assert fragment in err
    assert not (in_tmp / "outputs").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["unlearn", "data.path=FILE"],
        ["unlearn", "data.path=FILE", "eval=none"],
        ["unlearn", "data.floor_path=FILE"],
        ["eval", "eval.perplexity.source=path", "eval.perplexity.path=FILE"],
        ["unlearn", "data=wmdp_bio", "data.forget.path=FILE"],
        ["eval", "data=wmdp_bio", "eval.wmdp.bio_path=FILE"],
    ],
)
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_local_file_is_refused_naming_its_key(capsys, in_tmp, argv, content):
    (in_tmp / "empty.jsonl").write_text(content)
    key = next(a for a in argv if a.endswith("=FILE")).partition("=")[0]
    argv = [a.replace("FILE", "empty.jsonl") for a in argv]
    err = fail(capsys, *argv, "model=tiny-random")
    assert (
        err == f"kuda: {key}=empty.jsonl is empty; pass a file that holds at least one record "
        "(JSONL, JSON, parquet or txt)"
    ), err
    assert not (in_tmp / "outputs").exists()


def test_no_stage_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "missing STAGE" in capsys.readouterr().err


def test_help_lists_stages_groups_and_options(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in (
        "trace",
        "unlearn",
        "eval",
        "report",
        "model",
        "data",
        "locate",
        "experiment",
        "smollm2-135m*",
        "tiny-random",
        "zephyr-7b",
        "wmdp_bio",
        "causal_tracing*",
        "kuda*",
        "rmu",
        "simnpo",
        "facts*",
        "muse",
        "--cfg",
        "-m",
    ):
        assert word in out
    assert "_schema" not in out


def test_model_shortcuts_rewrite_hub_ids_and_directories(tmp_path):
    assert rewrite_model_shortcut(["model=org/name"]) == ["model=hub", "model.id=org/name"]
    assert rewrite_model_shortcut([f"model={tmp_path}"]) == [
        "model=local",
        f"model.path={tmp_path.resolve()}",
    ]
    assert rewrite_model_shortcut(["model=tiny-random", "seed=1"]) == [
        "model=tiny-random",
        "seed=1",
    ]


def test_multirun_expands_every_job():
    jobs = job_override_lists(["seed=1,2", "model=tiny-random,smollm2-135m"], multirun=True)
    assert len(jobs) == 4
    assert ["seed=1", "model=smollm2-135m"] in jobs


def test_flags_may_come_between_overrides(capsys):
    argv = ["eval", "model=tiny-random", "-m", "seed=1,2", "eval=none", "--cfg", "job"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "the config of job 0 of 2" in captured.err and "seed: 1" in captured.out
    assert cli.main(["eval", "model=tiny-random", "--bogus"]) == 2
    assert "unknown flag --bogus" in capsys.readouterr().err


def test_explicit_run_dir_holding_a_completed_run_is_refused(capsys, in_tmp):
    run_dir = in_tmp / "done"
    run_dir.mkdir()
    (run_dir / "meta.json").write_text('{"status": "completed"}')
    (run_dir / "metrics.json").write_text('{"keep": 1}')
    err = fail(capsys, "eval", "model=tiny-random", f"hydra.run.dir={run_dir}")
    assert "already holds a completed run" in err
    assert (run_dir / "metrics.json").read_text() == '{"keep": 1}'


def test_default_run_dir_never_reuses_an_existing_directory(in_tmp):
    overrides = preflight("eval", ["model=tiny-random"], multirun=False)
    pinned = in_tmp / next(o for o in overrides if o.startswith("hydra.run.dir=")).split("=", 1)[1]
    assert pinned.parent == in_tmp / "outputs" / "eval" and not pinned.exists()
    pinned.mkdir(parents=True)
    assert _fresh(pinned) == pinned.with_name(pinned.name + "-2")
    pinned.with_name(pinned.name + "-2").mkdir()
    assert _fresh(pinned) == pinned.with_name(pinned.name + "-3")


def test_tab_completion_completes_stages_then_group_options(capsys, monkeypatch):
    monkeypatch.setenv("COMP_LINE", "kuda un")
    assert cli.main(["-sc", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == ["unlearn"]
    import os

    done = subprocess.run(
        [sys.executable, "-m", "kuda_cli.cli", "-sc", "query=bash"],
        env={**os.environ, "COMP_LINE": "kuda eval seed=1 unlearn="},
        capture_output=True,
        text=True,
    )
    assert "unlearn=rmu" in done.stdout.split() and "unlearn=kuda" in done.stdout.split()


def test_eval_follows_the_data_unless_given():
    assert fit_eval_to_data(["data=wmdp_bio"]) == ["data=wmdp_bio", "eval=wmdp"]
    assert fit_eval_to_data(["data=muse_books", "seed=1"])[-1] == "eval=muse"
    assert fit_eval_to_data(["data=facts"])[-1] == "eval=facts"
    assert fit_eval_to_data(["data=wmdp_bio", "eval=none"]) == ["data=wmdp_bio", "eval=none"]
    assert fit_eval_to_data(["data=wmdp_bio,muse_news"]) == ["data=wmdp_bio,muse_news"]
    assert fit_eval_to_data(["seed=1"]) == ["seed=1"]


def test_a_user_error_is_printed_once_by_the_real_command(tmp_path):
    """An error found once the stage runs (texts without the text field), through the real
    command with Hydra's logging (its console handler writes to stdout): the message once on
    the terminal, as one stderr line; exit 2, no traceback; the run directory, which holds the
    work done before the error, is kept and marked failed with the message."""
    (tmp_path / "notext.jsonl").write_text('{"body": "a text under another field"}\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kuda_cli.cli",
            "eval",
            "model=tiny-random",
            "eval.perplexity.source=path",
            "eval.perplexity.path=notext.jsonl",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    shown = done.stdout + done.stderr
    assert done.returncode == 2, shown
    # stderr also carries the progress bars of the work done before the error
    lines = [line for line in done.stderr.splitlines() if "notext.jsonl" in line]
    assert len(lines) == 1 and lines[0].startswith("kuda: "), shown
    assert shown.count(lines[0].removeprefix("kuda: ")) == 1, shown
    assert "Traceback" not in shown
    (meta,) = (tmp_path / "outputs").glob("eval/*/meta.json")
    recorded = json.loads(meta.read_text())
    assert recorded["status"] == "failed" and "notext.jsonl" in recorded["error"]
