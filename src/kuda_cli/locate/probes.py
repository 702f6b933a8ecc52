"""Tracing probes: a prompt, the span of it that the corrupted runs noise, and the target whose
probability is traced, tokenised once for tracing (at most `locate.max_tokens` prompt tokens).

Built from the forget facts' prompts (the subject is corrupted); for corpus and MUSE data from
`data.probes`, question rows held apart from the evaluation (the question is corrupted), or, when
that is unset, cloze probes from the forget corpus: a window of a trained forget passage, the
next content word as the target, the whole window corrupted. Never from the evaluation questions
(data.questions, data.knowmem_forget): layers chosen on them would be chosen on the test set."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kuda_cli.data.fact_set import Probe
from kuda_cli.data.kinds import kind_of
from kuda_cli.data.questions import answer_index as parse_answer
from kuda_cli.errors import UserError

log = logging.getLogger(__name__)
QA_PREFIX = "Question: "
QA_SUFFIX = "\nAnswer:"
SPANS = ("subject", "prompt")
# forget-corpus (cloze) probes: words of passage before the target (about 40-50 tokens), how far
# past them a content word is looked for, and the least number of candidates drawn from
CLOZE_WORDS = 32
CLOZE_LOOKAHEAD = 16
CLOZE_POOL = 256
# words too common to say what a passage knows (the rest of them have under four letters)
STOPWORDS = frozenset(
    "also been both could each from have into more most only other over should some such than "
    "that their them then there these they this those very were what when where which while "
    "will with would about after again being between during under because".split()
)
_WORD = re.compile(r"\S+")


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
    truncated: int = 0  # prompt tokens dropped from the start (locate.max_tokens)

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


def from_questions(rows: Sequence[dict[str, Any]], where: str) -> list[TraceProbe]:
    """Question rows: multiple choice (question, choices, answer: an index into them) where
    they have choices, else free-form (question, answer: the text)."""
    if rows and "choices" in rows[0]:
        return from_wmdp(rows, where)
    return from_qa(rows)


def _content_word(word: str) -> str | None:
    """The word without its trailing punctuation when it says something: it starts with a
    letter, has at least four letters (hyphens aside) and is no stop word."""
    core = word.rstrip(".,;:!?)]}'\"\u201d\u2019")
    letters = core.replace("-", "")
    if len(letters) >= 4 and letters.isalpha() and core[0].isalpha():
        return core if core.lower() not in STOPWORDS else None
    return None


def cloze_probes(
    texts: Sequence[str], per_passage: int = 1, words: int = CLOZE_WORDS
) -> list[TraceProbe]:
    """Cloze probes from passages: up to `per_passage` windows spread evenly through each
    passage (the first at its start), each `words` words long and ending before a content word
    (looked for in the next CLOZE_LOOKAHEAD words), which is the target (" word"); the whole
    window is corrupted. A passage shorter than one window gives none."""
    out, seen = [], set()
    for i, text in enumerate(texts):
        for j in range(per_passage):
            at = j * len(text) // per_passage
            found = []
            for m in _WORD.finditer(text, at):
                if m.start() == at and at > 0 and not text[at - 1].isspace():
                    continue  # the rest of a word cut by the window's start
                found.append(m)
                if len(found) == words + CLOZE_LOOKAHEAD:
                    break
            if len(found) <= words or (i, found[0].start()) in seen:
                continue
            seen.add((i, found[0].start()))
            for k in range(words, len(found)):
                target = _content_word(found[k].group())
                if target:
                    prompt = text[found[0].start() : found[k - 1].end()]
                    out.append(
                        TraceProbe(
                            prompt, " " + target, (0, len(prompt)), f"p{i}@{found[0].start()}"
                        )
                    )
                    break
    return out


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
