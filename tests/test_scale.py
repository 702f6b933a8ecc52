"""Scale: reproduction targets that refuse to start without a GPU or the hub, two-stage tuning's
picker, sweeps that skip completed jobs and survive failing ones, the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kuda_cli import cli, requires
from kuda_cli.compose import compose
from kuda_cli.errors import ConfigError
from kuda_cli.overrides import apply_choice
from kuda_cli.planning import plan

from conftest import kuda_killed, read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    requires.gpu_missing.cache_clear()
    requires.hub_unreachable.cache_clear()
    return tmp_path


# ----------------------------------------------------------------------------- requirements
@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "-m", "experiment=table_wmdp"],
        [
            "unlearn",
            "-m",
            "experiment=table_wmdp",
            "data=wmdp_bio,wmdp_cyber",
            "unlearn=rmu_zephyr",
        ],
        ["eval", "-m", "experiment=table_muse"],
        ["unlearn", "experiment=table_muse", "model=muse-books-iclm-7b", "data=muse_books"],
        ["eval", "experiment=table_tofu", "model=tofu-llama3.2-1b-retain90"],
    ],
)
def test_table_experiments_stop_before_loading_without_a_gpu(capsys, in_tmp, argv, monkeypatch):
    monkeypatch.setattr(requires, "gpu_missing", lambda: "no CUDA device is visible")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kuda: experiment=table_") and "needs a GPU" in err
    assert not (in_tmp / "outputs").exists()


def test_gpu_present_but_hub_offline_names_what_needs_the_hub(capsys, in_tmp, monkeypatch):
    monkeypatch.setattr(requires, "gpu_missing", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["unlearn", "experiment=table_wmdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "needs the Hugging Face hub for model (HuggingFaceH4/zephyr-7b-beta)" in err
    assert "HF_HUB_OFFLINE is set" in err and "model.path=DIR" in err
    assert not (in_tmp / "outputs").exists()


def test_unreachable_hub_is_found_by_a_quick_request(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    why = requires.hub_unreachable(timeout=2.0)
    assert why is not None and "http://127.0.0.1:9 is unreachable" in why


def test_local_copies_need_no_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(requires, "gpu_missing", lambda: None)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("forget.jsonl", "retain.jsonl", "bio.jsonl", "cyber.jsonl", "mmlu.jsonl"):
        (tmp_path / name).write_text("")
    local = [
        "experiment=table_wmdp",
        f"model.path={tmp_path / 'model'}",
        f"data.forget.path={tmp_path / 'forget.jsonl'}",
        f"data.retain.path={tmp_path / 'retain.jsonl'}",
        f"eval.wmdp.bio_path={tmp_path / 'bio.jsonl'}",
        f"eval.wmdp.cyber_path={tmp_path / 'cyber.jsonl'}",
        f"eval.wmdp.mmlu_path={tmp_path / 'mmlu.jsonl'}",
        "stage=unlearn",
    ]
    cfg = compose(local)
    assert requires.hub_sources(cfg) == []
    requires.check(cfg)  # nothing to fetch: no hub needed
    cfg = compose([o for o in local if not o.startswith("eval.wmdp.mmlu_path")])
    assert [str(s) for s in requires.hub_sources(cfg)] == ["eval.wmdp.mmlu_path (cais/mmlu)"]
    with pytest.raises(ConfigError, match="eval.wmdp.mmlu_path"):
        requires.check(cfg)


def test_requires_takes_only_known_values(capsys):
    assert cli.main(["eval", "requires=[tpu]"]) == 2
    assert "requires has tpu; choose among: gpu, hub" in capsys.readouterr().err


def test_make_dry_prints_every_command_and_runs_nothing(in_tmp):
    def dry(target: str) -> list[str]:
        return dry_with(target)

    def dry_with(target: str, *variables: str) -> list[str]:
        done = subprocess.run(
            ["make", "-s", "-C", str(ROOT), target, "DRY=1", f"TABLES={in_tmp}/t", *variables],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()

    wmdp = dry("table-wmdp")
    assert [line.split()[1] for line in wmdp if line.startswith(".venv/bin/kuda ")] == [
        "eval",
        "unlearn",
        "unlearn",
        "report",
    ]
    assert all(
        line.startswith((".venv/bin/kuda ", ".venv/bin/accelerate ", "rm -rf ")) for line in wmdp
    )
    assert "unlearn=rmu_zephyr " in wmdp[1] and "unlearn=kuda" in wmdp[-3]
    # the full-parameter baselines: one FSDP2 launch on 4 GPUs per domain and method
    sharded = [line for line in wmdp if line.startswith(".venv/bin/accelerate launch")]
    assert len(sharded) == 6 and all("scripts/accelerate/fsdp2.yaml" in x for x in sharded)
    assert all("--num_processes 4" in x and "unlearn.trainable=[all]" in x for x in sharded)
    assert {x.split("unlearn=")[1].split()[0] for x in sharded} == {"npo", "simnpo", "ga"}
    # a comma list of frontier methods gives one sweep each, as DOMAIN_METHODS does
    frontier = dry_with("frontier", "DOMAINS=capitals", "FRONTIER_METHODS=kuda,rmu")
    sweeps = [line for line in frontier if "hydra.sweep.dir=" in line and "/frontier/" in line]
    assert [line.split("unlearn=")[1].split()[0] for line in sweeps] == ["kuda", "rmu"]
    assert all("unlearn.lr=" in line and "unlearn.lr= " not in line for line in sweeps)
    muse = dry("table-muse")
    assert sum("model=muse-books-iclm-7b" in line for line in muse) == 3
    assert "report.metric_prefix=muse" in muse[-1]
    tofu = dry("table-tofu")
    # the retain model first: its truth ratios are every later run's forget-quality reference
    assert "model=tofu-llama3.2-1b-retain90" in tofu[0]
    assert all("data.retain_truth_ratios=" in line for line in tofu[1:4])
    assert "report.metric_prefix=tofu" in tofu[-1]
    tune = dry("tune")
    assert [line.split()[1] for line in tune if "kuda " in line] == [
        "trace",
        "unlearn",
        "pick",
        "unlearn",
        "pick",
    ]
    assert not (in_tmp / "t").exists() and not (ROOT / "outputs" / "tune" / "pick1").exists()


# ----------------------------------------------------------------------------- SLURM
def test_slurm_launcher_composes(capsys):
    argv = ["unlearn", "-m", "hydra/launcher=slurm", "model=tiny-random", "seed=1,2"]
    assert cli.main([*argv, "--cfg", "hydra"]) == 0
    out = capsys.readouterr().out
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_node"] == 1 and launcher["partition"] is None
    assert {"timeout_min", "cpus_per_task", "mem_gb"} <= set(launcher)


def test_slurm_sweeps_check_the_gpu_on_the_node_not_at_submission(monkeypatch):
    monkeypatch.setattr(requires, "gpu_missing", lambda: "no CUDA device is visible")
    monkeypatch.setattr(requires, "hub_unreachable", lambda: None)  # the GPU alone is missing
    job = ["experiment=table_wmdp", "requires=[gpu]"]
    with pytest.raises(ConfigError, match="needs a GPU"):
        plan("unlearn", job, multirun=True)
    planned = plan("unlearn", [*job, "hydra/launcher=slurm"], multirun=True)
    assert len(planned.jobs) == 1


# ----------------------------------------------------------------------------- sweeps
def test_an_experiment_that_sweeps_expands_its_params_and_needs_m():
    planned = plan("unlearn", ["experiment=tune_stage1", "model=tiny-random"], multirun=True)
    assert len(planned.jobs) == 9
    assert len(plan("unlearn", ["experiment=tune_stage1", "unlearn.lr=5e-3"], True).jobs) == 3
    with pytest.raises(ConfigError, match="run it with -m"):
        plan("unlearn", ["experiment=tune_stage1"], multirun=False)


STUB = """
import sys
from kuda_cli import cli, stages

