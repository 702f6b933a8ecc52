"""What ELM (methods/elm.py) compares against, computed once in `prepare` from the starting
model, without a second copy of it: per forget item the guided next-token targets of the erasure
term (top-k token ids and their probabilities), per retain item the starting model's greedy next
tokens, and per forget item the guided continuation the fluency term trains on.

Each item's concept prefixes (and its bridge sentence) are drawn once from
`numpy.random.default_rng([seed, item])`: the same on resume, whatever the order of the items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kuda_cli.evaluate.scoring import left_padded, right_padded
from kuda_cli.locate.restore import cache_keyword, returned_cache
from kuda_cli.unlearn.batches import TokenSet


@dataclass(frozen=True)
class ItemPrompts:
    """One forget item's expert and novice prefixes and fluency bridge, concept filled in."""

    expert: str
    novice: str
    bridge: str


def item_prompts(cfg, concept: str, items: list[int], seed: int) -> dict[int, ItemPrompts]:
    """Each item's prefixes (each followed by a newline, as the reference's end), drawn from
    the schema's lists by (seed, item)."""
    out = {}
    for item in dict.fromkeys(items):
        rng = np.random.default_rng([seed, item])
        expert, novice, bridge = (
            options[int(rng.integers(len(options)))]
            for options in (cfg.expert_prefixes, cfg.novice_prefixes, cfg.fluency_bridges)
        )
        out[item] = ItemPrompts(
            expert.replace("{concept}", concept) + "\n",
            novice.replace("{concept}", concept) + "\n",
            bridge,
        )
    return out


def prefixed(ids: list[int], prefix: list[int], bos: int | None) -> list[int]:
    """`prefix` before the text `ids`, after the text's beginning-of-sequence token if it has
    one (as tokenising the prefix and the text as one string does)."""
    if bos is not None and ids and ids[0] == bos:
        return [bos, *prefix, *ids[1:]]
    return [*prefix, *ids]


def guided_scores(
    orig: torch.Tensor,
    expert: torch.Tensor,
    novice: torch.Tensor,
    eta_start: float,
    eta: float,
    temperature: float,
) -> torch.Tensor:
    """(n, vocab) logits at a text's n positions without, with the expert and with the novice
    prefix -> log p(x) - eta_t (log p(x | expert) - log p(x | novice)), each log-softmax taken at
    `temperature`, eta_t rising linearly from `eta_start` at the first position to `eta` at the
    last (float32)."""
    logp = [t.float().div(temperature).log_softmax(-1) for t in (orig, expert, novice)]
    etas = torch.linspace(eta_start, eta, orig.shape[0], device=orig.device)[:, None]
    return logp[0] - etas * (logp[1] - logp[2])


def sparse_target(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over each row's `top_k` largest scores (every other token: probability 0), as
    (token ids, probabilities), both (n, k) on the CPU."""
    values, ids = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    return ids.cpu(), values.softmax(-1).cpu()


def _chunks(tokens: TokenSet, items: list[int], size: int) -> list[list[int]]:
    order = sorted(dict.fromkeys(items), key=lambda i: len(tokens.ids[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def _logits(model, rows: list[list[int]], pad: int, device) -> torch.Tensor:
    ids, mask = right_padded(rows, pad)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


@torch.no_grad()
def erase_targets(
    model, tokenizer, tokens: TokenSet, items: list[int], prompts: dict, cfg
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Item -> the sparse guided target (`sparse_target`) at each of its token positions."""
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    out = {}
    for chunk in tqdm(_chunks(tokens, items, cfg.batch_size), desc="ELM targets", unit="batch"):
        texts = [tokens.ids[i] for i in chunk]
        heads = {
            side: [
                tokenizer(getattr(prompts[i], side), add_special_tokens=False)["input_ids"]
                for i in chunk
            ]
            for side in ("expert", "novice")
        }
        orig = _logits(model, texts, tokens.pad_id, device)
        expert = _logits(
            model,
            [prefixed(t, h, bos) for t, h in zip(texts, heads["expert"], strict=True)],
            tokens.pad_id,
            device,
        )
        novice = _logits(
            model,
            [prefixed(t, h, bos) for t, h in zip(texts, heads["novice"], strict=True)],
            tokens.pad_id,
            device,
        )
        for row, item in enumerate(chunk):
            n, e, v = len(texts[row]), len(heads["expert"][row]), len(heads["novice"][row])
            scores = guided_scores(
                orig[row, :n],
                expert[row, e : e + n],
                novice[row, v : v + n],
                cfg.eta_start,
                cfg.eta,
                cfg.temperature,
            )
            out[item] = sparse_target(scores, cfg.top_k)
    return out


@torch.no_grad()
def greedy_tokens(model, tokens: TokenSet, items: list[int], batch_size: int) -> dict[int, list]:
    """Item -> the starting model's most likely next token at each of its positions."""
    device = next(model.parameters()).device
    out = {}
    for chunk in tqdm(_chunks(tokens, items, batch_size), desc="ELM retain tokens", unit="batch"):
        logits = _logits(model, [tokens.ids[i] for i in chunk], tokens.pad_id, device)
        for row, item in enumerate(chunk):
            out[item] = logits[row, : len(tokens.ids[item])].argmax(-1).tolist()
    return out


def _stop_tokens(model) -> set:
    eos = getattr(model.config, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos])


