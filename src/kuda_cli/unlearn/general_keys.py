"""General text for KUDA's null-space keys (`unlearn.nullspace.key_source=general` or
`retain+general`): where it comes from, how much of it, and what is held out of it.

`unlearn.nullspace.general.source`:

- `self`: text the starting model writes itself, continuing varied openings (PROMPTS) by seeded
  sampling; needs no data, works offline for any model. Written once per (model, settings) into
  the cache (`general_text/`), batch after batch, so a larger budget extends the file;
- `hub`: a dataset through `datasets.load_dataset` (wikitext-103 train by default), read row by
  row until the budget is met;
- `path`: a local JSONL, JSON, parquet or txt file, or a directory of them.

The budget (`tokens`) counts keys, i.e. tokens after truncation at `unlearn.max_length`; unset it
is 7 keys per `down_proj` input dimension: AlphaEdit's ~100,000 tokens at d_ff 14336 (a 7B
Llama/Mistral), ~10,700 for SmolLM2-135M. The TUNER_TEXTS texts after those the keys use are
held out for unlearn.auto_tune's stability figure: it reads text of the same kind that the keys
did not see. Any text equal (after stripping white space) to one of the evaluation's texts (the
perplexity set) is dropped first: the evaluation never scores text the projector protected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from kuda_cli.cache import shared_temp_file
from kuda_cli.config import bounded, choice
from kuda_cli.data.texts import hub_dataset, read_records, refuse_blank_file, texts_of
from kuda_cli.errors import ConfigError, UserError
from kuda_cli.evaluate.scoring import _eval_mode, _padding
from kuda_cli.hub import HubSource
from kuda_cli.unlearn.batches import TokenSet, tokenize
from kuda_cli.unlearn.key_moments import KeySet

log = logging.getLogger(__name__)
KEYS_PER_DIM = 7  # AlphaEdit's 100,000 general-text keys at d_ff 14336
TUNER_TEXTS = 32  # texts after the keys' held out for auto_tune's stability figure
SELF_DIR = "general_text"
PROMPTS = (
    "The history of the city begins",
    "In 1887, a young engineer named",
    "Photosynthesis is the process by which",
    "Here is a simple recipe for",
    "The rules of the game are",
    "When the storm reached the coast,",
    "A good night's sleep matters because",
    "The committee met on Tuesday to discuss",
    "In mathematics, a prime number is",
    "She opened the letter and read:",
    "The museum's new exhibition features",
    "To install the software, first",
    "The river flows north through",
    "Many people believe that music",
    "The company reported that its profits",
    "Once upon a time, in a village",
    "The following guide explains how to",
    "During the winter months, farmers",
    "The novel tells the story of",
    "Scientists have recently discovered that",
    "The train left the station at",
    "My favourite thing about weekends is",
    "The law was passed in order to",
    "In the kitchen, the smell of",
    "The football match ended with",
    "Volcanoes form when",
    "Dear customer, we are writing to",
    "The most important lesson I learned",
    "Ancient Rome was governed by",
    "The weather forecast for tomorrow",
    "A computer program is a list of",
    "The village festival takes place every",
)


@dataclass
class GeneralTextConfig:
    """unlearn.nullspace.general: the general text of the keys (module docstring)."""

    # `self` (the starting model's own text, sampled from varied openings; cached), `hub` (a
    # dataset through datasets.load_dataset), `path` (a local JSONL/JSON/parquet/txt file)
    source: str = choice("self", "self", "hub", "path")
    # general-text keys (tokens after truncation at unlearn.max_length); None: 7 x the down_proj
    # input width (AlphaEdit's ~100k at d_ff 14336, ~10.7k at SmolLM2-135M's 1536)
    tokens: int | None = bounded(None, ge=1)
    # retain+general: general text's share of the combined key moment, each set's moment being
    # a per-token mean; 0.5 weighs the two sets alike, whatever their token counts (pooling
    # every key once would give ~100k general keys 95% of the weight against a few thousand
    # retain keys: set share to n_general / (n_general + n_retain) for that)
    share: float = bounded(0.5, gt=0, lt=1)
    new_tokens: int = bounded(128, ge=1)  # self: tokens sampled after each opening
    temperature: float = bounded(1.0, gt=0)  # self: sampling temperature
    top_p: float = bounded(0.95, gt=0, le=1)  # self: nucleus sampling's probability mass
    seed: int = bounded(0, ge=0)  # self: the sampling seed (one text set per seed and model)
    batch_size: int = bounded(16, ge=1)  # self: openings continued at once
    hub_id: str = "wikitext"  # hub: the dataset id
    hub_config: str | None = "wikitext-103-raw-v1"  # hub: the dataset's config
    split: str = "train"  # hub: the split read, row by row until the budget is met
    path: str | None = None  # path: a JSONL/JSON/parquet/txt file or a directory of them
    text_field: str = "text"  # hub and path: the records' text field


@dataclass(frozen=True)
class GeneralTexts:
    keys: list[str]  # the texts whose down_proj inputs enter the key moment
    heldout: list[str]  # the next TUNER_TEXTS texts: auto_tune's stability figure
    label: str  # the source and its settings, as the spectra cache key reads them


def uses_general(ns) -> bool:
    return bool(ns.enabled) and "general" in ns.key_source.split("+")


def source_label(general: GeneralTextConfig) -> str:
    """The settings that decide the texts of `general`'s source (JSON)."""
    wanted = {
        "self": ("new_tokens", "temperature", "top_p", "seed", "batch_size"),
        "hub": ("hub_id", "hub_config", "split", "text_field"),
        "path": ("path", "text_field"),
    }[general.source]
    settings = asdict(general)
    return json.dumps({"source": general.source, **{k: settings[k] for k in wanted}})


