"""Benchmark of the robustness attacks against the evaluation they attack, side by side in one
run: the model is loaded once, then the un-attacked evaluation (`eval.metrics`) and each attack
run in turn, round after round, so a drift in the machine's speed falls on all of them alike.
Each attack's median seconds and its ratio to the evaluation's (round by round) are printed.

The model evaluated is the starting model itself, lent as the starting model too (as `kuda
unlearn` lends it): the quantization, few-shot and logit-lens attacks score their starting-model
references, as they do in an unlearning run.

    python scripts/bench_attacks.py                                 # SmolLM2-135M, facts data
    python scripts/bench_attacks.py --model tiny-random --rounds 3
    python scripts/bench_attacks.py --figures forget                # eval.attack_figures=forget
    python scripts/bench_attacks.py --attacks quant4,logit_lens -o eval.facts.all_prompts=true

This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.evaluate import STARTING_JUDGE, EvalContext, compute_metrics
from kuda_cli.evaluate.attacks import run_attacks
from kuda_cli.models.loading import load_model

ALL = "relearn,relearn_general,quant8,quant4,logit_lens,fewshot"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option")
    parser.add_argument("--attacks", default=ALL, help="comma-separated attack names")
    parser.add_argument("--figures", default="all", choices=["all", "forget"])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every measurement")
    parser.add_argument(
        "-o", "--override", action="append", default=[], help="a kuda override, e.g. seed=1"
    )
    return parser.parse_args()


def main() -> None:
    args = arguments()
    overrides = [
        "stage=eval",
        f"model={args.model}",
        "eval.facts.all_prompts=false",
        f"eval.attack_figures={args.figures}",
        "eval.attack.relearn.steps=[10,30]",
        "eval.attack.relearn_general.steps=[30]",
        *args.override,
    ]
    cfg = compose(overrides)
    loaded = load_model(OmegaConf.to_object(cfg.model), cfg.cache_dir)

    @contextmanager
    def lend():
        yield loaded.model, loaded.tokenizer, STARTING_JUDGE

    attacks = args.attacks.split(",")
    eval_cfg = OmegaConf.to_object(cfg.eval)
    times: dict[str, list[float]] = {"evaluation": [], **{a: [] for a in attacks}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ctx = EvalContext(loaded, eval_cfg, OmegaConf.to_object(cfg.data), out, judge=lend)
        for r in range(args.rounds):
            started = time.perf_counter()
            metrics = {name: found for name, found in compute_metrics(ctx)}
            times["evaluation"].append(time.perf_counter() - started)
            (out / "metrics.json").write_text(
                json.dumps({k: v for d in metrics.values() for k, v in d.items()})
            )
            eval_cfg.attacks = attacks
            for name, found in run_attacks(ctx, out, cfg.seed):
                times[name].append(found["seconds"])
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
    base = times["evaluation"]
    print(f"\n{args.model}, eval.attack_figures={args.figures}, {args.rounds} rounds")
    print("| measured | median seconds | ratio to the evaluation (median of rounds) |")
    print("|---|---|---|")
    for name, found in times.items():
        ratio = statistics.median(t / b for t, b in zip(found, base, strict=True))
        print(f"| {name} | {statistics.median(found):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
