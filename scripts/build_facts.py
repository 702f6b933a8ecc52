"""Build the shipped knowledge set from the candidate facts: keep only what the embedded model
(SmolLM2-135M-Instruct) knows, and write the filter's counts.

A candidate is kept when the model picks the target by log-likelihood among the four options
for EVERY prompt paraphrase, and its greedy answer holds the target for AT LEAST ONE paraphrase.
Domains with fewer than --min-facts kept facts are dropped.

    python scripts/build_facts.py [--candidates FILE ...]
        [--out src/kuda_cli/data/builtin/facts.jsonl] [--report docs/facts.md]

--candidates defaults to CANDIDATES: the first four domains' file, then occupations' (written
later, in a file of its own). The kept facts are written in the order of the files and of their
lines, so a domain added in a later file appends lines and leaves the earlier ones as they were
(the starting model's cached evaluations are keyed on the configuration, not on these bytes).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.data.fact_set import load_facts, probes
from kuda_cli.evaluate.fact_scoring import answer_matches, mc_correct
from kuda_cli.evaluate.scoring import greedy_continuations
from kuda_cli.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("facts_candidates.jsonl", "facts_candidates_occupations.jsonl")  # under scripts/


def shown(path: str | Path) -> str:
    """A candidates file as the report names it: relative to the repository when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def kept_sections(report: Path) -> str:
    """What the report holds from its first second-level heading on (written by hand, kept)."""
    text = report.read_text() if report.exists() else ""
    start = text.find("\n## ")
    return text[start:] if start >= 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--candidates", nargs="+", default=[ROOT / "scripts" / name for name in CANDIDATES]
    )
    parser.add_argument(
        "--out", default=ROOT / "src" / "kuda_cli" / "data" / "builtin" / "facts.jsonl"
    )
    parser.add_argument("--report", default=ROOT / "docs" / "facts.md")
    parser.add_argument("--min-facts", type=int, default=40)
    args = parser.parse_args()

    loaded = load_model(OmegaConf.to_object(compose(["model=smollm2-135m", "stage=eval"]).model))
    facts = [fact for path in args.candidates for fact in load_facts(path)]
    every = probes(facts, all_prompts=True)
    mc = mc_correct(loaded.model, loaded.tokenizer, every, batch_size=32)
    answers = greedy_continuations(
        loaded.model, loaded.tokenizer, [p.text for p in every], max_new_tokens=16, batch_size=32
    )
    mc_ok: dict[str, bool] = defaultdict(lambda: True)
    gen_ok: dict[str, bool] = defaultdict(bool)
    for probe, m, a in zip(every, mc, answers, strict=True):
        mc_ok[probe.fact.id] &= m
        gen_ok[probe.fact.id] |= answer_matches(a, probe.fact.target)

    candidates = Counter(f.domain for f in facts)
    kept_mc = Counter(f.domain for f in facts if mc_ok[f.id])
    kept = [f for f in facts if mc_ok[f.id] and gen_ok[f.id]]
    kept_both = Counter(f.domain for f in kept)
    domains = sorted(d for d in candidates if kept_both[d] >= args.min_facts)
    shipped = [f for f in kept if f.domain in domains]

    records = {
        json.loads(line)["id"]: line
        for path in args.candidates
        for line in open(path)
        if line.strip()
    }
    Path(args.out).write_text("".join(records[f.id].rstrip("\n") + "\n" for f in shipped))
    lines = [
        "# The built-in knowledge set (`data=facts`)",
        "",
        "Made by `python scripts/build_facts.py` from "
        + " and ".join(f"`{shown(p)}`" for p in args.candidates),
        "(facts we wrote). The embedded SmolLM2-135M-Instruct must already know a fact for",
        "forgetting it to mean anything: a candidate is kept when the model picks the target by",
        "log-likelihood among the four options for every prompt paraphrase, and its greedy answer",
        "(16 tokens) holds the target for at least one paraphrase. Domains with fewer than",
        f"{args.min_facts} kept facts are not shipped.",
        "",
        "| domain | candidates | MC right on every prompt | kept (+ right greedy answer) "
        "| shipped |",
        "|---|---|---|---|---|",
    ]
    for d in sorted(candidates):
        lines.append(
            f"| {d} | {candidates[d]} | {kept_mc[d]} | {kept_both[d]} | "
            f"{'yes' if d in domains else 'no'} |"
        )
    lines += ["", f"Shipped: {len(shipped)} facts in {len(domains)} domains."]
    Path(args.report).write_text("\n".join(lines) + "\n" + kept_sections(Path(args.report)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
