"""Tracing probes (kuda_cli.data.probes: a prompt, its corrupted span, the target) drawn and
tokenised once for tracing (at most `locate.max_tokens` prompt tokens), from the data kind's own
probes: the forget facts' prompts, question rows held apart from the evaluation, or cloze probes
from the trained forget passages. Never from the evaluation questions (data.questions,
data.knowmem_forget): layers chosen on them would be chosen on the test set."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from kuda_cli.data.kinds import kind_of
from kuda_cli.data.probes import TraceProbe
from kuda_cli.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedProbe:
    probe: TraceProbe
    input_ids: tuple[int, ...]
    span: tuple[int, int]  # token positions [start, end) that are corrupted
    target_id: int  # the first token of the target
    tokens: tuple[str, ...]  # decoded tokens, for plots
    truncated: int = 0  # prompt tokens dropped from the start (locate.max_tokens)

    @property
    def last_subject(self) -> int:
        return self.span[1] - 1


def choose(probes: Sequence[TraceProbe], max_probes: int | None, seed: int) -> list[TraceProbe]:
    """At most `max_probes` probes, drawn with `seed` and kept in their original order."""
    if max_probes is None or len(probes) <= max_probes:
        return list(probes)
    picked = sorted(random.Random(seed).sample(range(len(probes)), max_probes))
    return [probes[i] for i in picked]


def _token_span(tokenizer, prompt: str, chars: tuple[int, int]) -> tuple[list[int], int, int]:
    """The prompt's ids (special tokens as the tokenizer adds them) and the tokens that overlap
    the character span."""
    a, b = chars
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True)
    except NotImplementedError:
        # Slow tokenizers have no offsets: count the tokens of the text before and up to the
        # span end (leading special tokens count in both, as in the prompt's ids).
        ids = tokenizer(prompt)["input_ids"]
        start, end = (len(tokenizer(prompt[:c])["input_ids"]) for c in (a, b))
        return ids, start, max(end, start + 1)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and e > a and s < b]
    if not inside:
        raise UserError(f"no token of {prompt!r} covers characters {a}..{b}")
    return ids, inside[0], inside[-1] + 1


def left_truncate(
    ids: list[int], span: tuple[int, int], max_tokens: int | None, lead: int = 0
) -> tuple[list[int], tuple[int, int], int]:
    """(ids, span, dropped): at most `max_tokens` ids, the `lead` leading special tokens (BOS)
    kept and the others dropped from the start, so that the end of the prompt (next to the
    target) stays; the span is shifted with them and clipped to what is kept, or, when it is cut
    entirely, becomes every kept prompt token."""
    drop = len(ids) - max_tokens if max_tokens is not None else 0
    if drop <= 0:
        return ids, span, 0
    lead = min(lead, max_tokens - 1)
    first = lead + drop  # the first position kept after the leading special tokens
    start, end = span
    kept = (max(start, first) - drop, end - drop) if end > first else (lead, max_tokens)
    return ids[:lead] + ids[first:], kept, drop


def _leading_special(tokenizer, ids: Sequence[int]) -> int:
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    lead = 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    return lead


def encode(tokenizer, probe: TraceProbe, max_tokens: int | None = None) -> EncodedProbe:
    """Token ids, the corrupted token span and the target's first token.

    The target is tokenised on its own as a continuation (without special tokens), as the facts
    evaluation scores options; a leading whitespace-only token (SentencePiece's lone "▁") is
    skipped so that the traced token carries the answer. A prompt longer than `max_tokens`
    tokens is cut from its start (`left_truncate`)."""
    ids, start, end = _token_span(tokenizer, probe.prompt, probe.span)
    lead = _leading_special(tokenizer, ids)
    ids, (start, end), dropped = left_truncate(ids, (start, end), max_tokens, lead)
    target_ids = tokenizer(probe.target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise UserError(f"probe {probe.id or probe.prompt!r} has an empty target")
    if len(target_ids) > 1 and not tokenizer.decode(target_ids[:1]).strip():
        target_ids = target_ids[1:]
    tokens = tuple(tokenizer.decode([i]) for i in ids)
    return EncodedProbe(probe, tuple(ids), (start, end), int(target_ids[0]), tokens, dropped)


def probe_source(cfg) -> str:
    """Where build_probes takes the probes from, for layers.json and the log."""
    return kind_of(cfg.data).probe_origin(cfg.data)


def build_probes(cfg) -> list[TraceProbe]:
    """Tracing probes from the data group's kind (the forget facts' prompts, the question rows of
    data.probes, cloze probes from the forget corpus), never the evaluation questions."""
    return kind_of(cfg.data).probes(cfg.data, cfg.locate.span, cfg.locate.max_probes)
