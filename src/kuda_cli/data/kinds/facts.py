"""`data.kind: facts`: a set of facts in domains (the built-in one or data.path's), some domains
forgotten, others retained. kuda unlearn trains on each fact's passage; the evaluation prompts
stay unseen and measure whether the knowledge, not the text, is gone."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kuda_cli.config import choice, listed
from kuda_cli.data.fact_set import load_facts, retain_of, select_domains, split_facts
from kuda_cli.data.fact_set import probes as fact_probes
from kuda_cli.data.kinds import DataKind, UnlearnTexts, register_kind
from kuda_cli.data.probes import from_facts


@dataclass
class FactsData:
    name: str = "facts"
    kind: str = choice("facts", "facts")
    path: str | None = None  # a JSONL file of facts replacing the built-in set
    # fictitious facts in the same schema (same domains, templates and options) whose scores on
    # the starting model are each domain's never-learned floor; null: the built-in set's (only
    # with the built-in facts)
    floor_path: str | None = None
    forget_domains: list[str] = listed("chemistry", distinct=True, min_items=1)
    # null: every domain of the set not forgotten
    retain_domains: list[str] | None = field(
        default_factory=lambda: ["capitals", "languages", "landmarks"], metadata={"distinct": True}
    )


def subject_spans(text: str, subject: str) -> list[tuple[int, int]]:
    """Every case-insensitive occurrence of `subject` in `text`."""
    return [(m.start(), m.end()) for m in re.finditer(re.escape(subject), text, re.IGNORECASE)]


@register_kind("facts", FactsData)
class Facts(DataKind):
    eval_option = "facts"
    metrics = ("facts",)
    names_subjects = True
    provides_facts = True

    @classmethod
    def fact_sets(cls, data) -> tuple[list, list]:
        return split_facts(load_facts(data.path), list(data.forget_domains), retain_of(data))

    @classmethod
    def concept(cls, data) -> str | None:
        """The forget domains: `chemistry`, `capitals, languages`."""
        return ", ".join(str(d) for d in data.forget_domains)

    @classmethod
    def label(cls, data: dict[str, Any]) -> str | None:
        """`facts:capitals` for the set with capitals forgotten: each forget set has its own
        starting-model row."""
        forget = data.get("forget_domains")
        if isinstance(forget, list) and forget:
            return f"{data.get('name')}:{'+'.join(str(d) for d in forget)}"
        return data.get("name")

    @classmethod
    def check(cls, data) -> None:
        """The forget and retain domains are domains of the set and do not overlap."""
        cls.fact_sets(data)

    @classmethod
    def unlearn_texts(cls, data) -> UnlearnTexts:
        forget, retain = cls.fact_sets(data)
        # train on the passages; the evaluation prompts stay unseen and measure generalisation
        return UnlearnTexts(
            forget=[f.passage for f in forget],
            retain=[f.passage for f in retain],
            forget_heldout=[f.prompt(0) for f in forget],
            retain_heldout=[f.prompt(0) for f in retain],
            forget_spans=[subject_spans(f.passage, f.subject) for f in forget],
            forget_heldout_spans=[[f.subject_span(0)] for f in forget],
        )

    @classmethod
    def probes(cls, data, span: str, max_probes: int | None) -> list:
        forget = select_domains(load_facts(data.path), list(data.forget_domains), "forget")
        return from_facts(fact_probes(forget), span)

    @classmethod
    def probe_origin(cls, data) -> str:
        return "facts: the forget facts' prompts"
