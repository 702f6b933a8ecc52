"""Benchmark of multiple-choice scoring on the embedded model, side by side in one run:
each (prompt, option) scored as its own sequence, against the four options packed over one copy
of the shared prompt (4D attention mask). Checks both give the same answers.

    python scripts/bench_eval.py [--facts 60] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

from omegaconf import OmegaConf

from kuda_cli.cli import compose
from kuda_cli.data.facts import load_facts, probes
from kuda_cli.evaluate.scoring import continuation_logprobs, option_logprobs
from kuda_cli.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    loaded = load_model(OmegaConf.to_object(compose(["model=smollm2-135m", "stage=eval"]).model))
    model, tokenizer = loaded.model, loaded.tokenizer
    chosen = probes(load_facts()[: args.facts])
    groups = [(p.text, [" " + o for o in p.fact.options]) for p in chosen]
    pairs = [(context, option) for context, options in groups for option in options]

    start = time.perf_counter()
    flat = continuation_logprobs(model, tokenizer, pairs, batch_size=args.batch_size * 4)
    separate_s = time.perf_counter() - start
    start = time.perf_counter()
    packed = option_logprobs(model, tokenizer, groups, batch_size=args.batch_size)
    packed_s = time.perf_counter() - start

    k, same, max_diff = 0, 0, 0.0
    for options in packed:
        totals = [t for t, _ in options]
        reference = [t for t, _ in flat[k : k + len(options)]]
        same += totals.index(max(totals)) == reference.index(max(reference))
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(totals, reference, strict=True)))
        k += len(options)
    print(f"{len(groups)} prompts x 4 options on {loaded.origin}")
    print(f"separate sequences: {separate_s:7.2f} s")
    print(f"packed prompt:      {packed_s:7.2f} s")
    print(f"speed-up: {separate_s / packed_s:5.2f}x")
    print(f"same answer on {same}/{len(groups)} prompts; max |difference| {max_diff:.2e} nats")


if __name__ == "__main__":
    main()