def key_budget(general: GeneralTextConfig, d_ff: int) -> int:
    return general.tokens or KEYS_PER_DIM * d_ff


def general_texts(ctx, general: GeneralTextConfig, budget: int) -> GeneralTexts:
    """Texts of `general`'s source, the evaluation's texts dropped, until their keys (tokens at
    unlearn.max_length) reach `budget`, then TUNER_TEXTS more held out."""
    excluded = {t.strip() for t in (ctx.eval_texts() if ctx.eval_texts else [])}
    tokenizer, max_length = ctx.tokenizer, ctx.cfg.max_length
    keys: list[str] = []
    heldout: list[str] = []
    count, dropped = 0, 0
    writer = SelfWriter(ctx, general) if general.source == "self" else None
    stream = writer.texts() if writer else _read_texts(general)
    for text in stream:
        if text.strip() in excluded:
            dropped += 1
            continue
        if count < budget:
            keys.append(text)
            count += len(tokenizer(text, truncation=True, max_length=max_length).input_ids)
        else:
            heldout.append(text)
        if len(heldout) >= TUNER_TEXTS:
            break
    if writer:
        writer.save()
    if dropped:
        log.warning("general keys: %d text(s) equal to the evaluation's texts left out", dropped)
    if not keys:
        raise UserError(
            f"unlearn.nullspace.general ({general.source}) has no text apart from the "
            "evaluation's; name another source with unlearn.nullspace.general.source"
        )
    if count < budget:
        log.warning(
            "general keys: %d tokens of the %d asked for (the source ran out)", count, budget
        )
    return GeneralTexts(keys, heldout, source_label(general))


def key_dims(ctx, layer: int) -> int:
    """d_ff: the width of a down_proj input."""
    return int(ctx.adapter.down_proj_weight(ctx.model, layer).shape[1])


def key_sets(ctx, ns, layer: int) -> list[KeySet]:
    """The key sets of `unlearn.nullspace` (`key_source`), for a method context `ctx`; the budget
    of general keys from the width of `layer`'s down_proj input."""
    retain = KeySet("retain", TokenSet(ctx.retain.ids[: ns.samples], ctx.retain.pad_id))
    if not uses_general(ns):
        return [retain]
    texts = general_texts(ctx, ns.general, key_budget(ns.general, key_dims(ctx, layer)))
    tokens = tokenize(ctx.tokenizer, texts.keys, ctx.cfg.max_length, "general keys")
    if ns.key_source == "general":
        return [KeySet("general", tokens, 1.0, texts.label)]
    share = ns.general.share
    return [replace(retain, share=1 - share), KeySet("general", tokens, share, texts.label)]


