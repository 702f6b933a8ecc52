"""Predicted peak device memory of each phase of `kuda unlearn`, from tensor shapes alone.

The model is built on `torch.device("meta")` (no memory), the trained parameters come from the
method itself (`trainable_parameters`, or the LoRA adapters `lora.attach` would add), and each
phase adds up what the trainer keeps on the device at its worst moment:

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
model and run their share of the batch; full-parameter ones (`trainable=[all]`) are sharded with
FSDP2: 16 bytes per parameter / N, plus the all-gathered root and two layers in the model dtype,
plus one layer's unsharded gradients in backward; activation checkpointing off. Nothing here
allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kuda_cli.unlearn.nullspace import STREAM_ROWS

GIB = 2**30
GPU_BYTES = 80 * 10**9  # an 80 GB GPU
PHASES = ("load", "originals", "spectra", "diagnostics", "step", "save")
RECORD_BATCH = 8  # sequences per forward in record_sites and key_moments

# Activation bytes per token of transformers' Llama/Mistral decoder layers (sdpa attention), as
# (x d_ff, x hidden) in bf16, x e/2 for other element sizes; measured with the CPU check's
# allocator trace on bf16 models of several widths (torch 2.13, transformers 5; docs/scale.md).
PER_TOKEN = {
    "trained_layer": (8, 23),  # every weight trains: their inputs are kept too
    "frozen_layer": (6, 13.2),  # frozen weights, the gradient flows through (gate, act, up, ...)
    "down_input": (2, 0),  # the down_proj input, kept where down_proj trains
    "nograd_layer": (6, 9),  # the largest live set inside a layer without autograd
    "forward_tmp": (0, 20),  # float32 temporaries of the norms and the losses
    "backward_tmp": (4, 6),  # gradient buffers inside a layer's backward
    "backward_fp32": (0, 16),  # ... and of a float32 loss on hidden states
}
# x vocab: the log-softmax kept for backward, the forward's and backward's temporaries at the
# logits (their float copy, the gradient), and a no-grad forward's peak there (reference log-p)
PER_TOKEN_VOCAB = {"log_softmax": 4, "forward_tmp": 6, "backward_tmp": 8, "nograd": 10}


@dataclass(frozen=True)
class Dims:
    hidden: int
    ffn: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.vocab_size,
        )

    def per_token(self, key: str, e: int) -> float:
        ffn, hidden = PER_TOKEN[key]
        return (ffn * self.ffn + hidden * self.hidden) * e / 2

    def per_site(self, site_bytes: int, e: int) -> float:
        """Per token: what a loss keeps at one hidden-state site (`Method.LossReach`)."""
        return site_bytes * self.hidden * e / 2

    def per_vocab(self, key: str, e: int) -> float:
        return PER_TOKEN_VOCAB[key] * self.vocab * e / 2


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
    shard: bool | None = None  # FSDP2; None: as unlearn.shard decides (auto: trainable=[all])


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
        if layers is None or _layer_of(name, adapter) in layers:
            out[name] = spec.r * (module.in_features + module.out_features)
    return out


def _layer_of(name: str, adapter) -> int | None:
    prefix = adapter.layers + "."
    return int(name[len(prefix) :].split(".", 1)[0]) if name.startswith(prefix) else None


def plan(cfg, model: nn.Module, adapter, layers: list[int], work: Workload) -> Plan:
    """Every phase's predicted peak for `cfg` (a method's config dataclass) on `model` (meta or
    real: only shapes are read), training `layers` where the method trains located ones."""
    from kuda_cli.unlearn.methods import Method

    method = method_for(cfg, model, adapter, layers)
    d = Dims.of(model.config)
    params = list(model.parameters())
    e = params[0].element_size()
    n_params = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    full = "all" in cfg.trainable
    shard = work.shard
    if shard is None:
        shard = cfg.shard == "fsdp" or (cfg.shard == "auto" and work.gpus > 1 and full)
    if cfg.lora.enabled:
        sizes = lora_shapes(model, adapter, cfg, None if full else method.trained_layers)
        weights += sum(sizes.values()) * e
        trained = {n: (k, e) for n, k in sizes.items()}
    else:
        chosen = method.trainable_parameters()
        trained = {n: (p.numel(), p.element_size()) for n, p in chosen.items()}
    n_trained = sum(k for k, _ in trained.values())
    biggest = max(k for k, _ in trained.values())
    cpu, gpus = work.device == "cpu", work.gpus
    tokens = math.ceil(work.batch / gpus) * work.seq
    mode = f"FSDP2 x{gpus}" if shard else f"{gpus} GPU" + ("s" if gpus > 1 else "")
    if cfg.lora.enabled:
        mode = f"LoRA r={cfg.lora.r}, {mode}"
    out = Plan(cfg.method, mode, weights, n_params * 2, n_trained, target=method.memory_target)

    # the layers autograd runs through, and what each keeps
    by_layer: dict[int | None, list[str]] = {}
    for name in trained:
        by_layer.setdefault(_layer_of(name, adapter), []).append(name)
    first = 0 if None in by_layer else min(by_layer)

    def kept(i: int) -> float:
        names = by_layer.get(i, [])
        down = adapter.module_name("down_proj", i) + "."
        only_down = bool(names) and all(n.startswith(down) for n in names)
        if full or (names and not only_down):
            return d.per_token("trained_layer", e)
        if i == first:
            return d.per_token("down_input", e)
        return d.per_token("frozen_layer", e) + (d.per_token("down_input", e) if names else 0)

    def one_pass(reach: Method.LossReach) -> dict[str, float]:
        """Per token: what a training forward to layer `reach.last_layer` keeps, and its
        temporaries."""
        keep = sum(kept(i) for i in range(first, reach.last_layer + 1))
        fwd, bwd = d.per_token("forward_tmp", e), d.per_token("backward_tmp", e)
        if reach.sites:
            keep += reach.sites * d.per_site(reach.site_bytes, e)
            bwd = max(bwd, d.per_token("backward_fp32", e))
        if reach.logits:
            keep += d.per_vocab("log_softmax", e)
            fwd = max(fwd, d.per_vocab("forward_tmp", e))
            bwd = max(bwd, d.per_vocab("backward_tmp", e))
        return {"kept": keep, "fwd": fwd, "bwd": bwd}

    forget_pass = one_pass(method.forget_reach(d.layers))
    retain_pass = one_pass(method.retain_reach(d.layers))
    # the gradient-conflict diagnostic's retain NLL: every layer, the logits
    model_nll = one_pass(Method.LossReach(d.layers - 1, logits=True))

    def training(n_tok: int, passes: list[dict], grads: float, grad_tmp: float) -> dict:
        """The worst moment of forward + backward: the forward's end, the backward's start, or
        its end (all gradients, the activations gone)."""
        act = n_tok * sum(p["kept"] for p in passes)
        fwd = act + n_tok * max(p["fwd"] for p in passes)
        bwd = act + max(n_tok * max(p["bwd"] for p in passes), grad_tmp)
        end = grads + e * biggest
        worst = max(fwd, bwd, end)
        if worst == end:
            return {
                "gradients (backward's end)": grads,
                "a gradient in the model dtype": e * biggest,
            }
        return {"activations": act, "temporaries": worst - act}

    # ------------------------------------------------------------------ load
    layer_params = sum(p.numel() for p in adapter.module(model, "layer", 0).parameters())
    root_params = n_params - d.layers * layer_params
    out.phases["load"] = {"weights": weights}
    if shard:
        out.phases["load"]["one layer in float32 while sharding"] = 2 * layer_params
        resident = {"float32 parameter shards": 4 * n_params / gpus}
        gathered = {"all-gathered root and two layers": e * (root_params + 2 * layer_params)}
        masters, grad_bytes = 0.0, 4 * n_params / gpus
    else:
        resident, gathered = {"weights": weights}, {}
        masters = 4.0 * n_trained if cfg.master_weights and e < 4 else 0.0
        grad_bytes = 4.0 * n_trained if masters else sum(k * b for k, b in trained.values())
    state_bytes = 2 * grad_bytes if cfg.optimizer == "adamw" else 0.0
    ns = method.nullspace_settings
    # nullspace.device: `auto` keeps moments, spectra and projectors on the host for a GPU model
    on_host = ns is not None and not cpu and ns.device in ("auto", "host")

    # ------------------------------------------------------------------ originals
    store = 0.0
    if method.recorded_sites:
        items = RECORD_BATCH if work.stored_items is None else work.stored_items
        n_rec = min(RECORD_BATCH, max(items, 1)) * work.seq
        sites = method.recorded_sites * d.hidden * e
        store = items * work.seq * sites  # on the host
        parts = {**resident, "no-grad forward": n_rec * d.per_token("nograd_layer", e)}
        # on the CPU the stored rows are views of the recorded batch
        parts["stored originals (host)" if cpu else "recorded sites"] = (
            store if cpu else n_rec * sites
        )
        out.phases["originals"] = parts
    elif method.precomputes_reference:
        n_ref = cfg.batch_size * work.seq
        worst = max(d.per_token("nograd_layer", e), d.per_vocab("nograd", e))
        out.phases["originals"] = {**resident, **gathered, "no-grad forward": n_ref * worst}
    else:
        out.phases["originals"] = dict(resident)
    if cpu and store:
        resident["stored originals (host)"] = store

    # ------------------------------------------------------------------ spectra
    projectors = 0.0
    out.phases["spectra"] = None
    if ns is not None:
        n_t, f2 = len(method.trained_layers), float(d.ffn) ** 2
        projectors = n_t * f2 * 4
        build = {"projectors so far": (n_t - 1) * f2 * 4, "projector build (float64)": 24 * f2}
        if on_host:  # one key pass per layer, its moment moved to the host when summed
            projectors = 0.0
            samples = ns.samples if work.key_samples is None else work.key_samples
            n_key = min(RECORD_BATCH, samples) * work.seq
            out.phases["spectra"] = {**resident}
            if not work.spectra_cached:
                out.phases["spectra"]["one moment (float64)"] = f2 * 8
                out.phases["spectra"]["keys"] = n_key * (
                    d.ffn * (2 * e + 8) + d.per_token("nograd_layer", e)
                )
        elif work.spectra_cached and not cpu:  # eigenvectors on the host, projectors built there
            out.phases["spectra"] = {**resident, "projectors (float32)": projectors}
        elif work.spectra_cached:
            out.phases["spectra"] = {**resident, "eigenvectors (float32)": n_t * f2 * 4, **build}
        else:
            samples = ns.samples if work.key_samples is None else work.key_samples
            n_key = min(RECORD_BATCH, samples) * work.seq
            keys = {  # summed in place (a CPU adds each product through one shared buffer)
                "moments (float64)": n_t * f2 * 8,
                "keys": n_key * (d.ffn * (n_t * e + e + 8) + d.per_token("nograd_layer", e)),
                "product buffer (CPU)": f2 * 8 if cpu else 0.0,
            }
            # the first layer's eigh is the worst: each moment is freed once decomposed, and a
            # float32 copy of the eigenvectors (half its size) is all that stays
            eigh = {
                "moments (float64)": n_t * f2 * 8,
                "eigh: eigenvectors + workspace (float64)": (3 * f2 + 6 * d.ffn + 1) * 8,
            }
            build = {"eigenvectors (float32)": n_t * f2 * 4, **build}
            stages = [keys, eigh, build]
            out.phases["spectra"] = {**resident, **max(stages, key=lambda s: sum(s.values()))}
    if masters:
        resident["float32 masters"] = masters
    if projectors:
        resident["projectors (float32)"] = projectors

    # ------------------------------------------------------------------ diagnostics
    out.phases["diagnostics"] = None  # skipped on sharded parameters
    if not shard:
        n_diag = cfg.batch_size * work.seq
        stash = float(sum(k * b for k, b in trained.values()))
        # the retain gradient is summed one sequence at a time
        retain_part = training(work.seq, [model_nll], stash, e * biggest)
        reduce = biggest * (16 + (2 * e if ns else e))  # float64 copies of both, the projection
        if on_host:  # the projector streamed: float32 copies of the gradient, the output, a block
            reduce += 8 * biggest + STREAM_ROWS * d.ffn * 4
        forget_part = training(n_diag, [forget_pass], 0.0, reduce)
        worst = max(
            (retain_part, {}),
            (forget_part, {"stashed retain gradients": stash}),
            key=lambda pair: sum(pair[0].values()) + sum(pair[1].values()),
        )
        out.phases["diagnostics"] = {**resident, **worst[1], **worst[0]}

    # ------------------------------------------------------------------ step
    passes = [forget_pass, retain_pass] if method.needs_retain else [forget_pass]
    grad_tmp = (4 + e) * biggest if masters else e * biggest
    train_part = training(tokens, passes, grad_bytes, grad_tmp)
    if shard:
        train_part = {**gathered, **train_part}
        train_part["a layer's unsharded gradients"] = (e + 4) * layer_params
    states = {"AdamW states": state_bytes} if state_bytes else {}
    projected = {n for n in trained if n.endswith("down_proj.weight")} if ns else set()
    per_tensor = ns is not None and ns.project_on == "update"  # UpdateProjector.step
    opt_tmp = 0.0
    if state_bytes and cpu:
        opt_tmp = 12.0 * biggest
    elif state_bytes and per_tensor:  # each projected tensor stepped on its own, then the rest
        rest = sum(k for n, (k, _) in trained.items() if n not in projected)
        opt_tmp = 4.0 * max(biggest, rest)
    elif state_bytes:
        opt_tmp = grad_bytes
    opt_part = {"gradients": grad_bytes, "optimiser temporaries": opt_tmp}
    if per_tensor and projected:  # one pre-step copy, the change and its projection at a time
        opt_part["pre-step copy and projection of one tensor"] = 12.0 * biggest + (
            STREAM_ROWS * d.ffn * 4 if on_host else 0.0
        )
    worst = max(train_part, opt_part, key=lambda s: sum(s.values()))
    out.phases["step"] = {**resident, **states, **worst}

    # ------------------------------------------------------------------ save
    out.phases["save"] = {**resident, "gradients": grad_bytes, **states}
    if shard:
        out.phases["save"]["one tensor gathered in float32"] = 4 * max(p.numel() for p in params)
    return out
