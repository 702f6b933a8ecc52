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

from kuda_cli.evaluate.scoring import right_padded
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


@torch.no_grad()
def guided_continuation(
    model, prompt: list[int], expert: list[int], novice: list[int], cfg, generator
) -> list[int]:
    """Up to `cfg.fluency_tokens` tokens sampled after `prompt` from
    log p(. | prompt) - fluency_gamma (log p(. | expert) - log p(. | novice)), the two guiding
    contexts being the prefixes alone followed by the tokens sampled so far, top-k 50 as
    `generate`'s default; stops at the end-of-sequence token."""
    device = next(model.parameters()).device
    eos = getattr(model.config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [eos])
    keyword = cache_keyword(model)
    states = [
        model(input_ids=torch.tensor([s], device=device), use_cache=True)
        for s in (prompt, expert, novice)
    ]
    out: list[int] = []
    for _ in range(cfg.fluency_tokens):
        main, exp, nov = (s.logits[0, -1].float().log_softmax(-1) for s in states)
        scores = main - cfg.fluency_gamma * (exp - nov)
        values, ids = scores.topk(min(50, scores.shape[-1]))
        pick = torch.multinomial(values.softmax(-1).cpu(), 1, generator=generator)
        token = int(ids[int(pick)])
        if token in eos:
            break
        out.append(token)
        step = torch.tensor([[token]], device=device)
        states = [
            model(input_ids=step, use_cache=True, **{keyword: returned_cache(s)}) for s in states
        ]
    return out


def fluency_sequences(
    model, tokenizer, tokens: TokenSet, items: list[int], prompts: dict, cfg, seed: int
) -> dict[int, tuple[list[int], int]]:
    """Item -> (its text, ". " and its bridge sentence, the guided continuation; where the
    trained tokens start)."""
    out = {}
    for item in tqdm(list(dict.fromkeys(items)), desc="ELM continuations", unit="item"):
        p = prompts[item]
        text = tokens.ids[item]
        bridge = tokenizer(f". {p.bridge} ", add_special_tokens=False)["input_ids"]
        guides = [tokenizer(s.rstrip().rstrip(":"))["input_ids"] for s in (p.expert, p.novice)]
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([seed, item, 1]).integers(2**62))
        )
        sampled = guided_continuation(model, text + bridge, *guides, cfg, generator)
        out[item] = (text + bridge + sampled, len(text))
    return out
