"""`data.kind: tofu`: TOFU's question-answer splits (Maini et al. 2024, locuslab/TOFU): the forget
split kuda unlearn trains on, the retain split it protects, the holdout split the membership
attacks compare with, and the perturbed splits (paraphrased and perturbed answers) the tofu
metric scores. Items are trained on as documents, "Question: q\\nAnswer: a"."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kuda_cli.config import SplitSource, choice
from kuda_cli.data.kinds import DataKind, UnlearnTexts, register_kind, split_heldout
from kuda_cli.data.probes import QA_PREFIX, QA_SUFFIX, from_qa
from kuda_cli.data.sources import load_split
from kuda_cli.errors import ConfigError, UserError

HUB_ID = "locuslab/TOFU"
QA_FIELDS = ("question", "answer")
# the fields each split's rows carry (TOFU's own), checked when a split is read
FIELDS = {
    "forget": QA_FIELDS,
    "retain": QA_FIELDS,
    "holdout": QA_FIELDS,
    "probes": QA_FIELDS,
    "forget_perturbed": (*QA_FIELDS, "paraphrased_answer", "perturbed_answer"),
    "retain_perturbed": (*QA_FIELDS, "paraphrased_answer", "perturbed_answer"),
    "real_authors": (*QA_FIELDS, "perturbed_answer"),
    "world_facts": (*QA_FIELDS, "perturbed_answer"),
}


def _hub(config: str):
    """A split read from config `config` of locuslab/TOFU (its only split is "train")."""
    return field(default_factory=lambda: SplitSource(hub_id=HUB_ID, hub_config=config))


@dataclass
class TofuData:
    """TOFU forget10 (data=tofu); data=tofu_forget05 and tofu_forget01 change the splits."""

    name: str = "tofu"
    kind: str = choice("tofu", "tofu")
    # the tokens whose prediction the unlearning losses count and the membership attacks score:
    # the answer's, given the question (open-unlearning's), or every token of the document
    loss_tokens: str = choice("answer", "answer", "all")
    # Forget quality is the KS-test p-value of the forget truth ratios against those of a model
    # never trained on the forget split (TOFU's retain model): its `tofu.forget.truth_ratios`
    # from `kuda eval` (README.md, "tofu"). null: forget quality is not reported.
    retain_truth_ratios: list[float] | None = None
    forget: SplitSource = _hub("forget10")
    retain: SplitSource = _hub("retain90")
    holdout: SplitSource = _hub("holdout10")
    forget_perturbed: SplitSource = _hub("forget10_perturbed")
    retain_perturbed: SplitSource = _hub("retain_perturbed")
    real_authors: SplitSource = _hub("real_authors_perturbed")
    world_facts: SplitSource = _hub("world_facts_perturbed")
    # tracing probes (rows: question, answer); unset: the forget questions, the ones trained on
    probes: SplitSource = field(default_factory=SplitSource)


def qa_rows(data, key: str) -> list[dict[str, Any]]:
    """The rows of split `data.<key>`, checked to carry the fields TOFU gives that split."""
    split = getattr(data, key)
    split = OmegaConf.to_object(split) if OmegaConf.is_config(split) else split
    rows = load_split(split, f"data.{key}", FIELDS[key])
    if not rows:
        raise UserError(f"data.{key} has no rows; pass a file of TOFU rows (question, answer)")
    return rows


def qa_prompt(question: str) -> str:
    """An item's prompt, as the tracing probes put it: "Question: q\\nAnswer:"."""
    return f"{QA_PREFIX}{question.strip()}{QA_SUFFIX}"


def qa_document(question: str, answer: str) -> str:
    """One item as kuda unlearn trains on it: its prompt, then the answer after a space (the
    answer's: a tokenizer joins it to the answer's first word)."""
    return f"{qa_prompt(question)} {str(answer).strip()}"


def qa_documents(data, key: str) -> list[str]:
    return [qa_document(r["question"], r["answer"]) for r in qa_rows(data, key)]


def trained_documents(data, key: str) -> tuple[list[str], list[str], list[int] | None]:
    """(trained, held out) documents of split `data.<key>` and, for `loss_tokens: answer`, the
    character offset where each trained document's answer begins (None for `all`)."""
    rows = qa_rows(data, key)
    trained, heldout = split_heldout([qa_document(r["question"], r["answer"]) for r in rows])
    if data.loss_tokens != "answer":
        return trained, heldout, None
    return trained, heldout, [len(qa_prompt(r["question"])) for r in rows[: len(trained)]]


@register_kind("tofu", TofuData)
class Tofu(DataKind):
    eval_option = "tofu"
    metrics = ("tofu",)
    unlearn_splits = ("forget", "retain")

    @classmethod
    def check(cls, data) -> None:
        ratios = data.retain_truth_ratios
        if ratios is not None and (not ratios or min(ratios) < 0):
            found = f"has {min(ratios)}" if ratios else "is empty"
            raise ConfigError(
                f"data.retain_truth_ratios {found}; pass the retain model's "
                "tofu.forget.truth_ratios (none negative), or null to leave forget quality out"
            )
        for key in FIELDS:  # local files are read now: a wrong file costs no model load
            if getattr(data, key).path:
                qa_rows(data, key)

    @classmethod
    def unlearn_texts(cls, data) -> UnlearnTexts:
        forget, forget_heldout, forget_starts = trained_documents(data, "forget")
        retain, retain_heldout, retain_starts = trained_documents(data, "retain")
        return UnlearnTexts(
            forget,
            retain,
            forget_heldout,
            retain_heldout,
            forget_answer_starts=forget_starts,
            retain_answer_starts=retain_starts,
        )

    @classmethod
    def forget_passages(cls, data) -> list[str]:
        return split_heldout(qa_documents(data, "forget"))[0]

    @classmethod
    def forget_passages_at_hand(cls, data) -> bool:
        # a path that does not exist is the path checks' to report
        return bool(data.forget.path) and Path(data.forget.path).expanduser().exists()

    @classmethod
    def probe_split(cls, data) -> str | None:
        probes = getattr(data, "probes", None)
        return "probes" if probes is not None and (probes.path or probes.hub_id) else "forget"

    @classmethod
    def probes(cls, data, span: str, max_probes: int | None) -> list:
        return from_qa(qa_rows(data, cls.probe_split(data)))

    @classmethod
    def probe_origin(cls, data) -> str:
        key = cls.probe_split(data)
        split = getattr(data, key)
        return f"data.{key}: its questions ({split.path or split.hub_id})"
