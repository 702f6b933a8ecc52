"""Benchmark of one unlearning optimisation step, side by side in one run: wall time per step and
peak memory of

  (a) KUDA as implemented: original representations cached, forward pass truncated after the
      deepest trained layer, down_proj of 3 layers trainable, null-space projection of the update;
  (b) RMU as commonly implemented (the WMDP code's structure, written here for the benchmark): a
      frozen second copy of the model, full forward passes of both;
  (c) RMU with kuda's shared optimisations (kuda's `unlearn=rmu`: retain originals cached, forward
      truncated after the steering layer, no second copy);
  (d) plain full fine-tuning: every parameter, AdamW, next-token NLL on the same batch;

plus the time to build KUDA's projector (retain keys, eigendecomposition of the d_ff x d_ff
float64 second moment) and of the eigendecomposition alone.

    python scripts/bench_unlearn.py --model embedded                       # CPU, SmolLM2-135M
    python scripts/bench_unlearn.py --shape zephyr-7b --device cuda        # 7B shapes, bf16
    python scripts/bench_unlearn.py --shape llama2-7b --device cuda
    python scripts/bench_unlearn.py --shape zephyr-7b --plan [--gpus 4] [--batch 4 --seq 512]

`--plan` measures nothing: it prints the peak GPU memory of every phase of every method as
`kuda_cli.unlearn.memory_plan` predicts it from the shapes alone (the model built on the meta
device, each method's config composed from conf/unlearn/ as `kuda unlearn unlearn=NAME` would),
with a verdict per method, in seconds on any machine.

`--shape` builds a randomly initialised model with the exact shapes of the 7B model, in bf16 on
the device (no download); the timings and memory do not depend on the weights' values. Each
variant runs in its own child process, so its peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated` (reset after the variant's setup: the training steps), on the
CPU the peak resident set size sampled during the steps minus the process's size before the model
was built (what torch and the imports take). Batches are random token ids, the same
for every variant. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import queue as queue_errors
import statistics
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Hidden sizes, MLP widths, depths, heads and vocabularies of the paper's 7B models (their
# config.json on the hub); `tiny` checks the script itself in seconds.
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        family="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "zephyr-7b": dict(
        family="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
    ),
    "tiny": dict(
        family="llama",
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
}
VARIANTS = {
    "kuda": "(a) KUDA, as implemented",
    "rmu_copy": "(b) RMU, frozen copy + full forwards",
    "rmu_ours": "(c) RMU, kuda's optimisations",
    "full_ft": "(d) full fine-tuning (AdamW, NLL)",
}


@dataclass
class Settings:
    model: str | None
    shape: str | None
    device: str
    batch: int
    seq: int
    layers: list[int]
    warmup: int
    steps: int
    lr: float
    key_samples: int
    seed: int


# ----------------------------------------------------------------------------- setup
def build_model(s: Settings):
    """(model, adapter) on the device: the embedded SmolLM2-135M, or random 7B shapes in bf16."""
    from kuda_cli.models.adapter import get_adapter

    if s.model == "embedded":
        from omegaconf import OmegaConf

        from kuda_cli.compose import compose
        from kuda_cli.models.loading import load_model

        cfg = compose(["stage=unlearn", f"model.device={s.device}"])
        loaded = load_model(OmegaConf.to_object(cfg.model), cfg.cache_dir)
        return loaded.model, loaded.adapter
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    spec = dict(SHAPES[s.shape])
    family = spec.pop("family")
    config = (LlamaConfig if family == "llama" else MistralConfig)(**spec)
    torch.manual_seed(s.seed)
    dtype = torch.bfloat16
    with torch.device(s.device):  # initialised where it runs: no 7B copy on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), get_adapter(model)


def token_sets(s: Settings, vocab: int):
    """Forget and retain sets of random token ids: one fresh forget batch per step."""
    from kuda_cli.unlearn.batches import TokenSet

    g = torch.Generator().manual_seed(s.seed)
    n = s.batch * (s.warmup + s.steps)

    def rows(count: int) -> list[list[int]]:
        return torch.randint(3, vocab, (count, s.seq), generator=g).tolist()

    return TokenSet(rows(n), 0), TokenSet(rows(max(n, s.key_samples)), 0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakRss:
    """The largest resident set size of this process while active, sampled every 2 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# ----------------------------------------------------------------------------- the variants
