"""`unlearn.auto_tune`: the learning rate chosen per run from a few short trials.

The paper tunes in two stages (a stability boundary, then the forgetting strength); a user who
forgets a new domain should not have to. Each trial trains the method from the starting weights
at `unlearn.lr x factor` for `unlearn.steps` steps and scores the result on prompts unlike the
text it trains on (`auto_tune.probes`):

- `prompts` (default): each fact's paraphrased prompts, never the passages the method trains on.
  A figure read from the trained passages measures forgotten text, not a forgotten fact: on a
  domain whose passages share one sentence template, passage clozes read 0.91-1.0 removed at
  every trial while the evaluation's prompts found 0.10 at the tuner's choice;
- `passages`: each fact's passage cut before its answer (a cloze), the earlier rule, kept to
  compare with.

Forget removed: the answer's share among the fact's options (log-softmax of the summed
log-probabilities) is the model's knowledge of it, and whether every answer token is the most
likely next one (teacher-forced: the greedy answer's figure). The never-learned floor is the same
probe with an invented name in the subject's place. Per probe `(before - after) / (before -
floor)` clipped to [0, 1], averaged over the probes the starting model knows better than the
floor (as the evaluation's removed figure). Stability: the same figure on a sample of the retain
facts (knowledge lost), and the perplexity ratio and top-1 agreement of the retain passages, or of
the texts the method names (`Method.tuning_texts`: KUDA with general null-space keys reads general
text of the keys' source that the keys left out; the figures keep their `retain_` names).

The choice, in unlearn/tuning.py's terms (shared with kuda pick): a trial is stable when retain
removed <= `max_retain_removed`, the perplexity ratio <= `max_ppl_ratio` and the agreement >=
`min_agreement`; the smallest stable factor whose forget removed reaches `target_removed`, else
the stable trial that removed most, else the least damaging trial (warned). Factors are searched
by bisection (forgetting and damage grow with the learning rate), `trials` at most. Each finished
trial is one line of `tune/trials.jsonl`; a resumed run reads them back and repeats none; the
choice is `tune/choice.json`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kuda_cli.errors import UserError
from kuda_cli.evaluate.scoring import option_scores
from kuda_cli.unlearn import tuning
from kuda_cli.unlearn.unknown import invented_name, spelled_like

log = logging.getLogger(__name__)
TUNE_DIR = "tune"
TRIALS_FILE = "trials.jsonl"
CHOICE_FILE = "choice.json"
MIN_CLOZES = 5  # fewer forget facts with a usable cloze: the forget figure means nothing
KNOWN_GAP = 0.1  # nats above the floor: a fact the starting model knows
MAX_RETAIN = 64  # retain facts scored per trial


@dataclass(frozen=True)
class Cloze:
    context: str  # the prompt, or the passage up to the answer
    floor_context: str  # the same with an invented name for the subject
    options: tuple[str, ...]  # the answer first, then the distractors


def cloze_of(fact, name: str) -> Cloze | None:
    """The passage cut before the first whole-word answer after the subject, or None where the
    passage names the answer only before the subject (its cloze would not need the subject)."""
    passage = fact.passage
    subject = re.search(re.escape(fact.subject), passage, re.IGNORECASE)
    if subject is None:
        return None
    answer = re.compile(rf"(?<!\w){re.escape(fact.target)}(?!\w)").search(passage, subject.end())
    if answer is None:
        return None
    context = passage[: answer.start()]
    floor = context[: subject.start()] + spelled_like(subject.group(0), name)
    floor += context[subject.end() :]
    space = " " if context[-1:].isspace() else ""
    return Cloze(context.rstrip(), floor.rstrip(), tuple(space + o for o in fact.options))


def prompt_probes_of(fact, name: str) -> list[Cloze]:
    """One probe a paraphrased prompt of `fact`, the floor the same prompt about `name`."""
    options = tuple(" " + o for o in fact.options)
    out = []
    for template in fact.prompts:
        context, floor = template.format(fact.subject), template.format(name)
        out.append(Cloze(_capital(context), _capital(floor), options))
    return out


def _capital(text: str) -> str:  # as Fact.prompt writes a prompt
    return text[:1].upper() + text[1:]


def clozes_of(facts, seed: int, source: str = "prompts") -> list[Cloze]:
    """Every probe of `facts`: their prompts, or their passages' clozes (`auto_tune.probes`)."""
    rng = np.random.default_rng(seed)
    if source == "prompts":
        return [c for f in facts for c in prompt_probes_of(f, invented_name(rng))]
    return [c for f in facts if (c := cloze_of(f, invented_name(rng))) is not None]


