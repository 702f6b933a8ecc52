"""Benchmark of the facts evaluation's scoring on the embedded model, each old way beside the new
one in one run, with a check that both give the same answers:

1. multiple choice: each (prompt, option) its own sequence, against the four options packed over
   one copy of the shared prompt (4D attention mask);
2. token agreement: teacher forcing the reference's line on its own after the MC pass, against
   packing it beside the options (one pass for both);
3. the output head at every position, against only where a score is read (`logits_to_keep`);
4. greedy answers 32 prompts a batch, against 128 (`eval.facts.gen_batch_size`).

    python scripts/bench_eval.py [--facts 60] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.data.fact_set import load_facts, probes
from kuda_cli.evaluate.fact_scoring import mc_and_top1, mc_correct
from kuda_cli.evaluate.scoring import (
    continuation_logprobs,
    continuation_top1,
    greedy_continuations,
    option_logprobs,
)
from kuda_cli.models.loading import load_model


class FullHead(torch.nn.Module):
    """The model without `logits_to_keep` in its forward: logits at every position."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
        )


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def row(name: str, old: float, new: float, same: str) -> None:
    print(f"| {name} | {old:7.2f} s | {new:7.2f} s | {old / new:5.2f}x | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    loaded = load_model(OmegaConf.to_object(compose(["model=smollm2-135m", "stage=eval"]).model))
    model, tokenizer = loaded.model, loaded.tokenizer
    chosen = probes(load_facts()[: args.facts])
    bs = args.batch_size
    print(f"{len(chosen)} prompts x 4 options on {loaded.origin}, scoring batches of {bs}\n")
    print("| step | old | new | speed-up | same result |")
    print("|---|---|---|---|---|")

    groups = [(p.text, [" " + o for o in p.fact.options]) for p in chosen]
    pairs = [(context, option) for context, options in groups for option in options]
    flat, separate_s = timed(
        lambda: continuation_logprobs(model, tokenizer, pairs, batch_size=bs * 4)
    )
    packed, packed_s = timed(lambda: option_logprobs(model, tokenizer, groups, batch_size=bs))
    k, same, max_diff = 0, 0, 0.0
    for options in packed:
        totals = [t for t, _ in options]
        reference = [t for t, _ in flat[k : k + len(options)]]
        same += totals.index(max(totals)) == reference.index(max(reference))
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(totals, reference, strict=True)))
        k += len(options)
    row(
        "MC: each (prompt, option) alone (batches of 4x) / packed",
        separate_s,
        packed_s,
        f"answer on {same}/{len(groups)}; max diff {max_diff:.1e} nats",
    )

    answers, _ = timed(
        lambda: greedy_continuations(
            model, tokenizer, [p.text for p in chosen], max_new_tokens=16, batch_size=128
        )
    )
    lines = [a.split("\n", 1)[0].rstrip() for a in answers]
    forced = [line if line.strip() else None for line in lines]

    def apart():
        mc = mc_correct(model, tokenizer, chosen, batch_size=bs)
        keep = [i for i, f in enumerate(forced) if f]
        shares = continuation_top1(
            model, tokenizer, [(chosen[i].text, forced[i]) for i in keep], batch_size=bs
        )
        return mc, dict(zip(keep, shares, strict=True))

    (mc_a, top_a), apart_s = timed(apart)
    (mc_b, top_b), together_s = timed(
        lambda: mc_and_top1(model, tokenizer, chosen, forced, batch_size=bs)
    )
    diff = max(abs(top_a[i] - top_b[i]) for i in top_a)
    row(
        "MC + token agreement: two passes / one packed pass",
        apart_s,
        together_s,
        f"MC on {sum(a == b for a, b in zip(mc_a, mc_b, strict=True))}/{len(mc_a)}; "
        f"max agreement diff {diff:.3f}",
    )

    full = FullHead(model)
    tf_pairs = [(chosen[i].text, forced[i]) for i in top_a]
    all_heads, full_s = timed(
        lambda: continuation_logprobs(full, tokenizer, tf_pairs, batch_size=bs)
    )
    cut, cut_s = timed(lambda: continuation_logprobs(model, tokenizer, tf_pairs, batch_size=bs))
    head_diff = max(abs(a[0] - b[0]) for a, b in zip(all_heads, cut, strict=True))
    row(
        "teacher-forced lines: head at every position / where read",
        full_s,
        cut_s,
        f"max diff {head_diff:.1e} nats",
    )

    prompts = [p.text for p in chosen]

    def generate(batch_size):
        return greedy_continuations(
            model, tokenizer, prompts, max_new_tokens=16, batch_size=batch_size, stop_strings=["\n"]
        )

    small, small_s = timed(lambda: generate(32))
    large, large_s = timed(lambda: generate(128))
    row(
        "greedy answers (16 tokens): 32 / 128 prompts a batch",
        small_s,
        large_s,
        f"answer on {sum(a == b for a, b in zip(small, large, strict=True))}/{len(prompts)}",
    )


if __name__ == "__main__":
    main()