def trainer_step(trainer, step: int) -> None:
    """One step of kuda's trainer loop: `Trainer._step` (forward, backward into the float32
    master copies, clipping, projection, optimiser step, the model rounded from the masters),
    with the gradient collection `train` turns on around its loop; no logging, no checkpoints."""
    trainer._collecting = True
    try:
        trainer._step(step, list(trainer.optimised.values()), time.perf_counter())
    finally:
        trainer._collecting = False


def method_config(option: str, overrides: dict[str, Any]):
    """The method config `kuda unlearn unlearn=OPTION` composes (conf/unlearn/OPTION.yaml over
    its schema), with `overrides` merged in: the dataclass the trainer reads."""
    from omegaconf import OmegaConf

    from kuda_cli.compose import compose

    composed = compose(["stage=unlearn", f"unlearn={option}"]).unlearn
    return OmegaConf.to_object(OmegaConf.merge(composed, overrides))


def rmu_option(shape: str | None) -> str:
    """RMU's published zephyr-7b setting for the 7B shapes, the embedded model's otherwise."""
    return "rmu_zephyr" if shape in ("zephyr-7b", "llama2-7b") else "rmu"


def kuda_trainer(s: Settings, model, adapter, forget, retain, method: str):
    """kuda's own method (`kuda` or `rmu`) on kuda's trainer, set up as `kuda unlearn` does: the
    config of conf/unlearn/kuda.yaml (rmu.yaml, or rmu_zephyr.yaml at 7B shapes) with the
    benchmark's learning rate, batch, length, steps and layers."""
    from kuda_cli.unlearn.methods import MethodContext, get_method
    from kuda_cli.unlearn.trainer import Trainer, used_indices

    precision = "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"
    overrides: dict[str, Any] = {
        "lr": s.lr,
        "batch_size": s.batch,
        "max_length": s.seq,
        "steps": s.warmup + s.steps,
        "layers": s.layers,
        "precision": precision,
    }
    if method == "kuda":
        option = "kuda"
        overrides["nullspace"] = {"samples": s.key_samples}
    else:
        option = rmu_option(s.shape)
        overrides["steer_layer"] = max(s.layers)
    cfg = method_config(option, overrides)
    micro = s.warmup + s.steps
    ctx = MethodContext(
        model=model,
        adapter=adapter,
        tokenizer=None,
        layers=s.layers,
        cfg=cfg,
        forget=forget,
        retain=retain,
        forget_used=used_indices(len(forget), s.batch, micro, s.seed),
        retain_used=used_indices(len(retain), s.batch, micro, s.seed + 1),
        seed=s.seed,
    )
    trainer = Trainer(
        model, None, get_method(method)(ctx), cfg, forget, retain, out_dir=None, progress=False
    )
    trainer.setup()
    trainer.method.initialise(trainer.optimised, trainer.projector)  # as `train` starts
    trainer._sync_from_masters()
    return lambda step: trainer_step(trainer, step)


