"""`data.kind: muse`: MUSE's corpora (forget, retain, holdout) and its evaluation splits
(VerbMem, KnowMem). Unlearned and traced like a corpus; scored by the muse metric."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from kuda_cli.config import SplitSource, bounded, choice
from kuda_cli.data.kinds import register_kind
from kuda_cli.data.kinds.corpus import SplitsKind


@dataclass
class MuseData:
    name: str = MISSING
    kind: str = choice("muse", "muse")
    # PrivLeak compares the Min-K% AUC with that of a model retrained without the forget set:
    # set it for your retrained model; null reports the AUC alone.
    retrain_auc: float | None = bounded(None, gt=0, le=1)  # 0 would divide PrivLeak by zero
    forget: SplitSource = field(default_factory=SplitSource)
    retain: SplitSource = field(default_factory=SplitSource)
    holdout: SplitSource = field(default_factory=SplitSource)
    verbmem: SplitSource = field(default_factory=SplitSource)
    knowmem_forget: SplitSource = field(default_factory=SplitSource)
    knowmem_retain: SplitSource = field(default_factory=SplitSource)
    knowmem_forget_icl: SplitSource = field(default_factory=SplitSource)
    knowmem_retain_icl: SplitSource = field(default_factory=SplitSource)
    # tracing probes held apart from the KnowMem questions (rows: question, answer); unset: cloze
    # probes from the forget corpus's trained passages, never knowmem_forget (an eval split)
    probes: SplitSource = field(default_factory=SplitSource)


@register_kind("muse", MuseData)
class Muse(SplitsKind):
    eval_option = "muse"
    metrics = ("muse",)
