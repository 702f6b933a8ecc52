"""KUDA with each null-space key source side by side, on one facts domain at one learning rate:
`unlearn.nullspace.key_source=retain`, `general` and `retain+general` (general text from
`--source`), one `kuda unlearn` run each, then one table of forget removed, general-text
perplexity ratio and agreement on the retain domains (other subjects, same subjects). A
comparison, not a test: compare settings at matched forgetting (run it at several `--lr`).

    python scripts/keys_compare.py --domain chemistry --lr 3e-3
    python scripts/keys_compare.py --domain capitals --lr 1e-2 --source hub --model tiny-random
    python scripts/keys_compare.py --lr 3e-3 -- unlearn.nullspace.general.share=0.8 locate=fixed

Runs go to `--out/<keys>/` (a finished one is read back, not run again); extra overrides after
`--` go to every run. The starting model's evaluation is cached, so it is paid once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

KEYS = ("retain", "general", "retain+general")
COLUMNS = (
    ("forget removed", "forget_removed"),
    ("ppl ratio", "perplexity_ratio"),
    ("other-subject agreement", "retain_other_token_agreement"),
    ("same-subject agreement", "retain_same_token_agreement"),
    ("retain mc ratio", "retain_mc_ratio"),
)


def run_dir(out: Path, keys: str) -> Path:
    return out / keys.replace("+", "_")


def run(args: argparse.Namespace, keys: str) -> dict:
    """The summary of metrics.json of the `kuda unlearn` run with `keys` (run when missing)."""
    directory = run_dir(args.out, keys)
    metrics = directory / "metrics.json"
    if not metrics.is_file() or "summary" not in json.loads(metrics.read_text()):
        command = [
            sys.executable,
            "-m",
            "kuda_cli.cli",
            "unlearn",
            f"model={args.model}",
            f"data.forget_domains=[{args.domain}]",
            f"unlearn.lr={args.lr}",
            f"unlearn.nullspace.key_source={keys}",
            f"unlearn.nullspace.general.source={args.source}",
            f"hydra.run.dir={directory}",
            *args.overrides,
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads(metrics.read_text()).get("summary", {})


def table(rows: dict[str, dict]) -> str:
    head = ["keys", *(label for label, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for keys, summary in rows.items():
        cells = [summary.get(key) for _, key in COLUMNS]
        shown = ["-" if c is None else f"{c:.3f}" for c in cells]
        lines.append("| " + " | ".join([keys, *shown]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="chemistry", help="the facts domain to forget")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--source", default="self", choices=("self", "hub", "path"))
    parser.add_argument("--keys", nargs="+", default=list(KEYS), choices=KEYS)
    parser.add_argument("--out", type=Path, default=Path("outputs/keys_compare"))
    parser.add_argument("overrides", nargs="*", help="more overrides for every run (after --)")
    args = parser.parse_args(argv)
    args.out = args.out / f"{args.domain}_lr{args.lr:g}"
    rows = {keys: run(args, keys) for keys in args.keys}
    print(f"\n{args.model}, forget {args.domain}, lr {args.lr:g}, general source {args.source}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