def rmu_with_copy(s: Settings, model, adapter, forget, retain):
    """RMU as the WMDP code structures it: the updated model and a frozen deep copy, each run in
    full with a hook reading layer `steer`'s output; down_proj of `layers` trained; AdamW."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [adapter.down_proj_weight(model, layer) for layer in s.layers]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    steer = max(s.layers)
    g = torch.Generator().manual_seed(s.seed)
    u = torch.rand(model.config.hidden_size, generator=g)
    control = (u / u.norm() * 6.5).to(s.device)
    alpha = 1200.0

    def hidden(m, batch) -> torch.Tensor:
        out = m(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
        return out.hidden_states[steer + 1]  # after block `steer` (index 0: the embeddings)

    def step(i: int) -> None:
        from kuda_cli.unlearn.batches import batch_indices

        f = forget.batch(batch_indices(len(forget), s.batch, i, s.seed), s.device)
        r = retain.batch(batch_indices(len(retain), s.batch, i, s.seed + 1), s.device)
        optimizer.zero_grad(set_to_none=True)
        forget_loss = F.mse_loss(
            hidden(model, f).float(), control.expand(*f["input_ids"].shape, -1)
        )
        with torch.no_grad():
            target = hidden(frozen, r)
        retain_loss = F.mse_loss(hidden(model, r).float(), target.float())
        (forget_loss + alpha * retain_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def full_finetuning(s: Settings, model, adapter, forget, retain):
    """Every parameter trains: AdamW on the next-token NLL of the forget batch."""
    from kuda_cli.unlearn.batches import batch_indices
    from kuda_cli.unlearn.methods import sequence_nll

    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=s.lr)

    def step(i: int) -> None:
        f = forget.batch(batch_indices(len(forget), s.batch, i, s.seed), s.device)
        optimizer.zero_grad(set_to_none=True)
        sequence_nll(model, f).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def setup_variant(name: str, s: Settings, model, adapter, forget, retain):
    if name == "kuda":
        return kuda_trainer(s, model, adapter, forget, retain, "kuda")
    if name == "rmu_ours":
        return kuda_trainer(s, model, adapter, forget, retain, "rmu")
    if name == "rmu_copy":
        return rmu_with_copy(s, model, adapter, forget, retain)
    return full_finetuning(s, model, adapter, forget, retain)


def measure(name: str, s: Settings) -> dict[str, Any]:
    """In a child process: build the model, set the variant up, time its steps."""
    torch.manual_seed(s.seed)
    cuda = s.device.startswith("cuda")
    base = 0 if cuda else PeakRss.now()  # the CPU process before the model: torch, imports
    model, adapter = build_model(s)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bf16_weights = sum(p.numel() for p in model.parameters()) * 2
    forget, retain = token_sets(s, model.config.vocab_size)
    result: dict[str, Any] = {"weights": weights, "bf16_weights": bf16_weights}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PeakRss() as setup_rss:
        step = setup_variant(name, s, model, adapter, forget, retain)
        sync(s.device)
    result["setup_s"] = time.perf_counter() - start
    result["setup_peak"] = torch.cuda.max_memory_allocated() if cuda else setup_rss.peak - base
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRss() as rss:
        for i in range(s.warmup + s.steps):
            sync(s.device)
            t0 = time.perf_counter()
            step(i)
            sync(s.device)
            if i >= s.warmup:
                times.append(time.perf_counter() - t0)
    result["step_s"] = statistics.median(times)
    result["steps_s"] = times
    result["peak"] = torch.cuda.max_memory_allocated() if cuda else rss.peak - base
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def _child(name: str, s: Settings, queue) -> None:
    try:
        if s.device == "cpu":
            torch.set_num_threads(torch.get_num_threads())
        queue.put(measure(name, s))
    except torch.cuda.OutOfMemoryError as err:  # (d) at 7B may not fit one GPU
        queue.put({"error": f"out of memory ({str(err).splitlines()[0][:120]})"})
    except Exception as err:
        queue.put({"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()})


def run_isolated(name: str, s: Settings, target=None, poll: float = 1.0) -> dict[str, Any]:
    """`target` (default `_child`) in a fresh process; its result, or an error when the process
    dies without one (the OOM killer, a segfault): the queue is polled while the child lives."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target or _child, args=(name, s, queue))
    child.start()
    try:
        while True:
            try:
                return queue.get(timeout=poll)
            except queue_errors.Empty:
                if child.is_alive():
                    continue
            try:  # it may have put its result just before exiting
                return queue.get(timeout=poll)
            except queue_errors.Empty:
                code = child.exitcode
                signal = f" (killed by signal {-code})" if code is not None and code < 0 else ""
                return {"error": f"child exited with code {code}{signal}"}
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()


