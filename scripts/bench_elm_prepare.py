"""Benchmark of ELM's `prepare` (unlearn/elm_reference.py) on the embedded model, side by side in
one run: the guided continuations decoded one forget item at a time against several items a
batch, with the erasure targets and the retain tokens timed once, and a check that every item's
continuation is the same whatever the batch.

    OMP_NUM_THREADS=1 python scripts/bench_elm_prepare.py [--batches 4,8] [--fluency-tokens 32]

The forget and retain items are those a default `kuda unlearn unlearn=elm` run draws
(data=facts, seed 0). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import time

from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.models.loading import load_model
from kuda_cli.unlearn import elm_reference
from kuda_cli.unlearn.methods import get_method
from kuda_cli.unlearn.session import UnlearnSession, tokenized_data


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,8", help="items a batch to compare with 1")
    parser.add_argument("--fluency-tokens", type=int, default=None, help="default: the schema's")
    args = parser.parse_args()
    overrides = ["model=smollm2-135m", "unlearn=elm", "stage=unlearn", "eval=none"]
    if args.fluency_tokens:
        overrides.append(f"unlearn.fluency_tokens={args.fluency_tokens}")
    cfg = compose(overrides)
    loaded = load_model(OmegaConf.to_object(cfg.model))
    data = tokenized_data(cfg, loaded.tokenizer)
    ctx = UnlearnSession(cfg, loaded, list(cfg.unlearn.layers), data, "unused", "bench").ctx
    method = get_method("elm")(ctx)
    ucfg, model, tok = ctx.cfg, ctx.model, ctx.tokenizer
    prompts = elm_reference.item_prompts(ucfg, method.concept, ctx.forget_used, ctx.seed)
    _, t_targets = timed(
        lambda: elm_reference.erase_targets(model, tok, ctx.forget, ctx.forget_used, prompts, ucfg)
    )
    _, t_greedy = timed(
        lambda: elm_reference.greedy_tokens(model, ctx.retain, ctx.retain_used, ucfg.batch_size)
    )
    fixed = t_targets + t_greedy

    def continuations(batch: int):
        return timed(
            lambda: elm_reference.fluency_sequences(
                model, tok, ctx.forget, ctx.forget_used, prompts, ucfg, ctx.seed, batch
            )
        )

    items = len(set(ctx.forget_used))
    print(
        f"ELM prepare on {loaded.origin}: {items} forget items, "
        f"{len(set(ctx.retain_used))} retain items, fluency_tokens {ucfg.fluency_tokens}\n"
        f"erasure targets {t_targets:.1f} s, retain tokens {t_greedy:.1f} s "
        f"(batches of {ucfg.batch_size})\n"
    )
    one, t_one = continuations(1)
    print("| continuations | prepare | speed-up (prepare) | same continuations |")
    print("|---|---|---|---|")
    print(f"| 1 item a batch | {fixed + t_one:6.1f} s | 1.00x | - |")
    for batch in (int(b) for b in args.batches.split(",")):
        many, t_many = continuations(batch)
        same = sum(one[i] == many[i] for i in one)
        speed = (fixed + t_one) / (fixed + t_many)
        row = f"{fixed + t_many:6.1f} s | {speed:.2f}x | {same}/{items}"
        print(f"| {batch} items a batch | {row} |")


if __name__ == "__main__":
    main()