def _read_texts(general: GeneralTextConfig) -> Iterator[str]:
    if general.source == "path":
        records = read_records(general.path)
        yield from texts_of(records, general.text_field, str(general.path))
        return
    dataset = hub_dataset(general.hub_id, general.hub_config, general.split)
    if general.text_field not in dataset.column_names:
        raise UserError(
            f"unlearn.nullspace.general: {general.hub_id} has no field {general.text_field!r} "
            f"(fields: {', '.join(dataset.column_names)}); set unlearn.nullspace.general.text_field"
        )
    for row in dataset:
        text = row[general.text_field]
        if isinstance(text, str) and text.strip():
            yield text


class SelfWriter:
    """The starting model's own text: cached batches first, then new ones (appended)."""

    def __init__(self, ctx, general: GeneralTextConfig):
        self.ctx, self.general = ctx, general
        self.path = self_text_path(ctx.cache_dir, ctx.model_key, general)
        self.cached: list[str] = []
        if self.path is not None and self.path.is_file():
            self.cached = [json.loads(line)["text"] for line in self.path.read_text().splitlines()]
        self.written = len(self.cached)

    def texts(self) -> Iterator[str]:
        yield from self.cached
        batch = len(self.cached) // self.general.batch_size
        while True:
            new = sampled_texts(self.ctx.model, self.ctx.tokenizer, self.general, batch)
            self.cached += new
            yield from new
            batch += 1

    def save(self) -> None:
        """The texts, when more than the cache held, written beside it and renamed into place:
        concurrent runs read the old file or the new one."""
        if self.path is None or len(self.cached) <= self.written:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = shared_temp_file(self.path)
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in self.cached)
        os.replace(tmp, self.path)


def self_text_path(cache_dir, model_key: str, general: GeneralTextConfig) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(f"{model_key}|{source_label(general)}".encode()).hexdigest()[:24]
    return Path(cache_dir) / SELF_DIR / f"{key}.jsonl"


@torch.no_grad()
def sampled_texts(model, tokenizer, general: GeneralTextConfig, batch: int) -> list[str]:
    """Batch `batch` of the model's own text: PROMPTS in turn, each continued by sampling
    seeded by (seed, batch); the opening kept in the text."""
    size = general.batch_size
    prompts = [PROMPTS[(batch * size + j) % len(PROMPTS)] for j in range(size)]
    device = next(model.parameters()).device
    torch.manual_seed(general.seed * 1_000_003 + batch)
    with _eval_mode(model), _padding(tokenizer, "left"):
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        generated = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=general.new_tokens,
            do_sample=True,
            temperature=general.temperature,
            top_p=general.top_p,
            top_k=0,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = tokenizer.batch_decode(generated[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return [prompt + text for prompt, text in zip(prompts, new, strict=True)]


def check_general(cfg: DictConfig) -> None:
    """Before any work: a local source exists and holds something."""
    ns = cfg.unlearn.nullspace
    general = ns.general
    if not uses_general(ns) or general.source != "path":
        return
    if not general.path:
        raise ConfigError(
            "unlearn.nullspace.general.source=path needs unlearn.nullspace.general.path=FILE"
        )
    if not Path(str(general.path)).expanduser().exists():
        raise ConfigError(
            f"unlearn.nullspace.general.path={general.path} does not exist; pass a JSONL, JSON, "
            "parquet or txt file (or a directory of them), or "
            "unlearn.nullspace.general.source=self"
        )
    refuse_blank_file("unlearn.nullspace.general.path", str(general.path))


def general_hub_sources(cfg: DictConfig) -> list[HubSource]:
    ns = cfg.unlearn.nullspace
    if not uses_general(ns) or ns.general.source != "hub":
        return []
    local = "unlearn.nullspace.general.source=path unlearn.nullspace.general.path=FILE"
    return [HubSource("unlearn.nullspace.general", ns.general.hub_id, local)]
