"""Tracing probes as data: a prompt, the span of it that tracing corrupts, and the target whose
probability is traced. Built from facts' prompts (the subject is the span), from question rows
(the question is the span), or as cloze probes from passages (a window of a passage, the next
content word as the target, the whole window the span). kuda_cli.locate encodes and traces them;
each data kind (kuda_cli.data.kinds) says which of these its probes are."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kuda_cli.config import LocateConfig
from kuda_cli.data.fact_set import Probe
from kuda_cli.data.questions import answer_index as parse_answer
from kuda_cli.errors import UserError

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


def _check_span(span: str) -> None:
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, not {span!r}")


def from_facts(probes: Iterable[Probe], span: str = LocateConfig.span) -> list[TraceProbe]:
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
