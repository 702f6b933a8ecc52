"""`data.kind: corpus` (WMDP style): a forget corpus and a retain corpus, plus multiple-choice
questions that only the evaluation reads. Tracing reads probes held apart from the questions
(`data.probes`), or cloze probes cut from the trained forget passages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from kuda_cli.config import SplitSource, bounded, choice
from kuda_cli.data.kinds import DataKind, UnlearnTexts, register_kind, split_heldout
from kuda_cli.data.probes import CLOZE_POOL, CLOZE_WORDS, cloze_probes, from_questions
from kuda_cli.data.sources import load_split
from kuda_cli.data.texts import texts_of
from kuda_cli.errors import UserError


@dataclass
class CorpusData:
    """A forget corpus and a retain corpus (WMDP style), plus multiple-choice questions."""

    name: str = MISSING
    kind: str = choice("corpus", "corpus")
    forget: SplitSource = field(default_factory=SplitSource)
    retain: SplitSource = field(default_factory=SplitSource)
    # the WMDP test questions, the ones eval=wmdp scores: tracing never reads them
    questions: SplitSource = field(default_factory=SplitSource)
    min_chars: int = bounded(50, ge=0)
    # tracing probes held apart from the evaluation questions (rows: question, answer, and
    # choices when the answer indexes them); unset (no path, no hub_id): cloze probes from the
    # forget corpus's trained passages. Never data.questions: layers chosen on the test set.
    probes: SplitSource = field(default_factory=SplitSource)


def long_texts(data, key: str) -> list[str]:
    """The texts of split `data.<key>` of at least `data.min_chars` characters (0 without)."""
    split = _as_object(getattr(data, key))
    found = texts_of(load_split(split, f"data.{key}"), split.text_field, f"data.{key}")
    return [t for t in found if len(t) >= getattr(data, "min_chars", 0)]


def split_texts(data, key: str) -> list[str]:
    """`long_texts`, refused in one line when there are none."""
    found = long_texts(data, key)
    if not found:
        raise UserError(f"data.{key} has no usable texts; check data.{key}.text_field")
    return found


def _as_object(node):
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


class SplitsKind(DataKind):
    """A kind whose forget and retain texts are corpora (splits of a dataset or local files)."""

    unlearn_splits = ("forget", "retain")

    @classmethod
    def unlearn_texts(cls, data) -> UnlearnTexts:
        forget, forget_heldout = split_heldout(split_texts(data, "forget"))
        retain, retain_heldout = split_heldout(split_texts(data, "retain"))
        return UnlearnTexts(forget, retain, forget_heldout, retain_heldout)

    @classmethod
    def probe_split(cls, data) -> str | None:
        """`probes` when it names a path or a hub_id (questions held apart from the evaluation),
        else `forget` (cloze probes from the forget corpus). Never the evaluation questions:
        layers chosen on them would be chosen on the test set."""
        probes = getattr(data, "probes", None)
        if probes is not None and (probes.path or probes.hub_id):
            return "probes"
        return "forget"

    @classmethod
    def forget_passages(cls, data) -> list[str]:
        """The forget texts kuda unlearn trains on (min_chars applied, the held-out tail that
        KRD reads left out)."""
        return split_heldout([t.strip() for t in long_texts(data, "forget")])[0]

    @classmethod
    def forget_passages_at_hand(cls, data) -> bool:
        # a path that does not exist is the path checks' to report
        return bool(data.forget.path) and Path(data.forget.path).expanduser().is_file()

    @classmethod
    def probes(cls, data, span: str, max_probes: int | None) -> list:
        if cls.probe_split(data) == "probes":
            rows = load_split(_as_object(data.probes), "data.probes", ("question", "answer"))
            return from_questions(rows, "data.probes")
        passages = cls.forget_passages(data)
        want = max(CLOZE_POOL, max_probes or 0)
        probes = cloze_probes(passages, per_passage=max(1, math.ceil(want / max(len(passages), 1))))
        if not probes:
            raise UserError(
                f"data.forget has no passage of more than {CLOZE_WORDS} words to draw tracing "
                "probes from; pass data.probes.path=FILE (rows: question, answer)"
            )
        return probes

    @classmethod
    def probe_origin(cls, data) -> str:
        if cls.probe_split(data) == "probes":
            return f"data.probes: questions held apart ({data.probes.path or data.probes.hub_id})"
        return "data.forget: cloze probes from the trained forget passages"


@register_kind("corpus", CorpusData)
class Corpus(SplitsKind):
    eval_option = "wmdp"