failing, extra = int(sys.argv[1]), sys.argv[2:]

def stage(cfg, run):
    if cfg.seed == failing:
        raise RuntimeError("boom")
    run.log_metrics({"seed": cfg.seed})

stages.STAGE_FUNCTIONS["eval"] = stage
sys.exit(cli.main(["eval", "-m", "model=tiny-random", "eval=none", "seed=0,1,2", *extra]))
"""


def run_stub(tmp_path: Path, failing_seed: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", STUB, str(failing_seed), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_failing_job_is_recorded_the_others_run_and_a_rerun_skips_the_completed(tmp_path):
    first = run_stub(tmp_path, 1)
    assert first.returncode == 1, first.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "eval" / "multirun").iterdir()
    statuses = [read_json(sweep / str(i) / "meta.json")["status"] for i in range(3)]
    assert statuses == ["completed", "failed", "completed"]
    assert "RuntimeError: boom" in read_json(sweep / "1" / "meta.json")["error"]
    shown = sweep.relative_to(tmp_path)  # the sweep directory as the command names it
    summary = first.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"kuda: sweep {shown}: 3 jobs, 2 completed, 1 not completed")
    assert "job 1 failed: RuntimeError: boom" in summary

    stamps = {i: os.stat(sweep / str(i) / "meta.json").st_mtime_ns for i in (0, 2)}
    again = run_stub(tmp_path, -1)  # the same sweep, the bug fixed
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"continuing the unfinished sweep {shown} (2 of 3 jobs completed)" in again.stderr
    log = again.stdout + again.stderr
    assert "skipping job 0: already completed" in log and "skipping job 2" in log
    assert {i: os.stat(sweep / str(i) / "meta.json").st_mtime_ns for i in (0, 2)} == stamps
    meta = read_json(sweep / "1" / "meta.json")
    assert meta["status"] == "completed" and meta["attempts"][0]["status"] == "failed"
    assert (
        again.stderr.strip().splitlines()[-1].endswith("3 completed (2 skipped: completed before)")
    )
    assert [p.name for p in (tmp_path / "outputs" / "eval" / "multirun").iterdir()] == [sweep.name]


def test_a_pinned_sweep_dir_of_other_jobs_is_refused(tmp_path):
    run_stub(tmp_path, -1, "hydra.sweep.dir=sweep")
    before = (tmp_path / "sweep" / "0" / "meta.json").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "kuda_cli.cli", "eval", "-m", "model=tiny-random", "eval=none"]
        + ["seed=5,6", "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "holds a run of another config" in done.stderr.strip().splitlines()[-1]
    assert (tmp_path / "sweep" / "0" / "meta.json").read_text() == before


TINY_SWEEP = [
    "unlearn",
    "-m",
    "model=tiny-random",
    "locate=fixed",
    "locate.layers=[1,2]",
    "eval=none",
    "unlearn.steps=2,6",
    "unlearn.save_every=2",
    "unlearn.lr=1e-2",
    "unlearn.batch_size=2",
    "hydra.sweep.dir=sweep",
]


def test_a_killed_sweep_rerun_skips_completed_jobs_and_resumes_the_unfinished(
    kuda, tmp_path, monkeypatch
):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    # job 1 killed from outside right after its step 3, as `kill -9` would
    assert kuda_killed(list(TINY_SWEEP), tmp_path, "sweep/1/train_log.jsonl", 3) == -9
    sweep = tmp_path / "sweep"
    assert read_json(sweep / "0" / "meta.json")["status"] == "completed"
    assert read_json(sweep / "1" / "meta.json")["status"] == "running"
    done_at = os.stat(sweep / "0" / "meta.json").st_mtime_ns
    weights_at = os.stat(sweep / "0" / "checkpoint" / "model.safetensors").st_mtime_ns

    again = kuda(*TINY_SWEEP, check=True)  # the same command again
    log = again.stdout + again.stderr
    assert "skipping job 0: already completed" in log
    assert os.stat(sweep / "0" / "meta.json").st_mtime_ns == done_at
    assert os.stat(sweep / "0" / "checkpoint" / "model.safetensors").st_mtime_ns == weights_at
    assert read_json(sweep / "1" / "metrics.json")["train"]["resumed_from"] == 2
    steps = [
        json.loads(r)["step"] for r in (sweep / "1" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (
        again.stderr.strip().splitlines()[-1].endswith("2 completed (1 skipped: completed before)")
    )


# ----------------------------------------------------------------------------- tuning: the picker
def fake_run(root: Path, name: str, status: str, lr: float, tau: float, krd, retain, start=1.0):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "meta.json").write_text(json.dumps({"stage": "unlearn", "status": status}))
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"unlearn": {"lr": lr, "nullspace": {"tau": tau}, "beta": 10.0}})
    )
    metrics = {"before": {"facts": {"retain": {"mc_acc": start}}}}
    if krd is not None:
        metrics["diagnostics"] = {"krd": {"mean": krd}}
    if retain is not None:
        metrics["facts"] = {"retain": {"mc_acc": retain}, "forget": {"mc_acc": 1.0 - krd}}
    if status != "running":
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture
def stage1(tmp_path):
    sweep = tmp_path / "stage1"
    fake_run(sweep, "0", "completed", 1e-3, 1e-2, krd=0.20, retain=0.99)
    fake_run(sweep, "1", "completed", 3e-3, 1e-2, krd=0.55, retain=0.975)  # the choice
    fake_run(sweep, "2", "completed", 1e-2, 1e-2, krd=0.90, retain=0.90)  # too much damage
    fake_run(sweep, "3", "failed", 1e-2, 1e-3, krd=0.99, retain=1.0)  # failed: ignored
    fake_run(sweep, "4", "running", 1e-2, 1e-4, krd=None, retain=None)  # unfinished: ignored
    fake_run(sweep, "5", "completed", 3e-3, 1e-3, krd=0.50, retain=0.98)
    return sweep


def test_pick_chooses_the_largest_change_within_3_percent(capsys, stage1, tmp_path):
    out = tmp_path / "pick"
    assert cli.main(["pick", f"tune.runs=[{stage1}]", f"hydra.run.dir={out}"]) == 0
    choice = yaml.safe_load((out / "choice.yaml").read_text())
    assert choice["overrides"] == {"unlearn.lr": 3e-3, "unlearn.nullspace.tau": 1e-2}
    assert choice["run"] == str((stage1 / "1").resolve())
    assert choice["candidates"] == 4 and choice["qualified"] == 3
    assert choice["utility"]["ratio"] == pytest.approx(0.975)
    log = (out / "kuda.log").read_text()
    assert "ignoring" in log and "3 (status failed)" in log and "4 (status running)" in log
    assert read_json(out / "metrics.json")["pick"]["ignored"] == 2
    assert len((out / "candidates.csv").read_text().splitlines()) == 5

    # the smallest forget accuracy instead of the largest KRD, with a looser tolerance
    other = tmp_path / "pick-min"
    argv = ["tune.objective=facts.forget.mc_acc", "tune.direction=min", "tune.tolerance=0.2"]
    assert cli.main(["pick", f"tune.runs=[{stage1}]", *argv, f"hydra.run.dir={other}"]) == 0
    assert yaml.safe_load((other / "choice.yaml").read_text())["run"].endswith("/2")


def test_pick_exits_2_when_nothing_qualifies(stage1, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kuda_cli.cli", "pick", f"tune.runs=[{stage1}]"]
        + ["tune.tolerance=0.001", "hydra.run.dir=pick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kuda: none of the 4 runs keeps facts.retain.mc_acc within 0%")
    assert "raise tune.tolerance" in last
    assert not (tmp_path / "pick" / "choice.yaml").exists()


def test_pick_needs_runs(capsys, tmp_path):
    assert cli.main(["pick"]) == 2
    assert "kuda pick needs tune.runs" in capsys.readouterr().err


def test_stage2_starts_from_the_choice_and_sweeps_beta(capsys, stage1, tmp_path):
    out = tmp_path / "pick"
    assert cli.main(["pick", f"tune.runs=[{stage1}]", f"hydra.run.dir={out}"]) == 0
    overrides = apply_choice(["experiment=tune_stage2", f"tune.choice={out / 'choice.yaml'}"])
    planned = plan("unlearn", [*overrides, "model=tiny-random"], multirun=True)
    cfgs = [compose(job) for job in planned.jobs]
    assert [c.unlearn.beta for c in cfgs] == [2, 5, 10, 20, 50]
    assert {(c.unlearn.lr, c.unlearn.nullspace.tau) for c in cfgs} == {(3e-3, 1e-2)}
    # what the command line sets itself wins over the choice
    mine = apply_choice([f"tune.choice={out / 'choice.yaml'}", "unlearn.lr=1e-4"])
    assert mine.count("unlearn.lr=1e-4") == 1 and not any("0.003" in o for o in mine)
    # stage 2 without a choice, or with a file that is not one
    assert cli.main(["unlearn", "-m", "experiment=tune_stage2"]) == 2
    assert "pass tune.choice=FILE" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("just: text\n")
    assert cli.main(["unlearn", "-m", "experiment=tune_stage2", "tune.choice=bad.yaml"]) == 2
    assert "holds no overrides" in capsys.readouterr().err


# ----------------------------------------------------------------------------- several processes
def equal_length_corpus(directory: Path) -> list[str]:
    """Forget and retain files whose texts all have 80 bytes (80 tokens for the byte-level tiny
    tokenizer): each process's share of a batch then holds as many tokens as the others."""
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    rng = random.Random(0)

    def text() -> str:
        out = ""
        while len(out) < 80:
            out += rng.choice(words) + " "
        return out[:80]

    for name, count in (("forget", 12), ("retain", 24)):
        rows = "".join(json.dumps({"text": text()}) + "\n" for _ in range(count))
        (directory / f"{name}.jsonl").write_text(rows)
    return [
        "model=tiny-random",
        "data=wmdp_bio",
        f"data.forget.path={directory / 'forget.jsonl'}",
        f"data.retain.path={directory / 'retain.jsonl'}",
        "eval.metrics=[perplexity]",
        "eval.perplexity.max_texts=4",
        "eval.perplexity.max_length=64",
        "locate=fixed",
        "locate.layers=[1,2]",
        "unlearn.steps=3",
        "unlearn.batch_size=2",
        "unlearn.lr=1e-2",
    ]