def knowledge(model, tokenizer, clozes: list[Cloze], floor: bool = False) -> np.ndarray:
    """Per cloze: log of the answer's share among the options, and whether every token of the
    answer is the model's most likely next one (teacher-forced): rows of (share, said)."""
    groups = [(c.floor_context if floor else c.context, list(c.options)) for c in clozes]
    scored = option_scores(model, tokenizer, groups, desc="tuning probes")
    sums = torch.tensor([[total for total, _, _ in options] for options in scored])
    said = torch.tensor([float(options[0][2] == options[0][1]) for options in scored])
    return torch.stack([torch.log_softmax(sums, dim=-1)[:, 0], said], dim=1).numpy()


def removed(before: np.ndarray, after: np.ndarray, floor: np.ndarray) -> float | None:
    """Knowledge removed towards the floor, as the evaluation's summary: the mean of the share
    figure (per known fact, clipped to [0, 1], averaged) and the said figure (the rate of
    answers said, before against after and floor, clipped); None where nothing is known."""
    gap = before[:, 0] - floor[:, 0]
    known = gap > KNOWN_GAP
    if not known.any():
        return None
    share = np.clip((before[known, 0] - after[known, 0]) / gap[known], 0.0, 1.0).mean()
    said_gap = before[:, 1].mean() - floor[:, 1].mean()
    if said_gap <= 0:
        return float(share)
    said = np.clip((before[:, 1].mean() - after[:, 1].mean()) / said_gap, 0.0, 1.0)
    return float((share + said) / 2)


@torch.no_grad()
def passages(model, tokenizer, texts: list[str]) -> tuple[float, torch.Tensor]:
    """(mean next-token NLL over every text's tokens, the most likely next token at every
    position, concatenated), one forward pass a text (a few hundred short passages: no padding
    to get wrong)."""
    device = next(model.parameters()).device
    nll, count, top = 0.0, 0, []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        top.append(logits.argmax(-1).cpu())
        if ids.shape[1] > 1:
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return nll / max(count, 1), torch.cat(top) if top else torch.zeros(0, dtype=torch.long)


