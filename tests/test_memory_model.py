"""The memory model (`kuda_cli.unlearn.memory_plan`) against the real code on the CPU, and
scripts/bench_unlearn.py's `--plan` and its guard against a child process that dies.

Each scenario runs in a fresh process (`bench_unlearn.run_isolated`): the model is built, then
the real Trainer (unlearn/trainer.py) runs `setup()` (the method's originals, KUDA's spectra, the
float32 masters), the gradient-conflict diagnostic as `kuda unlearn` calls it, and two training
steps with an intermediate and a final checkpoint. Memory is what torch's CPU allocator holds, from
the profiler's memory events (torch 2.13 has no CPU allocator statistics; RSS would add glibc's
retained pages and the interpreter): tensors only, as `torch.cuda.max_memory_allocated` counts
them on a GPU. Each phase's peak must be within 20% of `memory_plan.plan`'s prediction for the CPU.

Models, in bf16 (the 7B runs' dtype, which takes the master-weights path; this CPU has bf16
matrix units): the 7B widths (hidden 4096, d_ff 14336, 32/8 heads, vocab 32000) with two layers
for KUDA, without the null space (the float64 work at d_ff 14336 is minutes on two cores); GA on
one layer of the same widths with a vocabulary of 8000 (16 bytes per parameter: two layers would
need more than 8 GB); and KUDA with its null space at 4 layers of hidden 512, d_ff 2048, where
the d_ff^2 moments, eigendecompositions and projectors dominate. `pytest -s` prints the tables.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_unlearn; spawned children inherit sys.path

import bench_unlearn  # noqa: E402

WIDE = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8
)
SCENARIOS = {
    "kuda-7b-widths": dict(
        option="kuda",
        config=dict(WIDE, num_hidden_layers=2, vocab_size=32000),
        overrides=dict(layers=[0], nullspace=dict(enabled=False)),
        batch=2,
        seq=64,
    ),
    "ga-7b-widths": dict(
        option="ga",
        config=dict(WIDE, num_hidden_layers=1, vocab_size=8000),
        # one step (its optimiser step is GA's worst moment), the final checkpoint only
        overrides=dict(steps=1, save_every=0),
        batch=2,
        seq=64,
    ),
    "kuda-spectra": dict(
        option="kuda",
        config=dict(
            hidden_size=512,
            intermediate_size=2048,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_hidden_layers=4,
            vocab_size=2048,
        ),
        overrides=dict(layers=[1, 2], nullspace=dict(samples=16)),
        batch=4,
        seq=128,
    ),
}
TOLERANCE = 0.2


class AllocationTrace:
    """Bytes held through torch's CPU allocator while active, from the profiler's memory
    events; the peak of each named phase (an allocation counts for the innermost phase around
    it, and the bytes held when a phase starts count for it)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def phase(self, name: str):
        from torch.profiler import record_function

        return record_function(f"phase::{name}")

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return inner

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        events = self._profile.profiler.kineto_results.events()
        windows = [
            (e.start_ns(), e.end_ns(), e.name().removeprefix("phase::"))
            for e in events
            if e.name().startswith("phase::")
        ]
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self.peaks: dict[str, int] = {}
        starts = sorted((start, name) for start, _, name in windows)
        total, next_start = 0, 0
        for when, nbytes in memory:
            while next_start < len(starts) and starts[next_start][0] <= when:
                name = starts[next_start][1]
                self.peaks[name] = max(self.peaks.get(name, 0), total)
                next_start += 1
            total += nbytes
            inside = [w for w in windows if w[0] <= when <= w[1]]
            if inside:
                name = max(inside, key=lambda w: w[0])[2]
                self.peaks[name] = max(self.peaks.get(name, 0), total)
        for name in (n for _, n in starts[next_start:]):
            self.peaks[name] = max(self.peaks.get(name, 0), total)
        return False


def method_cfg(spec: dict):
    overrides = {"save_every": 1, "steps": 2, **spec["overrides"]}
    overrides.update(batch_size=spec["batch"], max_length=spec["seq"])
    return bench_unlearn.method_config(spec["option"], overrides)


def rows(n: int, spec: dict, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, spec["config"]["vocab_size"], (n, spec["seq"]), generator=g).tolist()


def data(spec: dict):
    from kuda_cli.unlearn.batches import TokenSet

    return TokenSet(rows(2 * spec["batch"], spec, 1), 0), TokenSet(rows(16, spec, 2), 0)


