"""Benchmark of causal tracing on the embedded model, side by side in one run: ROME's naive loop
(one forward pass over the noise samples per (module, layer, position)) against kuda's fast
implementation, on the same probes with the same noise. Checks that the effect tensors agree.

    python scripts/bench_trace.py [--probes 3] [--samples 10] [--threads N]

The probes are the first ones of `kuda trace`'s default selection (20 drawn with seed 0 from
the chemistry prompts).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.data.fact_set import load_facts, probes, select_domains
from kuda_cli.data.probes import from_facts
from kuda_cli.locate.probes import choose, encode
from kuda_cli.locate.tracing import KINDS, trace_probes
from kuda_cli.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(["stage=trace"])
    loaded = load_model(OmegaConf.to_object(cfg.model), cfg.cache_dir)
    forget = select_domains(load_facts(), list(cfg.data.forget_domains), "forget")
    chosen = choose(from_facts(probes(forget)), cfg.locate.max_probes, cfg.seed)[: args.probes]
    encoded = [encode(loaded.tokenizer, p) for p in chosen]
    settings = dict(samples=args.samples, noise=cfg.locate.noise, seed=cfg.seed)

    timings, results = {}, {}
    for name, naive in (("fast", False), ("naive", True)):
        start = time.perf_counter()
        results[name], _ = trace_probes(
            loaded.model, loaded.adapter, encoded, naive=naive, **settings
        )
        timings[name] = time.perf_counter() - start

    diff = max(
        float(np.abs(f.effect(k) - n.effect(k)).max())
        for f, n in zip(results["fast"], results["naive"], strict=True)
        for k in KINDS
    )
    largest = max(float(np.abs(n.effect(k)).max()) for n in results["naive"] for k in KINDS)
    print(f"{len(encoded)} probes x {args.samples} noise samples on {loaded.origin}")
    print(f"threads: {torch.get_num_threads()}")
    for enc in encoded:
        print(
            f"  {enc.probe.prompt!r} -> {enc.probe.target!r}: {len(enc.input_ids)} tokens, "
            f"corrupted {enc.span[0]}..{enc.span[1] - 1}"
        )
    print(f"naive (ROME's loop): {timings['naive']:8.1f} s")
    print(f"fast (kuda):         {timings['fast']:8.1f} s")
    print(f"speed-up: {timings['naive'] / timings['fast']:.1f}x")
    print(
        f"max |effect difference| {diff:.2e} (largest effect {largest:.3f}); agree: {diff < 1e-4}"
    )


if __name__ == "__main__":
    main()