class Scorer:
    """The starting model's figures, then any trained model's against them."""

    def __init__(
        self,
        model,
        tokenizer,
        forget_facts,
        retain_facts,
        seed: int,
        source: str = "prompts",
        texts: list[str] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.forget = clozes_of(forget_facts, seed, source)
        if len(retain_facts) > MAX_RETAIN:  # a seeded sample: the trials' cost stays bounded
            keep = np.random.default_rng(seed).choice(len(retain_facts), MAX_RETAIN, replace=False)
            retain_facts = [retain_facts[i] for i in sorted(keep)]
        self.retain = clozes_of(retain_facts, seed + 1, source)
        if len(self.forget) < MIN_CLOZES:
            raise UserError(
                f"unlearn.auto_tune needs at least {MIN_CLOZES} forget probes ({source}); "
                f"{len(self.forget)} there are: set unlearn.lr yourself and "
                f"unlearn.auto_tune.enabled=false"
            )
        # perplexity and agreement: the given texts, else the retain facts' passages
        self.retain_texts = texts if texts is not None else [f.passage for f in retain_facts]
        self.start = self._now()
        self.floor = {
            "forget": knowledge(model, tokenizer, self.forget, floor=True),
            "retain": knowledge(model, tokenizer, self.retain, floor=True) if self.retain else None,
        }
        if removed(self.start["forget"], self.start["forget"], self.floor["forget"]) is None:
            raise UserError(  # checked before any trial trains
                f"unlearn.auto_tune: the starting model knows none of the forget facts' {source} "
                "better than an invented subject; set unlearn.lr yourself"
            )

    def _now(self) -> dict:
        m, t = self.model, self.tokenizer
        return {
            "forget": knowledge(m, t, self.forget),
            "retain": knowledge(m, t, self.retain) if self.retain else None,
            **dict(zip(("nll", "top1"), passages(m, t, self.retain_texts), strict=True)),
        }

    def score(self) -> dict:
        now, start = self._now(), self.start
        out = {"forget_removed": removed(start["forget"], now["forget"], self.floor["forget"])}
        if self.retain:
            out["retain_removed"] = removed(start["retain"], now["retain"], self.floor["retain"])
        if self.retain_texts:
            out["retain_ppl_ratio"] = math.exp(now["nll"] - start["nll"])
        if len(start["top1"]):
            out["retain_agreement"] = float((now["top1"] == start["top1"]).float().mean())
        return {k: round(v, 6) for k, v in out.items() if v is not None}


# a trial's row keys that are costs, named as tuning.Candidate's fields
COSTS = ("retain_removed", "retain_ppl_ratio", "retain_agreement")
WHY = {  # how the choice was made, as tune/choice.json says it
    tuning.TARGET: "the smallest stable learning rate reaching the target",
    tuning.STRONGEST: "no stable trial reached the target: the stable one that removed most",
    tuning.NONE_STABLE: "no trial was stable: the least damaging one",
}


def limits(spec) -> tuning.Limits:
    """Stable, for auto_tune: the retain set's knowledge, perplexity and top-1 tokens kept."""
    return tuning.Limits(
        max_retain_removed=spec.max_retain_removed,
        max_ppl_ratio=spec.max_ppl_ratio,
        min_agreement=spec.min_agreement,
    )


def candidate(row: dict, index: int | None = None) -> tuning.Candidate:
    """A trial's row as a tuning candidate: forget removed is its forgetting."""
    costs = {key: row[key] for key in COSTS if key in row}
    return tuning.Candidate(row["forget_removed"], **costs, source=index)


def search(spec, run_trial) -> tuple[int, dict[int, dict], str]:
    """(chosen factor index, the trials by index, why). `run_trial(i)` returns trial i's row.
    Damage and forgetting grow with the learning rate: bisection first for the largest stable
    factor (the stability boundary), then, below it, for the smallest one reaching the target
    (the forgetting strength), within `spec.trials` trials."""
    rows: dict[int, dict] = {}
    bounds = limits(spec)

    def trial(i: int) -> tuning.Candidate:
        if i not in rows:
            rows[i] = run_trial(i)
        return candidate(rows[i], i)

    def budget() -> bool:
        return len(rows) < spec.trials

    lo, hi = 0, len(spec.factors) - 1  # stage 1: the largest stable index lies in [lo, hi]
    while lo < hi and budget():
        mid = (lo + hi + 1) // 2
        if tuning.stable(trial(mid), bounds):
            lo = mid
        else:
            hi = mid - 1
    if lo not in rows and budget():
        trial(lo)
    good = [i for i in rows if tuning.stable(trial(i), bounds)]
    lo, hi = 0, max(good, default=-1)  # stage 2: the smallest index reaching the target
    while lo < hi and budget():
        mid = (lo + hi) // 2
        if tuning.reaches(trial(mid), spec.target_removed):
            hi = mid
        else:
            lo = mid + 1
    tried = [trial(i) for i in sorted(rows)]  # gentlest first
    chosen, how = tuning.choose(tried, bounds, target=spec.target_removed)
    return chosen.source, rows, WHY[how]


def tune(ucfg, data_cfg, ctx, run_dir: Path | None, train_trial) -> tuple[object, dict]:
    """(the config with the chosen lr, what to record in metrics.json). `train_trial(cfg)`
    trains a method from the starting weights with `cfg` and leaves the model trained; the
    trained tensors are put back after each trial's score."""
    from kuda_cli.data.kinds import kind_of
    from kuda_cli.unlearn.methods import get_method

    spec = ucfg.auto_tune
    forget_facts, retain_facts = kind_of(data_cfg).fact_sets(data_cfg)
    texts = get_method(ucfg.method)(replace(ctx, cfg=ucfg)).tuning_texts()
    scorer = Scorer(
        ctx.model,
        ctx.tokenizer,
        forget_facts,
        retain_facts,
        ctx.seed,
        source=spec.probes,
        texts=texts,
    )
    done = read_trials(run_dir)
    path = run_dir / TUNE_DIR / TRIALS_FILE if run_dir else None

    def run_trial(i: int) -> dict:
        lr = ucfg.lr * spec.factors[i]
        if (key := _key(lr)) in done:
            log.info("auto_tune: trial at lr %.3g read back from %s", lr, path)
            return done[key]
        started = time.perf_counter()
        trial_cfg = replace(ucfg, lr=lr, save_every=0, auto_tune=replace(spec, enabled=False))
        saved = train_trial(trial_cfg)
        try:
            row = {"factor": spec.factors[i], "lr": lr, **scorer.score()}
        finally:
            with torch.no_grad():
                for param, start in saved:
                    param.copy_(start)
        row["stable"] = tuning.stable(candidate(row), limits(spec))
        row["seconds"] = round(time.perf_counter() - started, 3)
        log.info("auto_tune trial: %s", json.dumps(row))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = path.exists() and not path.read_text().endswith("\n") and path.stat().st_size
            with open(path, "a") as f:
                f.write(("\n" if torn else "") + json.dumps(row) + "\n")
        return row

    index, rows, why = search(spec, run_trial)
    chosen = rows[index]["lr"]
    record = {
        "lr": chosen,
        "factor": spec.factors[index],
        "why": why,
        "stability_texts": "retain passages" if texts is None else f"{len(texts)} method texts",
        "trials": [rows[i] for i in sorted(rows)],
    }
    if not rows[index]["stable"]:
        log.warning("auto_tune: %s (lr %.3g)", why, chosen)
    if run_dir is not None:
        (run_dir / TUNE_DIR / CHOICE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"auto_tune: lr {chosen:.3g} ({why}); trials in {path}")
    return replace(ucfg, lr=chosen), record


def _key(lr: float) -> str:
    return f"{lr:.6e}"


def read_trials(run_dir: Path | None) -> dict[str, dict]:
    """The finished trials of an earlier attempt of this run, by learning rate (a torn last
    line, from a kill while writing, is ignored)."""
    path = run_dir / TUNE_DIR / TRIALS_FILE if run_dir else None
    if path is None or not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[_key(row["lr"])] = row
    return rows


def trial_trainer(ctx, forget, retain):
    """`tune`'s `train_trial`: the method of the trial's config on the shared trainer, without a
    run directory (no checkpoint, no log); returns the trained tensors with their starting
    values."""

    def train(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from kuda_cli.unlearn.methods import get_method
        from kuda_cli.unlearn.trainer import Trainer

        method = get_method(cfg.method)(replace(ctx, cfg=cfg))
        saved = [(p, p.detach().clone()) for p in method.trainable_parameters().values()]
        trainer = Trainer(
            ctx.model, ctx.tokenizer, method, cfg, forget, retain, out_dir=None, seed=ctx.seed
        )
        try:
            trainer.train()
        finally:
            method.close()
        return saved

    return train