def _phases_child(name: str, spec: dict, queue) -> None:
    """In a fresh process: the real phases of `spec`, their allocator peaks and seconds."""
    try:
        queue.put(measure(spec))
    except Exception as err:  # reported, not raised: the parent would only see a dead child
        import traceback

        queue.put({"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()})


def measure(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from kuda_cli.models.adapter import get_adapter
    from kuda_cli.unlearn.diagnostics import gradient_conflict
    from kuda_cli.unlearn.methods import MethodContext, get_method
    from kuda_cli.unlearn.trainer import Trainer, used_indices

    torch.manual_seed(0)
    cfg, config = spec["cfg"], MistralConfig(**spec["config"])
    forget, retain = data(spec)
    started, seconds = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as out, AllocationTrace() as trace:
        with trace.phase("load"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        adapter = get_adapter(model)
        micro = cfg.steps * cfg.grad_accum
        ctx = MethodContext(
            model=model,
            adapter=adapter,
            tokenizer=None,
            layers=list(cfg.layers or [0]),
            cfg=cfg,
            forget=forget,
            retain=retain,
            forget_used=used_indices(len(forget), cfg.batch_size, micro, 0),
            retain_used=used_indices(len(retain), cfg.batch_size, micro, 1),
        )
        method = get_method(cfg.method)(ctx)
        method.prepare = trace.wrap("originals", method.prepare)
        method.projector = trace.wrap("spectra", method.projector)
        trainer = Trainer(model, None, method, cfg, forget, retain, out_dir=out, progress=False)
        with trace.phase("setup"):  # freezing, masters, optimiser: between the phases
            trainer.setup()
        seconds["setup"] = time.perf_counter() - started
        first, _ = trainer.batches(0)
        retain_batch = retain.batch(list(range(min(len(retain), cfg.batch_size))))
        with trace.phase("diagnostics"):
            gradient_conflict(method, trainer.params, first, retain_batch, trainer.projector)
        seconds["diagnostics"] = time.perf_counter() - started
        trainer.save = trace.wrap("save", trainer.save)
        trainer.save_final = trace.wrap("save", trainer.save_final)
        with trace.phase("step"):
            trainer.train()
        seconds["train"] = time.perf_counter() - started
    return {"peaks": trace.peaks, "seconds": seconds}


def predict(spec: dict):
    from transformers import MistralConfig

    from kuda_cli.models.adapter import get_adapter
    from kuda_cli.unlearn import memory_plan
    from kuda_cli.unlearn.trainer import used_indices

    cfg = spec["cfg"]
    model = memory_plan.meta_model(MistralConfig(**spec["config"]))
    forget, retain = data(spec)
    stored = used_indices(len(forget), cfg.batch_size, cfg.steps, 0)
    work = memory_plan.Workload(
        spec["batch"],
        spec["seq"],
        device="cpu",
        stored_items=len(stored),
        key_samples=min(cfg.nullspace.samples, len(retain)) if hasattr(cfg, "nullspace") else None,
    )
    return memory_plan.plan(cfg, model, get_adapter(model), list(cfg.layers or []), work)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_phase_is_within_20_percent_of_the_model(scenario):
    from kuda_cli.unlearn import memory_plan

    spec = dict(SCENARIOS[scenario])
    spec["cfg"] = method_cfg(spec)
    started = time.perf_counter()
    result = bench_unlearn.run_isolated(scenario, spec, target=_phases_child, poll=0.5)
    assert "error" not in result, result.get("trace", result["error"])
    plan = predict(spec)
    print(
        f"\n{scenario}: {spec['config']}, bf16, batch {spec['batch']} x {spec['seq']}, "
        f"{time.perf_counter() - started:.0f} s ({result['seconds']})"
    )
    print(f"  {'phase':<12}{'measured MiB':>14}{'predicted MiB':>15}{'predicted/measured':>20}")
    wrong = {}
    for phase in memory_plan.PHASES:
        predicted, measured = plan.total(phase), result["peaks"].get(phase)
        if predicted is None:
            continue
        ratio = predicted / measured
        print(f"  {phase:<12}{measured / 2**20:>14.1f}{predicted / 2**20:>15.1f}{ratio:>20.3f}")
        if abs(ratio - 1) > TOLERANCE:
            wrong[phase] = round(ratio, 3)
    assert not wrong, f"{scenario}: predicted / measured outside 1 +- {TOLERANCE}: {wrong}"


def test_the_plan_prints_kudas_ratio_and_a_verdict_per_method(monkeypatch):
    from kuda_cli.unlearn import memory_plan

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_unlearn.py"), "--shape", "zephyr-7b"]
        + ["--plan"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    print("\n" + done.stdout)
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("verdict ")]
    assert [line.split()[1].rstrip(":") for line in verdicts] == list(bench_unlearn.PLAN_METHODS)
    built = []
    real_meta_model = memory_plan.meta_model

    def meta_model(*args, **kwargs):
        built.append(real_meta_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(memory_plan, "meta_model", meta_model)
    kuda = bench_unlearn.plans("zephyr-7b", 4, 512, 4, [5, 6, 7])[0]
    # shapes only: not one weight or buffer of the 7B model is allocated
    [model] = built
    materialised = [
        n for n, t in (*model.named_parameters(), *model.named_buffers()) if not t.is_meta
    ]
    assert not materialised, materialised[:5]
    assert kuda.method == "kuda"
    assert f"= {kuda.ratio:.2f}x the bf16 weights" in verdicts[0]
    assert "80 GB on one GPU" in verdicts[0] and "x the bf16 weights" in verdicts[1]
    for line in verdicts[2:]:
        assert "per GPU with FSDP2 over 4 GPUs" in line


def _killed(name, settings, queue) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does


def _answers(name, settings, queue) -> None:
    queue.put({"name": name})


class _WatchedSpawn:
    """The spawn context run_isolated asks for, counting the reads of its queue made after the
    child has exited: a loop that waits for a dead child is stopped at the third."""

    def __init__(self):
        self.real = bench_unlearn.mp.get_context("spawn")
        self.children = []
        self.reads_after_exit = 0

    def Process(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
        self.children.append(self.real.Process(*args, **kwargs))
        return self.children[-1]

    def Queue(self):  # noqa: N802
        queue = self.real.Queue()
        real_get = queue.get

        def get(*args, **kwargs):
            if self.children[-1].exitcode is not None:
                self.reads_after_exit += 1
                assert self.reads_after_exit <= 2, "still polling a child that has exited"
            return real_get(*args, **kwargs)

        queue.get = get
        return queue


def test_run_isolated_reports_a_killed_child_instead_of_waiting_forever(monkeypatch):
    watched = _WatchedSpawn()
    monkeypatch.setattr(bench_unlearn.mp, "get_context", lambda method: watched)
    assert bench_unlearn.run_isolated("x", None, target=_killed, poll=0.2) == {
        "error": "child exited with code -9 (killed by signal 9)"
    }
    assert watched.children[-1].exitcode == -9 and watched.reads_after_exit <= 2
    assert bench_unlearn.run_isolated("y", None, target=_answers, poll=0.2) == {"name": "y"}


def test_the_plan_of_a_full_parameter_method_shards_and_lora_trains_adapters():
    from kuda_cli.unlearn import memory_plan

    every = [p for p in bench_unlearn.plans("zephyr-7b", 4, 512, 4, [5, 6, 7]) if p.method == "ga"]
    sharded, plain, lora = every
    assert sharded.mode == "FSDP2 x4" and sharded.phases["diagnostics"] is None
    assert plain.trained == sharded.trained and lora.trained < plain.trained / 10
    # float32 masters, gradients and AdamW states: 16 bytes per parameter, a quarter per GPU
    assert plain.phases["save"]["AdamW states"] == 4 * sharded.phases["save"]["AdamW states"]
    assert plain.phases["save"]["float32 masters"] == 4 * plain.trained
    assert plain.peak > memory_plan.GPU_BYTES / 1000 > 0


def test_a_lora_plan_on_several_gpus_replicates_the_model_as_a_run_does():
    from kuda_cli.models.adapter import get_adapter
    from kuda_cli.unlearn import memory_plan, sharding

    model = memory_plan.meta_model(bench_unlearn.shape_config("zephyr-7b"))
    lora = bench_unlearn.method_config("ga", {"lora": {"enabled": True}})
    full = bench_unlearn.method_config("ga", {})
    work = memory_plan.Workload(4, 512, gpus=4)
    replicated = memory_plan.plan(lora, model, get_adapter(model), [], work)
    sharded = memory_plan.plan(full, model, get_adapter(model), [], work)
    assert not sharding.shards(lora, 4) and sharding.shards(full, 4)
    assert replicated.mode == "LoRA r=16, 4 GPUs" and sharded.mode == "FSDP2 x4"
    assert replicated.phases["save"]["weights"] == replicated.weights
    assert "float32 parameter shards" in sharded.phases["save"]
