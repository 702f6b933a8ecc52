"""`eval.attacks=[relearn_general]`: the relearning attack's fine-tuning on general text that
names none of the forget facts' subjects or answers (the built-in general passages by default):
knowledge that comes back after training on unrelated text was suppressed, not removed (a
benign fine-tune undoes the unlearning). The run's metrics are scored as un-attacked (every
forget fact; on a corpus, lm-eval's WMDP accuracy or MUSE's figures). On a corpus the general
texts are used as they are: its forget side names no subjects or answers to filter by."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuda_cli.config import bounded
from kuda_cli.data.kinds import kind_of
from kuda_cli.data.texts import load_texts
from kuda_cli.errors import ConfigError
from kuda_cli.evaluate.attacks import Attack, AttackContext, register_attack
from kuda_cli.evaluate.attacks.relearn import RelearnSettings, check_relearning, relearn_curve


@dataclass
class RelearnGeneralSettings(RelearnSettings):
    builtin: str = "general"  # a JSONL file under kuda_cli/data/builtin/texts/
    path: str | None = None  # a local text file or directory instead (JSONL, JSON, txt)
    max_texts: int | None = bounded(None, ge=1)


def _named(names: set[str], flags: int) -> re.Pattern | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", flags)


def unrelated(texts: list[str], facts) -> list[str]:
    """The texts that name no subject or answer of `facts` as a whole word: in any case, but
    answers of up to 3 characters (chemical symbols: "I", "Li") only as written."""
    subjects = {f.subject.strip() for f in facts if f.subject.strip()}
    answers = {f.target.strip() for f in facts if f.target.strip()}
    patterns = [
        _named(subjects | {a for a in answers if len(a) > 3}, re.IGNORECASE),
        _named({a for a in answers if len(a) <= 3}, 0),
    ]
    return [t for t in texts if not any(p is not None and p.search(t) for p in patterns)]


@register_attack("relearn_general", RelearnGeneralSettings)
class RelearnGeneral(Attack):
    @classmethod
    def check(cls, cfg) -> None:
        settings = cfg.eval.attack.relearn_general
        check_relearning("relearn_general", cfg)
        if settings.path and not Path(settings.path).expanduser().exists():
            raise ConfigError(
                f"eval.attack.relearn_general.path={settings.path} does not exist; pass a text "
                "file or directory (JSONL, JSON, txt)"
            )
        general_texts(settings, forget_facts(cfg.data))

    @classmethod
    def run(cls, actx: AttackContext) -> dict[str, Any]:
        kept, dropped = general_texts(actx.settings, forget_facts(actx.ctx.data))
        return {"texts": len(kept), "texts_dropped": dropped, **relearn_curve(actx, kept, None)}


def forget_facts(data) -> list:
    """The forget facts the general texts must not name (none where the data holds no facts)."""
    kind = kind_of(data)
    return kind.fact_sets(data)[0] if kind.provides_facts else []


def general_texts(settings, forget) -> tuple[list[str], int]:
    """The general texts that name no forget fact, and how many others were dropped."""
    texts = load_texts(
        source="path" if settings.path else "builtin",
        builtin=settings.builtin,
        path=settings.path,
        max_items=settings.max_texts,
    )
    kept = unrelated(texts, forget)
    if not kept:
        raise ConfigError(
            "eval.attack.relearn_general: every general text names a forget fact; pass "
            "eval.attack.relearn_general.path=FILE with unrelated text"
        )
    return kept, len(texts) - len(kept)
