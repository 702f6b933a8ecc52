"""What the facts evaluation's fluency and agreement figures give for answers whose quality is
known, on the embedded model (the starting model as its own judge, as `eval=facts` does):

- fluency NLL, as a ratio to the starting model's own greedy answers to the forget prompts, of
  fluent answers that are wrong: its own answer with the target symbol swapped for the next
  fact's, the answer it gave to the next fact's prompt, and the next fact's passage;
- retain agreement (exact first line, and teacher-forced top-1 tokens) of the starting model
  with small random perturbations of the `down_proj` weights of three layers, none of which
  teaches or removes anything.

    python scripts/calibrate_facts.py [--layers 2 3 4] [--noise 0 0.01 0.03 0.05]
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from kuda_cli.cli import compose
from kuda_cli.data.facts import load_facts, probes, split_facts
from kuda_cli.evaluate.facts import evaluate_facts, fluency
from kuda_cli.evaluate.scoring import greedy_continuations
from kuda_cli.models.adapter import get_adapter
from kuda_cli.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.05])
    args = parser.parse_args()
    cfg = compose(["stage=eval"])
    loaded = load_model(OmegaConf.to_object(cfg.model))
    model, tokenizer = loaded.model, loaded.tokenizer
    forget, retain = split_facts(
        load_facts(cfg.data.path), list(cfg.data.forget_domains), list(cfg.data.retain_domains)
    )

    # fluency of fluent wrong answers
    chosen = probes(forget, all_prompts=False)
    prompts = [p.text for p in chosen]
    nxt = chosen[1:] + chosen[:1]
    own = greedy_continuations(model, tokenizer, prompts, max_new_tokens=32, batch_size=16)
    base = fluency(model, tokenizer, prompts, own)["nll"]
    variants = {
        "own answer, target swapped for the next fact's": [
            a.replace(" " + p.fact.target, " " + q.fact.target, 1)
            for a, p, q in zip(own, chosen, nxt, strict=True)
        ],
        "the answer to the next fact's prompt": own[1:] + own[:1],
        "the next fact's passage": [" " + q.fact.passage for q in nxt],
    }
    print(f"{len(prompts)} forget prompts on {loaded.origin}; judge: the starting model")
    print(f"  own greedy answers: {base:.3f} nats/token (ratio 1.00 by definition)")
    for name, answers in variants.items():
        nll = fluency(model, tokenizer, prompts, answers)["nll"]
        print(f"  {name}: {nll:.3f} nats/token, ratio x{nll / base:.2f}")

    # agreement under perturbations that change no knowledge on purpose
    splits = {"retain": probes(retain, all_prompts=False)}
    _, rows = evaluate_facts(model, tokenizer, splits, batch_size=16)
    reference = {r["prompt"]: r["answer"] for r in rows}
    adapter = get_adapter(model)
    weights = [adapter.module(model, "down_proj", layer).weight for layer in args.layers]
    originals = [w.detach().clone() for w in weights]
    print(f"retain prompts: {len(rows)}; noise on down_proj of layers {args.layers}")
    for scale in args.noise:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for w, w0 in zip(weights, originals, strict=True):
                noise = torch.randn(w0.shape, generator=generator, dtype=torch.float32)
                w.copy_(w0 + (noise * scale * w0.float().std()).to(w0.dtype))
        metrics, _ = evaluate_facts(model, tokenizer, splits, batch_size=16, reference=reference)
        m = metrics["retain"]
        print(
            f"  noise std {scale:g} x the weight's std: retain MC {m['mc_acc']:.3f}, "
            f"agreement {m['agreement']:.3f}, token agreement {m['token_agreement']:.3f}"
        )
    with torch.no_grad():
        for w, w0 in zip(weights, originals, strict=True):
            w.copy_(w0)


if __name__ == "__main__":
    main()