def torchrun(args: list[str], cwd: Path, script: str = "-m kuda_cli.cli", env=None):
    runner = Path(sys.executable).with_name("torchrun")
    return subprocess.run(
        # --standalone: a free rendezvous port, so that two such tests at once (pytest -n) do not
        # meet on torchrun's default 29500 and join each other's process group
        [str(runner), "--standalone", "--nproc_per_node", "2", *script.split(), "unlearn", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("method", "sharded"),
    [(["unlearn=kuda"], False), (["unlearn=ga", "unlearn.trainable=[all]"], True)],
    ids=["kuda-replicated", "ga-fsdp2"],
)
def test_two_processes_train_as_one_with_the_whole_batch(
    kuda, tmp_path, monkeypatch, method, sharded
):
    """torchrun sets what accelerate launch sets (RANK, LOCAL_RANK, WORLD_SIZE): two CPU
    processes (Gloo) each take half of every batch; the step equals one process's with the
    whole batch: KUDA's three down_proj matrices by averaged gradients, GA's every parameter
    sharded with FSDP2 (float32 shards, reduce-scattered gradients, a sharded intermediate
    checkpoint, the final model gathered to process 0)."""
    from safetensors.torch import load_file

    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    args = [*equal_length_corpus(tmp_path), *method, "unlearn.save_every=2"]
    two = torchrun([*args, "hydra.run.dir=two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    kuda("unlearn", *args, "hydra.run.dir=one", check=True)
    a = load_file(str(tmp_path / "two" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # lr is 1e-2
    rows = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]  # written once, by process 0
    meta = read_json(tmp_path / "two" / "meta.json")
    assert meta["status"] == "completed"
    metrics = read_json(tmp_path / "two" / "metrics.json")
    assert "perplexity" in metrics  # process 0 evaluated
    assert metrics["train"]["sharded"] is sharded
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint*")) == ["checkpoint"]


def test_a_sharded_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
    tmp_path, monkeypatch
):
    """Two processes, FSDP2: stopped at step 5 after the sharded step-4 checkpoint (every
    process wrote its shards of the weights and AdamW's states), the same command again
    loads them and ends with the weights of the uninterrupted two-process run."""
    from safetensors.torch import load_file

    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    args = [
        *equal_length_corpus(tmp_path),
        "unlearn=ga",
        "unlearn.trainable=[all]",
        "unlearn.steps=6",
        "unlearn.save_every=2",
        "eval=none",
    ]
    straight = torchrun([*args, "hydra.run.dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopper = str(Path(__file__).with_name("stopped_kuda.py"))
    stopped = torchrun([*args, "hydra.run.dir=run"], tmp_path, stopper, {"STOPPED_KUDA_AT": "5"})
    assert stopped.returncode != 0
    assert (tmp_path / "run" / "checkpoint-4" / "sharded").is_dir()
    again = torchrun([*args, "hydra.run.dir=run"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from the checkpoint at step 4" in again.stdout + again.stderr
    assert read_json(tmp_path / "run" / "metrics.json")["train"]["resumed_from"] == 4
    a = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["unlearn", "model=tiny-random", "locate=fixed", "locate.layers=[1]"], "hydra.run.dir"),
        (["eval", "model=tiny-random", "hydra.run.dir=r"], "one kuda unlearn run trains"),
        (["unlearn", "model=tiny-random", "hydra.run.dir=r"], "locate.from_run=DIR"),
        (
            ["unlearn", "model=tiny-random", "locate=fixed", "locate.layers=[1]"]
            + ["unlearn.batch_size=3", "hydra.run.dir=r"],
            "multiple of the 2 processes",
        ),
    ],
)
def test_several_processes_refuse_what_they_cannot_share(capsys, monkeypatch, argv, expected):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_table_facts_runs_every_method_and_reports_the_starting_model_first(tmp_path):
    """`make table-facts` end to end on the tiny model: one trace, every method, one report."""
    tiny = [
        "model=tiny-random",
        "locate.max_probes=2",
        "locate.samples=2",
        "locate.plot_probes=0",
        "unlearn.steps=2",
        "unlearn.max_length=64",
        "unlearn.layers=[1,2]",  # ELM names layers 4-7 of the embedded model; tiny has 4
        "eval.facts.all_prompts=false",
        "eval.facts.gen_max_new_tokens=4",
        "eval.facts.fluency_max_new_tokens=4",
        "eval.perplexity.max_texts=4",
        "eval.perplexity.max_length=64",
    ]
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "table-facts", "DEPS=", f"TABLES={tmp_path}/t"]
        + [f"ARGS={' '.join(tiny)}", f"KUDA={sys.executable} -m kuda_cli.cli"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KUDA_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "t" / "facts" / "report"
    rows = list(csv.DictReader(open(report / "report.csv")))
    assert [r["method"] for r in rows] == [
        "starting model",
        "ga",
        "graddiff",
        "npo",
        "simnpo",
        "rmu",
        "adaptive_rmu",
        "undial",
        "idkdpo",
        "task_vector",
        "whp",
        "elm",
        "kuda",
    ]
    assert all(r["status"] == "completed" for r in rows)
    assert all(r["facts.forget.mc_acc"] and r["fluency.forget.nll"] for r in rows)
    assert all(float(r["diagnostics.krd.mean"]) > 0 for r in rows[1:])
    assert "lr=" in rows[1]["settings"] and "c=" in rows[5]["settings"]
    header = (report / "report.md").read_text().splitlines()[0]
    assert header.endswith("| diagnostics.krd.mean | train.seconds |")
    assert "facts.forget.mc_acc" in header and "before." not in header


def test_frontier_runs_the_domain_defaults_and_the_sweeps_then_plots_the_curves(tmp_path):
    """`make frontier` end to end on the tiny model, one domain: its trace, the table-domains
    runs at the defaults (shared), the learning-rate sweeps, and the report with the curves."""
    tiny = [
        "model=tiny-random",
        "locate.max_probes=2",
        "locate.plot_probes=0",
        "unlearn.steps=2",
        "unlearn.max_length=64",
        "eval.facts.all_prompts=false",
        "eval.facts.gen_max_new_tokens=4",
        "eval.facts.fluency_max_new_tokens=8",
        "eval.perplexity.max_texts=4",
        "eval.perplexity.max_length=64",
    ]
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "frontier", "DEPS=", f"TABLES={tmp_path}/t"]
        + ["DOMAINS=capitals", "DOMAIN_SAMPLES=2", "DOMAIN_METHODS=kuda,rmu"]
        + ["FRONTIER_METHODS=kuda", "FRONTIER_LR_kuda=1e-2,1e-1"]
        + [f"ARGS={' '.join(tiny)}", f"KUDA={sys.executable} -m kuda_cli.cli"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KUDA_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "t" / "frontier" / "report"
    rows = list(csv.DictReader(open(report / "report.csv")))
    assert [(r["method"], r["data"]) for r in rows] == [
        ("starting model", "facts:capitals"),
        ("kuda", "facts:capitals"),
        ("rmu", "facts:capitals"),
        ("kuda", "facts:capitals"),
        ("kuda", "facts:capitals"),
    ]
    start = rows[0]
    # the starting model's floor and the retain split: capitals shares its subjects with languages
    assert float(start["facts.floor.chance"]) == 0.25 and start["facts.floor.mc_acc"] != ""
    assert start["facts.retain.same_subjects.n_facts"] == "29"
    assert rows[1]["facts.retain.gen_acc"] != "" and rows[3]["facts.retain.gen_acc"] == ""
    # a random model knows nothing above its floor: no forget-removed level, so no curve point
    # (the curves themselves are tested on runs with known figures in test_report.py)
    assert (report / "frontier.md").is_file() and (report / "frontier.json").is_file()


def test_the_shipped_launch_configs_load_in_accelerate_and_fsdp2_sets_what_kuda_reads(
    monkeypatch,
):
    """accelerate reads both configs; an FSDP2 launch's settings reach kuda's sharding through
    the environment accelerate launch sets (reshard after forward, activation checkpointing)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from kuda_cli.unlearn.sharding import launch_options

    root = Path(__file__).resolve().parents[1] / "scripts" / "accelerate"
    fsdp = load_config_from_file(str(root / "fsdp2.yaml"))
    assert str(fsdp.distributed_type) in ("FSDP", "DistributedType.FSDP")
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert str(load_config_from_file(str(root / "multi_gpu.yaml")).distributed_type).endswith(
        "MULTI_GPU"
    )
    assert launch_options() == {"reshard_after_forward": True, "activation_checkpointing": False}
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert launch_options() == {"reshard_after_forward": False, "activation_checkpointing": True}