# ----------------------------------------------------------------------------- the projector
def eigh_seconds(d_ff: int, device: str, seed: int) -> float:
    """Time of the eigendecomposition of a random d_ff x d_ff float64 second moment."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_ff, d_ff // 2 + 1, generator=g, dtype=torch.float64).to(device)
    moment = keys @ keys.T / keys.shape[1]
    sync(device)
    start = time.perf_counter()
    torch.linalg.eigh(moment)
    sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- the plan
PLAN_METHODS = ("kuda", "rmu", "ga", "graddiff", "npo", "simnpo")
FULL_PARAMETER = ("ga", "graddiff", "npo", "simnpo")  # trainable=[all]


def shape_config(shape: str):
    from transformers import LlamaConfig, MistralConfig

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    return (LlamaConfig if family == "llama" else MistralConfig)(**spec)


def plans(shape: str, batch: int, seq: int, gpus: int, layers: list[int]) -> list:
    """kuda_cli.unlearn.memory_plan's plans of every method at `shape`: KUDA and RMU on one GPU; the
    full-parameter baselines sharded with FSDP2 over `gpus` GPUs, then on one GPU without
    sharding, then with LoRA on one GPU. Each config is conf/unlearn/<method>.yaml's (RMU at 7B:
    rmu_zephyr.yaml) with the batch and length given; `layers` where the method trains the
    located ones (KUDA)."""
    from kuda_cli.models.adapter import get_adapter
    from kuda_cli.unlearn import memory_plan

    model = memory_plan.meta_model(shape_config(shape))
    adapter = get_adapter(model)
    base = {"batch_size": batch, "max_length": seq}
    out = []
    for name in PLAN_METHODS:
        option = rmu_option(shape) if name == "rmu" else name
        cfg = method_config(option, base)
        one = memory_plan.Workload(batch, seq)
        if name in FULL_PARAMETER:
            sharded = memory_plan.Workload(batch, seq, gpus=gpus, shard=True)
            lora = method_config(option, {**base, "lora": {"enabled": True}})
            settings = [(cfg, sharded), (cfg, one), (lora, one)]
        else:
            settings = [(cfg, one)]
        out += [memory_plan.plan(c, model, adapter, layers, w) for c, w in settings]
    return out


def print_plan(shape: str, batch: int, seq: int, gpus: int, layers: list[int]) -> None:
    from kuda_cli.unlearn import memory_plan

    every = plans(shape, batch, seq, gpus, layers)
    first = every[0]
    print(
        f"bench_unlearn --plan --shape {shape}: predicted peak GPU memory of each phase (GiB), "
        f"batch {batch} x {seq} tokens, KUDA's layers {layers}, FSDP2 over {gpus} GPUs"
    )
    print(
        f"weights {first.bf16_weights / 2 / 1e9:.2f}B parameters = {gib(first.bf16_weights)} GiB "
        f"in bf16; 80 GB = {gib(memory_plan.GPU_BYTES)} GiB "
        "(kuda_cli.unlearn.memory_plan, meta device)"
    )
    head = "".join(f"{p[:11]:>12}" for p in memory_plan.PHASES)
    print(f"{'method':<9}{'setting':<20}{'trained':>9}{head}{'peak':>9}{'x bf16':>8}")
    for p in every:
        cells = "".join(
            f"{'-' if p.total(ph) is None else gib(p.total(ph)):>12}" for ph in memory_plan.PHASES
        )
        print(
            f"{p.method:<9}{p.mode:<20}{p.trained / 1e6:>8.1f}M{cells}{gib(p.peak):>9}"
            f"{p.ratio:>8.2f}"
        )
    print("where each peak goes (GiB):")
    for p in every:
        parts = sorted(p.phases[p.peak_phase].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k} {gib(v)}" for k, v in parts if v >= 0.005 * 2**30)
        print(f"  {p.method:<9}{p.mode:<20}{p.peak_phase}: {shown}")
    for name in PLAN_METHODS:
        print(verdict(name, [p for p in every if p.method == name], gpus))


def verdict(name: str, mine: list, gpus: int) -> str:
    """One line: KUDA's peak against 1.3x the bf16 weights and 80 GB on one GPU; RMU's against
    80 GB on one GPU; a full-parameter method's per GPU with FSDP2 over `gpus` GPUs (and, for
    information, on one GPU without sharding and with LoRA)."""
    from kuda_cli.unlearn import memory_plan

    def gb(p) -> str:
        fits = p.peak < memory_plan.GPU_BYTES
        return f"{p.peak / 1e9:.1f} GB {'<' if fits else '>='} 80 GB"

    main = mine[0]
    if name == "kuda":
        under = main.ratio <= main.target
        ok = main.fits()
        return (
            f"verdict kuda: {'yes' if ok else 'NO'}: peak {gib(main.peak)} GiB in {main.peak_phase}"
            f" = {main.ratio:.2f}x the bf16 weights ({'<=' if under else '>'} "
            f"{main.target}x), {gb(main)} on one GPU"
        )
    if name not in FULL_PARAMETER:
        return (
            f"verdict {name}: {'yes' if main.fits() else 'NO'}: {gb(main)} on one GPU (peak in "
            f"{main.peak_phase}, {main.ratio:.2f}x the bf16 weights)"
        )
    plain, lora = mine[1], mine[2]
    return (
        f"verdict {name}: {'yes' if main.fits() else 'NO'}: {gb(main)} per GPU with FSDP2 over "
        f"{gpus} GPUs (peak in {main.peak_phase}); one GPU unsharded: {gb(plain)}; "
        f"{lora.mode}: {gb(lora)}"
    )


# ----------------------------------------------------------------------------- main
def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", choices=["embedded"], help="the embedded SmolLM2-135M")
    which.add_argument("--shape", choices=sorted(SHAPES), help="random weights, 7B shapes, bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="tokens (default: 512 on CUDA)")
    parser.add_argument("--layers", default="5,6,7", help="trained layers (RMU's: 5,6,7)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--key-samples", type=int, default=32, help="retain sequences for keys")
    parser.add_argument("--eigh-sizes", default=None, help="d_ff sizes to time eigh at")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plan", action="store_true", help="predict each phase's peak memory; run nothing"
    )
    parser.add_argument("--gpus", type=int, default=4, help="--plan: GPUs FSDP2 shards over")
    args = parser.parse_args()
    if args.plan:
        if args.shape is None:
            parser.error("--plan needs --shape")
        layers = [int(x) for x in args.layers.split(",")]
        print_plan(args.shape, args.batch, args.seq or 512, args.gpus, layers)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    if args.model is None and args.shape is None:
        args.model = "embedded"
    if args.shape in ("llama2-7b", "zephyr-7b") and not args.device.startswith("cuda"):
        parser.error(f"--shape {args.shape} needs --device cuda (bf16 7B on a CPU is impractical)")
    cuda = args.device.startswith("cuda")
    s = Settings(
        model=args.model,
        shape=args.shape,
        device=args.device,
        batch=args.batch,
        seq=args.seq or (512 if cuda else 128),
        layers=[int(x) for x in args.layers.split(",")],
        warmup=args.warmup,
        steps=args.steps,
        lr=args.lr,
        key_samples=args.key_samples,
        seed=args.seed,
    )
    what = f"--model {s.model}" if s.model else f"--shape {s.shape} (random weights, bf16)"
    device = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench_unlearn {what} on {args.device} ({device}), torch {torch.__version__}")
    print(
        f"batch {s.batch} x {s.seq} tokens, trained layers {s.layers}, {s.warmup} warm-up + "
        f"{s.steps} timed steps (median), key samples {s.key_samples}"
    )
    memory = "peak allocated" if cuda else "peak RSS - base"
    results = {}
    for name in args.variants.split(","):
        results[name] = run_isolated(name, s)
        r = results[name]
        if "error" in r:
            print(f"  {VARIANTS[name]:<40} failed: {r['error']}")
            if "trace" in r:
                print(r["trace"])
            continue
        print(
            f"  {VARIANTS[name]:<40} step {r['step_s']:8.3f} s   {memory} {gib(r['peak']):>7} GiB"
            f" = {r['peak'] / r['weights']:.2f}x weights ({r['peak'] / r['bf16_weights']:.2f}x"
            f" bf16)   setup {r['setup_s']:.1f} s, setup peak {gib(r['setup_peak'])} GiB,"
            f" trainable {r['trainable'] / 1e6:.1f}M"
        )
    ok = {k: v for k, v in results.items() if "error" not in v}
    any_run = next(iter(ok.values()), None)
    if any_run:
        print(
            f"weights: {gib(any_run['weights'])} GiB as loaded, {gib(any_run['bf16_weights'])} "
            "GiB in bf16"
        )
    print("ratios (same process run, same batches):")
    if "kuda" in ok and "full_ft" in ok:
        ratio = ok["kuda"]["step_s"] / ok["full_ft"]["step_s"]
        print(f"  step time KUDA / full fine-tuning     {ratio:.3f}  (target <= 0.5)")
    if "kuda" in ok:
        r = ok["kuda"]
        bf16 = r["peak"] / r["bf16_weights"]
        print(
            f"  KUDA peak memory / weights            {r['peak'] / r['weights']:.3f}"
            + (f"  (bf16 weights: {bf16:.3f}; target <= 1.3)" if cuda else "")
        )
    if "rmu_copy" in ok and "rmu_ours" in ok:
        t = ok["rmu_ours"]["step_s"] / ok["rmu_copy"]["step_s"]
        m = ok["rmu_ours"]["peak"] / ok["rmu_copy"]["peak"]
        print(f"  RMU ours / RMU with a frozen copy     step time {t:.3f}, peak memory {m:.3f}")
    if "kuda" in ok and "rmu_ours" in ok:
        t = ok["kuda"]["step_s"] / ok["rmu_ours"]["step_s"]
        print(f"  step time KUDA / RMU ours             {t:.3f}")
    if "kuda" in ok:
        print(
            f"KUDA setup (originals, retain keys of {s.key_samples} sequences, eigh, projectors): "
            f"{ok['kuda']['setup_s']:.1f} s"
        )
    d_ff = SHAPES[s.shape]["intermediate_size"] if s.shape else 1536
    sizes = [int(x) for x in args.eigh_sizes.split(",")] if args.eigh_sizes else [d_ff]
    for size in sizes:
        seconds = eigh_seconds(size, args.device, s.seed)
        print(f"eigendecomposition of a {size} x {size} float64 second moment: {seconds:.2f} s")


if __name__ == "__main__":
    main()
