"""Predicted peak device memory of each phase of `kuda unlearn`, from tensor shapes alone.

The model is built on `torch.device("meta")` (no memory), the trained parameters come from the
method itself (`trainable_parameters`, or the LoRA adapters `lora.attach` would add), and so does
what its losses run and what `prepare` precomputes (`Method.forget_reach`, `retain_reach`,
`recorded_sites`, `precomputes_reference`, `nullspace_settings`; the activations' per-token cost
is unlearn/memory_activations.py's). Each phase adds up what the trainer keeps on the device at
its worst moment:

  load         the weights in their dtype (FSDP2: plus one layer in float32 while sharding)
  originals    `method.prepare`: a no-grad forward of 8 sequences to the deepest site
               (record_sites; the stored originals live on the host), or NPO's reference
               log-probabilities (a no-grad forward to the logits)
  spectra      KUDA's null-space keys: one float64 d_ff x d_ff moment per trained layer summed in
               place, then `torch.linalg.eigh` of each in turn (the eigenvectors in float64 plus
               dsyevd's 2n^2 + 6n + 1 doubles of workspace: LAPACK's, measured on the CPU;
               cuSOLVER's is assumed the same), each moment freed once decomposed and a float32
               copy of its eigenvectors kept, then the float32 projectors (built in float64: u,
               u diag(w) and their product, 24 bytes per entry)
  diagnostics  gradient conflict: a retain backward whose gradients are stashed (trained
               elements x their dtype), then the forget backward reduced per parameter in hooks
  step         float32 master copies of half-precision trained tensors, their float32 gradients
               and AdamW's two states (16 bytes per trained element), the projectors, the
               activations autograd keeps, and the worst of the forward's, the backward's and
               the optimiser's temporaries (AdamW's foreach path on CUDA: one float32 copy of
               every state; the per-tensor path on the CPU: 12 bytes per element of the largest)
  save         what the step leaves (weights, masters, gradients, AdamW states); the tensors go to
               the host one at a time (FSDP2: each all-gathered in float32 first)

With `device="cpu"` the host's tensors count too (the stored originals): the CPU check
(tests/test_memory_model.py) measures that. Several GPUs: layer-restricted methods replicate the
model and run their share of the batch; full-parameter ones (`trainable=[all]`, without LoRA) are
sharded with FSDP2: 16 bytes per parameter / N, plus the all-gathered root and two layers in the
model dtype, plus one layer's unsharded gradients in backward; activation checkpointing off.
Nothing here allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kuda_cli.unlearn import sharding
from kuda_cli.unlearn.memory_activations import Activations, Dims, layer_of
from kuda_cli.unlearn.methods import Method
from kuda_cli.unlearn.nullspace import STREAM_ROWS

GIB = 2**30
GPU_BYTES = 80 * 10**9  # an 80 GB GPU
PHASES = ("load", "originals", "spectra", "diagnostics", "step", "save")
RECORD_BATCH = 8  # sequences per forward in record_sites and key_moments


@dataclass
class Workload:
    batch: int  # sequences per step (all processes together)
    seq: int  # tokens per sequence
    gpus: int = 1
    device: str = "cuda"  # "cpu": host tensors count too
    # items whose originals the method stores (KUDA: forget, RMU: retain); None: plenty
    stored_items: int | None = None
    key_samples: int | None = None  # retain sequences for the keys (None: nullspace.samples)
    spectra_cached: bool = False  # the eigendecompositions come from the cache (on the host)
    shard: bool | None = None  # FSDP2; None: as a run would (sharding.shards)


@dataclass
class Plan:
    method: str
    mode: str  # "1 GPU", "FSDP2 x4", "LoRA r=16, 1 GPU"
    weights: int  # bytes as loaded
    bf16_weights: int  # parameters x 2
    trained: int  # trained elements
    target: float | None = None  # the method's `memory_target`: the most its peak / bf16 weights
    phases: dict[str, dict[str, float] | None] = field(default_factory=dict)  # None: not run

    def total(self, phase: str) -> float | None:
        parts = self.phases.get(phase)
        return None if parts is None else sum(parts.values())

    @property
    def peak_phase(self) -> str:
        return max((p for p in PHASES if self.phases.get(p) is not None), key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    @property
    def ratio(self) -> float:
        return self.peak / self.bf16_weights

    def fits(self) -> bool:
        """Under 80 GB per GPU, and at most the method's target x the bf16 weights if it has one."""
        return self.peak < GPU_BYTES and (self.target is None or self.ratio <= self.target)


