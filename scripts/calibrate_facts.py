"""What the facts evaluation's fluency and locality figures give for answers whose quality is
known, on the embedded model (the starting model as its own judge, as `kuda unlearn` does):

- fluency: long greedy continuations (100 tokens) of the forget prompts, and stand-ins of known
  quality put in their place, scored as `eval=facts` scores them: the judge's NLL over its NLL
  of the fluent-wrong reference (the starting model's answers to other facts' prompts of the
  same domain), the n-gram entropy as a ratio to the starting model's own answers, and the
  trigram repetition rate. Fluent answers (its own, fluent wrong ones) should pass; loops and
  shuffled words should fail;
- locality: retain token agreement on other-subject facts (and on the forgotten subjects' other
  facts) under small random perturbations of the `down_proj` weights of three layers, none of
  which teaches or removes anything.

    python scripts/calibrate_facts.py [--forget chemistry] [--layers 2 3 4]
        [--noise 0 0.01 0.03 0.05] [--max-new-tokens 100]
"""

from __future__ import annotations

import argparse
import random

import torch
from omegaconf import OmegaConf

from kuda_cli.compose import compose
from kuda_cli.data.fact_set import load_facts, probes, retain_of, split_facts, subject_subsets
from kuda_cli.evaluate.fact_scoring import (
    evaluate_facts,
    fluency,
    repetition_rate,
    rotate_within_domain,
)
from kuda_cli.evaluate.scoring import greedy_continuations
from kuda_cli.models.adapter import get_adapter
from kuda_cli.models.loading import load_model

# what "passes" means in the README's fluency figures
MAX_NLL_VS_FLUENT_WRONG = 1.05
MIN_ENTROPY_RATIO = 0.95
MAX_REPETITION_GAIN = 0.10  # repetition rate at most this much above the starting model's