@torch.no_grad()
def guided_continuations(
    model, streams: list[tuple[list[int], list[int], list[int]]], cfg, generators, pad: int
) -> list[list[int]]:
    """Per (prompt, expert, novice) row of `streams`: up to `cfg.fluency_tokens` tokens sampled
    after the prompt from log p(. | prompt) - fluency_gamma (log p(. | expert) - log p(. |
    novice)), the two guiding contexts being the prefixes alone followed by the tokens sampled
    so far, top-k 50 as `generate`'s default, from the row's own generator; a row stops at the
    end-of-sequence token. The 3 x rows contexts decode together, left-padded: a row samples
    the same tokens in any batch."""
    device = next(model.parameters()).device
    eos, keyword, n = _stop_tokens(model), cache_keyword(model), len(streams)
    ids, mask = (t.to(device) for t in left_padded([s[k] for k in range(3) for s in streams], pad))
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # from 0 at each row's first token; padding 0
    state = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    out: list[list[int]] = [[] for _ in streams]
    active = list(range(n))
    for step in range(cfg.fluency_tokens):
        main, exp, nov = state.logits[:, -1].float().log_softmax(-1).view(3, n, -1)
        values, top = (main - cfg.fluency_gamma * (exp - nov)).topk(min(50, main.shape[-1]))
        probs, top = values.softmax(-1).cpu(), top.cpu()
        tokens = torch.full((n,), pad, dtype=torch.long)
        for row in list(active):
            token = int(top[row, int(torch.multinomial(probs[row], 1, generator=generators[row]))])
            if token in eos:
                active.remove(row)
                continue
            out[row].append(token)
            tokens[row] = token
        if not active or step == cfg.fluency_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(3 * n, 1)], dim=1)
        positions = positions[:, -1:] + 1
        state = model(
            input_ids=tokens.repeat(3)[:, None].to(device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{keyword: returned_cache(state)},
        )
    return out


def item_generator(seed: int, item: int) -> torch.Generator:
    """The generator forget item `item`'s continuation is sampled from: seeded by (seed, item)."""
    return torch.Generator().manual_seed(
        int(np.random.default_rng([seed, item, 1]).integers(2**62))
    )


def fluency_sequences(
    model,
    tokenizer,
    tokens: TokenSet,
    items: list[int],
    prompts: dict,
    cfg,
    seed: int,
    batch_size: int,
) -> dict[int, tuple[list[int], int]]:
    """Item -> (its text, ". " and its bridge sentence, the guided continuation; where the
    trained tokens start), `batch_size` items decoded together. Each item samples from its own
    generator, seeded by (seed, item): the same continuation in any batch and order."""
    out = {}
    for chunk in tqdm(_chunks(tokens, items, batch_size), desc="ELM continuations", unit="batch"):
        heads, streams, generators = [], [], []
        for item in chunk:
            p = prompts[item]
            bridge = tokenizer(f". {p.bridge} ", add_special_tokens=False)["input_ids"]
            guides = [tokenizer(s.rstrip().rstrip(":"))["input_ids"] for s in (p.expert, p.novice)]
            heads.append(tokens.ids[item] + bridge)
            streams.append((heads[-1], *guides))
            generators.append(item_generator(seed, item))
        sampled = guided_continuations(model, streams, cfg, generators, tokens.pad_id)
        for item, head, z in zip(chunk, heads, sampled, strict=True):
            out[item] = (head + z, len(tokens.ids[item]))
    return out