def meta_model(config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of `config` with every tensor on the meta device (shapes and dtypes only)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def method_for(cfg, model: nn.Module, adapter, layers: list[int]):
    """The method `cfg.method` over `model`, with empty data: enough for its parameters."""
    from kuda_cli.unlearn.batches import TokenSet
    from kuda_cli.unlearn.methods import MethodContext, get_method

    empty = TokenSet([], 0)
    ctx = MethodContext(model, adapter, None, list(layers), cfg, empty, empty, [], [])
    return get_method(cfg.method)(ctx)


def lora_shapes(model: nn.Module, adapter, cfg, layers: list[int] | None) -> dict[str, int]:
    """Elements of each adapter pair (A: r x in, B: out x r) that `lora.attach` would add."""
    spec, out = cfg.lora, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in spec.target_modules:
            continue
        if layers is None or layer_of(name, adapter) in layers:
            out[name] = spec.r * (module.in_features + module.out_features)
    return out


def plan(cfg, model: nn.Module, adapter, layers: list[int], work: Workload) -> Plan:
    """Every phase's predicted peak for `cfg` (a method's config dataclass) on `model` (meta or
    real: only shapes are read), training `layers` where the method trains located ones."""
    run = _Run(cfg, model, adapter, layers, work)
    target = run.method.memory_target
    out = Plan(cfg.method, run.mode, run.weights, run.n_params * 2, run.n_trained, target=target)
    out.phases["load"] = _load(run)
    held = _Held.of(run)
    out.phases["originals"] = _originals(run, held)
    if run.cpu and run.stored:
        held.resident["stored originals (host)"] = run.stored
    out.phases["spectra"] = _spectra(run, held)
    if held.masters:
        held.resident["float32 masters"] = held.masters
    if run.projectors:
        held.resident["projectors (float32)"] = run.projectors
    # the diagnostic is skipped on sharded parameters
    out.phases["diagnostics"] = None if run.shard else _diagnostics(run, held)
    out.phases["step"] = _step(run, held)
    out.phases["save"] = _save(run, held)
    return out


class _Run:
    """What every phase of one plan reads: the config, the method, the shapes, the trained
    tensors, the workload, and the training forwards' cost per token."""

    def __init__(self, cfg, model: nn.Module, adapter, layers: list[int], work: Workload):
        self.cfg, self.work, self.cpu = cfg, work, work.device == "cpu"
        self.method = method = method_for(cfg, model, adapter, layers)
        self.d, params = Dims.of(model.config), list(model.parameters())
        self.e = e = params[0].element_size()  # bytes per element of the weights
        self.n_params = sum(p.numel() for p in params)
        self.largest_param = max(p.numel() for p in params)
        self.layer_params = sum(p.numel() for p in adapter.module(model, "layer", 0).parameters())
        self.weights = sum(p.numel() * p.element_size() for p in params)  # as loaded
        full = "all" in cfg.trainable
        if cfg.lora.enabled:
            sizes = lora_shapes(model, adapter, cfg, None if full else method.trained_layers)
            self.weights += sum(sizes.values()) * e
            self.trained = {n: (k, e) for n, k in sizes.items()}
        else:
            chosen = method.trainable_parameters()
            self.trained = {n: (p.numel(), p.element_size()) for n, p in chosen.items()}
        self.n_trained = sum(k for k, _ in self.trained.values())
        self.shard = sharding.shards(cfg, work.gpus) if work.shard is None else work.shard
        self.tokens = math.ceil(work.batch / work.gpus) * work.seq  # per step and process
        self.ns = ns = method.nullspace_settings
        # nullspace.device: `auto` keeps moments, spectra and projectors on the host for a GPU model
        self.on_host = ns is not None and not self.cpu and ns.device in ("auto", "host")
        self.activations = act = Activations(self.d, e, adapter, self.trained, full)
        self.biggest = act.biggest
        self.forget_pass = act.one_pass(method.forget_reach(self.d.layers))
        self.retain_pass = act.one_pass(method.retain_reach(self.d.layers))
        # the gradient-conflict diagnostic's retain NLL: every layer, the logits
        self.nll_pass = act.one_pass(Method.LossReach(self.d.layers - 1, logits=True))

    @property
    def mode(self) -> str:
        """ "1 GPU", "FSDP2 x4", "LoRA r=16, 1 GPU"."""
        gpus = self.work.gpus
        mode = f"FSDP2 x{gpus}" if self.shard else f"{gpus} GPU" + ("s" if gpus > 1 else "")
        return f"LoRA r={self.cfg.lora.r}, {mode}" if self.cfg.lora.enabled else mode

    @property
    def recorded_items(self) -> int:
        return RECORD_BATCH if self.work.stored_items is None else self.work.stored_items

    @property
    def recorded_row(self) -> int:
        """Bytes per token of the sites whose originals `prepare` records."""
        return self.method.recorded_sites * self.d.hidden * self.e

    @property
    def stored(self) -> float:
        """Bytes of the originals `prepare` stores (on the host)."""
        if not self.method.recorded_sites:
            return 0.0
        return self.recorded_items * self.work.seq * self.recorded_row

    @property
    def projectors(self) -> float:
        """Bytes of the float32 projectors kept on the device during training."""
        if self.ns is None or self.on_host:
            return 0.0
        return len(self.method.trained_layers) * float(self.d.ffn) ** 2 * 4

    @property
    def key_tokens(self) -> int:
        """Tokens per forward of the null-space key pass."""
        samples = self.ns.samples if self.work.key_samples is None else self.work.key_samples
        return min(RECORD_BATCH, samples) * self.work.seq


@dataclass
class _Held:
    """What the device holds from phase to phase (`resident`, grown as the phases add to it),
    and the sizes of the training state."""

    resident: dict[str, float]
    gathered: dict[str, float]  # FSDP2: the parameters all-gathered for a forward
    masters: float  # float32 master copies
    grads: float
    states: float  # AdamW's

    @classmethod
    def of(cls, run: _Run) -> _Held:
        if run.shard:
            gpus, layer = run.work.gpus, run.layer_params
            root = run.n_params - run.d.layers * layer
            resident = {"float32 parameter shards": 4 * run.n_params / gpus}
            gathered = {"all-gathered root and two layers": run.e * (root + 2 * layer)}
            masters, grads = 0.0, 4 * run.n_params / gpus
        else:
            resident, gathered = {"weights": run.weights}, {}
            masters = 4.0 * run.n_trained if run.cfg.master_weights and run.e < 4 else 0.0
            grads = 4.0 * run.n_trained if masters else sum(k * b for k, b in run.trained.values())
        states = 2 * grads if run.cfg.optimizer == "adamw" else 0.0
        return cls(resident, gathered, masters, grads, states)

    @property
    def state_parts(self) -> dict[str, float]:
        return {"AdamW states": self.states} if self.states else {}


def _load(run: _Run) -> dict[str, float]:
    parts = {"weights": run.weights}
    if run.shard:
        parts["one layer in float32 while sharding"] = 2 * run.layer_params
    return parts


def _originals(run: _Run, held: _Held) -> dict[str, float]:
    """`method.prepare`: the recorded sites' originals, or NPO-like reference log-probabilities,
    or nothing."""
    d, e, work = run.d, run.e, run.work
    if run.method.recorded_sites:
        n_rec = min(RECORD_BATCH, max(run.recorded_items, 1)) * work.seq
        parts = {**held.resident, "no-grad forward": n_rec * d.per_token("nograd_layer", e)}
        # on the CPU the stored rows are views of the recorded batch
        parts["stored originals (host)" if run.cpu else "recorded sites"] = (
            run.stored if run.cpu else n_rec * run.recorded_row
        )
        return parts
    if run.method.precomputes_reference:
        n_ref = run.cfg.batch_size * work.seq
        worst = max(d.per_token("nograd_layer", e), d.per_vocab("nograd", e))
        return {**held.resident, **held.gathered, "no-grad forward": n_ref * worst}
    return dict(held.resident)


def _spectra(run: _Run, held: _Held) -> dict[str, float] | None:
    """The null-space keys, eigendecompositions and projectors; None without a null space."""
    if run.ns is None:
        return None
    n_t, f2 = len(run.method.trained_layers), float(run.d.ffn) ** 2
    resident = held.resident
    if run.on_host:  # one key pass per layer, its moment moved to the host when summed
        parts = {**resident}
        if not run.work.spectra_cached:
            parts["one moment (float64)"] = f2 * 8
            per_key = run.d.ffn * (2 * run.e + 8) + run.d.per_token("nograd_layer", run.e)
            parts["keys"] = run.key_tokens * per_key
        return parts
    if run.work.spectra_cached and not run.cpu:  # eigenvectors on the host, projectors built there
        return {**resident, "projectors (float32)": run.projectors}
    build = {"projectors so far": (n_t - 1) * f2 * 4, "projector build (float64)": 24 * f2}
    if run.work.spectra_cached:
        return {**resident, "eigenvectors (float32)": n_t * f2 * 4, **build}
    return {**resident, **_worst_spectra_stage(run, build)}


def _worst_spectra_stage(run: _Run, build: dict[str, float]) -> dict[str, float]:
    """The spectra computed on the device: the key pass, the first eigh or the projector
    build, whichever needs most."""
    d, e, cpu = run.d, run.e, run.cpu
    n_t, f2 = len(run.method.trained_layers), float(d.ffn) ** 2
    keys = {  # summed in place (a CPU adds each product through one shared buffer)
        "moments (float64)": n_t * f2 * 8,
        "keys": run.key_tokens * (d.ffn * (n_t * e + e + 8) + d.per_token("nograd_layer", e)),
        "product buffer (CPU)": f2 * 8 if cpu else 0.0,
    }
    # the first layer's eigh is the worst: each moment is freed once decomposed, and a float32
    # copy of the eigenvectors (half its size) is all that stays
    eigh = {
        "moments (float64)": n_t * f2 * 8,
        "eigh: eigenvectors + workspace (float64)": (3 * f2 + 6 * d.ffn + 1) * 8,
    }
    build = {"eigenvectors (float32)": n_t * f2 * 4, **build}
    return max([keys, eigh, build], key=lambda s: sum(s.values()))


def _diagnostics(run: _Run, held: _Held) -> dict[str, float]:
    """Gradient conflict: a retain backward whose gradients are stashed, then the forget
    backward reduced per parameter in hooks."""
    e, biggest, seq = run.e, run.biggest, run.work.seq
    stash = float(sum(k * b for k, b in run.trained.values()))
    # the retain gradient is summed one sequence at a time
    retain_part = run.activations.training(seq, [run.nll_pass], stash, e * biggest)
    # float64 copies of both, the projection
    reduce = biggest * (16 + (2 * e if run.ns is not None else e))
    if run.on_host:  # the projector streamed: float32 copies of the gradient, the output, a block
        reduce += 8 * biggest + STREAM_ROWS * run.d.ffn * 4
    forget_part = run.activations.training(run.cfg.batch_size * seq, [run.forget_pass], 0.0, reduce)
    worst = max(
        (retain_part, {}),
        (forget_part, {"stashed retain gradients": stash}),
        key=lambda pair: sum(pair[0].values()) + sum(pair[1].values()),
    )
    return {**held.resident, **worst[1], **worst[0]}


def _step(run: _Run, held: _Held) -> dict[str, float]:
    """One training step: forward and backward, or the optimiser's step, whichever needs most."""
    e, biggest = run.e, run.biggest
    passes = [run.forget_pass, run.retain_pass] if run.method.needs_retain else [run.forget_pass]
    grad_tmp = (4 + e) * biggest if held.masters else e * biggest
    train_part = run.activations.training(run.tokens, passes, held.grads, grad_tmp)
    if run.shard:
        train_part = {**held.gathered, **train_part}
        train_part["a layer's unsharded gradients"] = (e + 4) * run.layer_params
    worst = max(train_part, _optimiser_step(run, held), key=lambda s: sum(s.values()))
    return {**held.resident, **held.state_parts, **worst}


def _optimiser_step(run: _Run, held: _Held) -> dict[str, float]:
    """The gradients and the optimiser's temporaries (and the update projector's)."""
    ns, biggest, trained = run.ns, run.biggest, run.trained
    projected = {n for n in trained if n.endswith("down_proj.weight")} if ns else set()
    per_tensor = ns is not None and ns.project_on == "update"  # UpdateProjector.step
    opt_tmp = 0.0
    if held.states and run.cpu:
        opt_tmp = 12.0 * biggest
    elif held.states and per_tensor:  # each projected tensor stepped on its own, then the rest
        rest = sum(k for n, (k, _) in trained.items() if n not in projected)
        opt_tmp = 4.0 * max(biggest, rest)
    elif held.states:
        opt_tmp = held.grads
    parts = {"gradients": held.grads, "optimiser temporaries": opt_tmp}
    if per_tensor and projected:  # one pre-step copy, the change and its projection at a time
        parts["pre-step copy and projection of one tensor"] = 12.0 * biggest + (
            STREAM_ROWS * run.d.ffn * 4 if run.on_host else 0.0
        )
    return parts


def _save(run: _Run, held: _Held) -> dict[str, float]:
    """What the step leaves; the tensors go to the host one at a time."""
    parts = {**held.resident, "gradients": held.grads, **held.state_parts}
    if run.shard:
        parts["one tensor gathered in float32"] = 4 * run.largest_param
    return parts
