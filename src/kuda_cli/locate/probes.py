"""Tracing probes: a prompt, the span of it that the corrupted runs noise, and the target whose
probability is traced. Built from the facts set (subject spans are known), WMDP questions and MUSE
QA rows (the whole question is corrupted), and tokenised once for tracing."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from kuda_cli.data import PROBE_SPLIT
from kuda_cli.data.facts import Probe, load_facts, select_domains
from kuda_cli.data.facts import probes as fact_probes
from kuda_cli.data.questions import answer_index as parse_answer
from kuda_cli.data.sources import load_split
from kuda_cli.errors import UserError

QA_PREFIX = "Question: "
QA_SUFFIX = "\nAnswer:"
SPANS = ("subject", "prompt")


@dataclass(frozen=True)
class TraceProbe:
    prompt: str
    target: str  # the continuation after the prompt, leading space included (" H")
    span: tuple[int, int]  # characters of `prompt` whose tokens are corrupted
    id: str = ""


@dataclass(frozen=True)
class EncodedProbe:
    probe: TraceProbe
    input_ids: tuple[int, ...]
    span: tuple[int, int]  # token positions [start, end) that are corrupted
    target_id: int  # the first token of the target
    tokens: tuple[str, ...]  # decoded tokens, for plots

    @property
    def last_subject(self) -> int:
        return self.span[1] - 1


def _check_span(span: str) -> None:
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, not {span!r}")


def from_facts(probes: Iterable[Probe], span: str = "subject") -> list[TraceProbe]:
    """One probe per prompt of a fact: the fact's prompt, " " + its target (as the facts
    evaluation scores it), the subject corrupted (`span="subject"`) or the whole prompt."""
    _check_span(span)
    out = []
    for p in probes:
        chars = p.subject_span if span == "subject" else (0, len(p.text))
        out.append(TraceProbe(p.text, " " + p.fact.target, chars, f"{p.fact.id}#{p.index}"))
    return out


def qa_probe(question: str, answer: str, probe_id: str) -> TraceProbe:
    """ "Question: <question>\\nAnswer:" then " <answer>"; the question text is corrupted (no
    subject is known for a free-form question)."""
    question, answer = question.strip(), str(answer).strip()
    start = len(QA_PREFIX)
    prompt = f"{QA_PREFIX}{question}{QA_SUFFIX}"
    return TraceProbe(prompt, " " + answer, (start, start + len(question)), probe_id)


def answer_index(value: Any, choices: Sequence[str], where: str) -> int:
    """A WMDP answer as an index into `choices`: an int, a digit string or a letter A-D."""
    index = parse_answer(value, len(choices))
    if index is None:
        raise UserError(f"{where}: answer {value!r} is not an index of its {len(choices)} choices")
    return index


def from_wmdp(rows: Iterable[dict[str, Any]], where: str = "questions") -> list[TraceProbe]:
    """WMDP rows (question, choices, answer): the question, then the correct choice's text."""
    out = []
    for i, row in enumerate(rows):
        choices = list(row["choices"])
        answer = choices[answer_index(row["answer"], choices, f"{where} row {i}")]
        out.append(qa_probe(row["question"], answer, f"q{i}"))
    return out


def from_qa(rows: Iterable[dict[str, Any]]) -> list[TraceProbe]:
    """MUSE KnowMem rows (question, answer)."""
    return [qa_probe(row["question"], row["answer"], f"q{i}") for i, row in enumerate(rows)]


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


def encode(tokenizer, probe: TraceProbe) -> EncodedProbe:
    """Token ids, the corrupted token span and the target's first token.

    The target is tokenised on its own as a continuation (without special tokens), as the facts
    evaluation scores options; a leading whitespace-only token (SentencePiece's lone "▁") is
    skipped so that the traced token carries the answer."""
    ids, start, end = _token_span(tokenizer, probe.prompt, probe.span)
    target_ids = tokenizer(probe.target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise UserError(f"probe {probe.id or probe.prompt!r} has an empty target")
    if len(target_ids) > 1 and not tokenizer.decode(target_ids[:1]).strip():
        target_ids = target_ids[1:]
    tokens = tuple(tokenizer.decode([i]) for i in ids)
    return EncodedProbe(probe, tuple(ids), (start, end), int(target_ids[0]), tokens)


def build_probes(cfg) -> list[TraceProbe]:
    """Tracing probes from the data group: the forget facts' prompts (subject corrupted), WMDP
    questions or MUSE forget QA (question corrupted)."""
    data = cfg.data
    if data.kind == "facts":
        forget = select_domains(load_facts(data.path), list(data.forget_domains), "forget")
        return from_facts(fact_probes(forget), cfg.locate.span)
    name = PROBE_SPLIT.get(data.kind)
    if data.kind == "corpus":
        fields = ("question", "choices", "answer")
        rows = load_split(OmegaConf.to_object(data[name]), f"data.{name}", fields)
        return from_wmdp(rows, f"data.{name}")
    if data.kind == "muse":
        split = OmegaConf.to_object(data[name])
        return from_qa(load_split(split, f"data.{name}", ("question", "answer")))
    raise UserError(f"data={data.name} (kind {data.kind}) has no probes for tracing")