def loop_of(tokenizer, text: str, tokens: int) -> str:
    """The first `tokens` tokens of `text` repeated to the length of `text` in tokens (a loop
    as long as the answer it replaces)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = ids[:tokens] or tokenizer(" the", add_special_tokens=False)["input_ids"]
    return tokenizer.decode((head * (len(ids) // len(head) + 1))[: max(len(ids), len(head))])


def shuffled(tokenizer, text: str, rng: random.Random) -> str:
    """The tokens of `text` in a random order."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng.shuffle(ids)
    return tokenizer.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget", nargs="+", default=None, help="forget domains")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.05])
    parser.add_argument("--max-new-tokens", type=int, default=100)
    args = parser.parse_args()
    overrides = ["stage=eval"]
    if args.forget:  # the other domains are retained
        overrides += [f"data.forget_domains=[{','.join(args.forget)}]", "data.retain_domains=null"]
    cfg = compose(overrides)
    loaded = load_model(OmegaConf.to_object(cfg.model))
    model, tokenizer = loaded.model, loaded.tokenizer
    forget, retain = split_facts(
        load_facts(cfg.data.path), list(cfg.data.forget_domains), retain_of(cfg.data)
    )

    chosen = probes(forget, all_prompts=False)
    prompts = [p.text for p in chosen]
    own = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=16
    )
    reference = rotate_within_domain(chosen, own)
    base = fluency(model, tokenizer, prompts, own, fluent_wrong=reference)
    rng = random.Random(0)
    swapped_target = [
        a.replace(" " + p.fact.target, " " + q.fact.target)
        for a, p, q in zip(own, chosen, chosen[1:] + chosen[:1], strict=True)
    ]
    variants = {
        "its own greedy answers": (own, True),
        "fluent wrong: its answer to a third fact's prompt": (
            rotate_within_domain(chosen, own, shift=2),
            True,
        ),
        "fluent wrong: its own answer, target swapped for another's": (swapped_target, True),
        "loop: its answer's first 8 tokens repeated": (
            [loop_of(tokenizer, a, 8) for a in own],
            False,
        ),
        "loop: its answer's first 4 tokens repeated": (
            [loop_of(tokenizer, a, 4) for a in own],
            False,
        ),
        "its own answers, words shuffled": ([shuffled(tokenizer, a, rng) for a in own], False),
        "another fact's passage (human-written, short)": (
            rotate_within_domain(chosen, [" " + p.fact.passage for p in chosen]),
            None,
        ),
    }
    print(
        f"{len(prompts)} forget prompts ({', '.join(cfg.data.forget_domains)}) on "
        f"{loaded.origin}; judge: the starting model; {args.max_new_tokens} new tokens"
    )
    print(
        f"fluent-wrong reference (its answers to the next fact's prompt): NLL "
        f"{base['nll_fluent_wrong']:.3f}; its own answers: entropy {base['entropy']:.3f} bits, "
        f"repetition {base['repetition']:.3f}"
    )
    print(
        f"pass: NLL vs fluent wrong <= {MAX_NLL_VS_FLUENT_WRONG}, entropy ratio >= "
        f"{MIN_ENTROPY_RATIO}, repetition <= own + {MAX_REPETITION_GAIN}"
    )
    print("| answers | NLL vs fluent wrong | entropy ratio | repetition | passes | expected |")
    print("|---|---|---|---|---|---|")
    for name, (answers, expected) in variants.items():
        texts = [a or "" for a in answers]
        got = fluency(
            model,
            tokenizer,
            prompts,
            texts,
            fluent_wrong=reference,
            fluent_wrong_scores=base["fluent_wrong_scores"],  # the same reference every row
        )
        ratio = got["entropy"] / base["entropy"] if got["entropy"] is not None else None
        repetition = sum(map(repetition_rate, texts)) / len(texts)
        passes = (
            got["nll_vs_fluent_wrong"] <= MAX_NLL_VS_FLUENT_WRONG
            and ratio is not None
            and ratio >= MIN_ENTROPY_RATIO
            and repetition <= base["repetition"] + MAX_REPETITION_GAIN
        )
        want = {True: "pass", False: "fail", None: "(report)"}[expected]
        print(
            f"| {name} | {got['nll_vs_fluent_wrong']:.3f} | "
            f"{ratio if ratio is None else round(ratio, 3)} | {repetition:.3f} | "
            f"{'pass' if passes else 'fail'} | {want} |"
        )

    # locality under perturbations that change no knowledge on purpose
    splits = {"retain": probes(retain, all_prompts=False)}
    subsets = {"retain": subject_subsets(retain, forget)}
    _, rows = evaluate_facts(model, tokenizer, splits, batch_size=16)
    answers = {r["prompt"]: r["answer"] for r in rows}
    adapter = get_adapter(model)
    weights = [adapter.module(model, "down_proj", layer).weight for layer in args.layers]
    originals = [w.detach().clone() for w in weights]
    print(f"\nretain prompts: {len(rows)}; noise on down_proj of layers {args.layers}")
    print(
        "| noise std (x the weight's std) | retain MC | token agreement: other subjects "
        "| same subjects | exact-line agreement |"
    )
    print("|---|---|---|---|---|")
    for scale in args.noise:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for w, w0 in zip(weights, originals, strict=True):
                noise = torch.randn(w0.shape, generator=generator, dtype=torch.float32)
                w.copy_(w0 + (noise * scale * w0.float().std()).to(w0.dtype))
        metrics, _ = evaluate_facts(
            model, tokenizer, splits, batch_size=16, reference=answers, subsets=subsets
        )
        m = metrics["retain"]
        same = (m.get("same_subjects") or {}).get("token_agreement")
        print(
            f"| {scale:g} | {m['mc_acc']:.3f} | {m['other_subjects']['token_agreement']:.3f} | "
            f"{'' if same is None else f'{same:.3f}'} | {m['agreement']:.3f} |"
        )
    with torch.no_grad():
        for w, w0 in zip(weights, originals, strict=True):
            w.copy_(w0)


if __name__ == "__main__":
    main()
