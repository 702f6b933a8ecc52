"""The built-in knowledge set: facts (subject -> target) in domains, each with prompt paraphrases
that mark the subject span, three same-domain distractors, and a passage stating the fact in
other words (the forget corpus is the passages, never the evaluation prompts)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kuda_cli.data.texts import read_records
from kuda_cli.errors import UserError

FIELDS = ("id", "domain", "subject", "target", "prompts", "distractors", "passage")


@dataclass(frozen=True)
class Fact:
    id: str
    domain: str
    subject: str
    target: str
    prompts: tuple[str, ...]  # each holds "{}" once, where the subject goes
    distractors: tuple[str, ...]
    passage: str

    def prompt(self, i: int = 0) -> str:
        text = self.prompts[i].format(self.subject)
        return text[0].upper() + text[1:]

    def subject_span(self, i: int = 0) -> tuple[int, int]:
        """Character span of the subject in `prompt(i)`."""
        start = self.prompts[i].index("{}")
        return start, start + len(self.subject)

    @property
    def options(self) -> tuple[str, ...]:
        """The target first, then the distractors."""
        return (self.target, *self.distractors)


@dataclass(frozen=True)
class Probe:
    """One prompt of one fact: what tracing and evaluation consume."""

    fact: Fact
    index: int

    @property
    def text(self) -> str:
        return self.fact.prompt(self.index)

    @property
    def subject_span(self) -> tuple[int, int]:
        return self.fact.subject_span(self.index)


def builtin_facts_path() -> Path:
    return Path(str(resources.files("kuda_cli.data") / "builtin" / "facts.jsonl"))


def parse_fact(record: dict, where: str) -> Fact:
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise UserError(f"{where}: fact {record.get('id', '?')} lacks {', '.join(missing)}")
    prompts = tuple(record["prompts"])
    if not prompts or any(p.count("{}") != 1 for p in prompts):
        raise UserError(f"{where}: every prompt of fact {record['id']} must hold '{{}}' once")
    if len(record["distractors"]) < 1 or record["target"] in record["distractors"]:
        raise UserError(f"{where}: fact {record['id']} needs distractors other than its target")
    return Fact(
        id=str(record["id"]),
        domain=str(record["domain"]),
        subject=str(record["subject"]),
        target=str(record["target"]),
        prompts=prompts,
        distractors=tuple(record["distractors"]),
        passage=str(record["passage"]),
    )


def load_facts(path: str | Path | None = None) -> list[Fact]:
    """The built-in facts, or those of a JSONL/JSON file (or directory) in the same schema."""
    source = Path(path).expanduser() if path else builtin_facts_path()
    return [parse_fact(r, str(source)) for r in read_records(source)]


def select_domains(facts: list[Fact], domains: list[str], role: str) -> list[Fact]:
    known = sorted({f.domain for f in facts})
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise UserError(
            f"data.{role}_domains has {', '.join(unknown)}, not a domain of the facts set; "
            f"domains: {', '.join(known)}"
        )
    return [f for f in facts if f.domain in domains]


def check_disjoint(forget_domains: list[str], retain_domains: list[str]) -> None:
    """A domain is forgotten or retained, not both."""
    overlap = sorted(set(forget_domains) & set(retain_domains))
    if overlap:
        raise UserError(
            f"domain(s) {', '.join(overlap)} are both forgotten and retained; "
            "remove them from data.retain_domains"
        )


def retain_of(data) -> list[str] | None:
    """A data config's retain domains; None (every domain not forgotten) when unset."""
    return None if data.retain_domains is None else list(data.retain_domains)


def split_facts(
    facts: list[Fact], forget_domains: list[str], retain_domains: list[str] | None
) -> tuple[list[Fact], list[Fact]]:
    """The forget and retain facts; retain_domains None: every domain of the set not forgotten."""
    if retain_domains is None:
        retain_domains = [
            d for d in dict.fromkeys(f.domain for f in facts) if d not in forget_domains
        ]
    check_disjoint(forget_domains, retain_domains)
    forget = select_domains(facts, forget_domains, "forget")
    retain = select_domains(facts, retain_domains, "retain")
    return forget, retain


def subject_key(subject: str) -> str:
    """A subject as compared across facts: lower case, a leading "the " dropped."""
    key = " ".join(subject.lower().split())
    return key[4:] if key.startswith("the ") else key


def subject_subsets(retain: list[Fact], forget: list[Fact]) -> dict[str, set[str]]:
    """The ids of the retain facts whose subject no forget fact has (`other_subjects`: locality)
    and of those about a forgotten subject (`same_subjects`: specificity, e.g. the language of a
    country whose capital is forgotten)."""
    forgotten = {subject_key(f.subject) for f in forget}
    same = {f.id for f in retain if subject_key(f.subject) in forgotten}
    return {"other_subjects": {f.id for f in retain} - same, "same_subjects": same}


def probes(facts: list[Fact], all_prompts: bool = True) -> list[Probe]:
    return [
        Probe(fact, i) for fact in facts for i in range(len(fact.prompts) if all_prompts else 1)
    ]
