"""Data kinds, registered by name: `data.kind` (the schema a data option's YAML starts from) picks
one.

A kind is one module of this package (or, outside kuda, a module named by an entry point of the
group `kuda_cli.data_kinds`) defining a `DataKind` subclass with `@register_kind(name, Schema)`,
plus the YAML options in conf/data/ that start from `/schema/data/<name>`. The kind owns
everything about its data: the schema, its checks, the texts kuda unlearn trains on and protects,
the tracing probes, where they come from, and the evaluation that fits it. The rest of kuda asks
the kind and never names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kuda_cli.plugins import Registry

REGISTRY = Registry("data kind", __name__, "kuda_cli.data_kinds", "data.kind")


@dataclass
class UnlearnTexts:
    forget: list[str]  # trained on
    retain: list[str]  # protected: null-space keys, retain losses
    forget_heldout: list[str]  # never trained on: KRD
    retain_heldout: list[str]  # never used for the projector: its measured leak
    # character spans of the subject in each forget / held-out forget text, where the data
    # names subjects (facts): methods may restrict their loss to those tokens
    forget_spans: list[list[tuple[int, int]]] | None = None
    forget_heldout_spans: list[list[tuple[int, int]]] | None = None
    # per forget / retain text, the character offset where its answer begins, where the data
    # has prompts (TOFU's questions): a loss counts the predictions of the tokens from there on.
    # None: every token counts
    forget_answer_starts: list[int] | None = None
    retain_answer_starts: list[int] | None = None


class DataKind:
    """Base class. `data` is the data group's config (a node or its dataclass)."""

    name = ""
    schema: type = object  # set by register_kind
    eval_option: str | None = None  # the eval option that scores it: `data=X` alone picks it
    # metrics that read their sets from the data group and can read this kind's
    metrics: tuple[str, ...] = ()
    names_subjects = False  # its texts mark subject mentions (KUDA's last-token site)
    provides_facts = False  # it is a facts set: fact_sets() gives facts with options (clozes)
    # splits (config keys under data.) read by kuda unlearn, checked for the hub before any work
    unlearn_splits: tuple[str, ...] = ()

    @classmethod
    def check(cls, data) -> None:
        """Checks before any work (a UserError of one line)."""

    @classmethod
    def unlearn_texts(cls, data) -> UnlearnTexts:
        raise NotImplementedError

    @classmethod
    def forget_passages(cls, data) -> list[str]:
        """The forget texts kuda unlearn trains on (a relearning attack fine-tunes on them)."""
        return cls.unlearn_texts(data).forget

    @classmethod
    def forget_passages_at_hand(cls, data) -> bool:
        """Whether forget_passages reads only local files (cheap enough to count before any
        model loads)."""
        return False

    @classmethod
    def probe_split(cls, data) -> str | None:
        """The split (config key under data.) the tracing probes are read from, None when they
        come from no split of their own."""
        return None

    @classmethod
    def probes(cls, data, span: str, max_probes: int | None) -> list:
        """Tracing probes (kuda_cli.data.probes.TraceProbe), never the evaluation questions;
        `span` and `max_probes`: locate.span and locate.max_probes (how many will be drawn)."""
        raise NotImplementedError

    @classmethod
    def probe_origin(cls, data) -> str:
        """Where the probes come from, for layers.json and the log."""
        raise NotImplementedError

    @classmethod
    def label(cls, data: dict[str, Any]) -> str | None:
        """How `kuda report` names the data of a run (the data node of its config.yaml)."""
        return data.get("name")

    @classmethod
    def concept(cls, data) -> str | None:
        """What the forget texts are about, in words (ELM's concept prefixes), when the data
        names it; None: the method asks the user (unlearn.concept)."""
        return None

    @classmethod
    def fact_sets(cls, data) -> tuple[list, list]:
        """(forget facts, retain facts), for a kind that provides_facts."""
        raise NotImplementedError(f"data kind {cls.name} holds no facts")


def register_kind(name: str, schema: type):
    """Register a DataKind subclass as `name`, with the dataclass its config follows."""
    return REGISTRY.register(name, schema)


def get_kind(name: str) -> type[DataKind]:
    return REGISTRY.get(str(name))


def kind_of(data) -> type[DataKind]:
    """The kind of a data config (node or dataclass)."""
    return get_kind(data.kind)


def kind_of_record(data: dict[str, Any]) -> type[DataKind] | None:
    """The kind of a data node read back from a run's config.yaml: the one it names, or, for a
    node written without `kind`, the first kind whose schema has every key it holds."""
    from dataclasses import fields

    if data.get("kind") is not None and REGISTRY.known(str(data["kind"])):
        return get_kind(data["kind"])
    for kind in REGISTRY.all().values():
        if set(data) <= {f.name for f in fields(kind.schema)}:
            return kind
    return None


def kind_schemas() -> dict[str, type]:
    """Kind name -> its config schema (imports every kind module)."""
    return {name: kind.schema for name, kind in REGISTRY.all().items()}


def split_heldout(texts: list[str], fraction: float = 0.05, cap: int = 64) -> tuple[list, list]:
    """(kept, held out): the last `fraction` of the texts (at least 1, at most `cap`) held out."""
    if len(texts) < 2:
        return texts, texts
    n = min(cap, max(1, int(len(texts) * fraction)))
    return texts[:-n], texts[-n:]
