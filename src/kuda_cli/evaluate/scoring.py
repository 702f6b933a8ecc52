"""Running a model for evaluation, batched: per-token log-probabilities of texts, summed
log-likelihoods of continuations, and greedy generation. Perplexity, the knowledge set, fluency
and MUSE are built on these."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Dropout off while scoring, and the caller's train/eval mode given back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _padding(tokenizer, side: str) -> Iterator[None]:
    """Pad on `side`, falling back to EOS as pad token for tokenizers without one (Llama); the
    tokenizer's settings are restored so callers see no side effect."""
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = side
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None


def pad_id(tokenizer) -> int:
    """The id that fills padded positions (masked out, so any valid id would do)."""
    return next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)


def right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token id rows, right-padded with `pad` to the longest."""
    return _padded(rows, pad, left=False)


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token id rows, left-padded with `pad` to the longest."""
    return _padded(rows, pad, left=True)


def _padded(rows: Sequence[Sequence[int]], pad: int, left: bool) -> tuple[torch.Tensor, ...]:
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(rows):
        at = slice(ids.shape[1] - len(seq), None) if left else slice(0, len(seq))
        ids[row, at] = torch.tensor(seq, dtype=torch.long)
        mask[row, at] = 1
    return ids, mask


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by length, so each batch carries little padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def text_logits(
    model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int, desc: str
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, list[int]]]:
    """Per batch of `texts` (grouped by length, right-padded, cut to `max_length` tokens): the
    texts' indices, the logits, the input ids and each row's length in tokens."""
    device = next(model.parameters()).device
    with _eval_mode(model), _padding(tokenizer, "right"):
        for batch in tqdm(_batches(list(map(len, texts)), batch_size), desc=desc, unit="batch"):
            enc = tokenizer(
                [texts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            logits = model(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False
            ).logits
            yield batch, logits, enc.input_ids, enc.attention_mask.sum(-1).tolist()


@torch.no_grad()
def token_logprobs(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 2048,
    batch_size: int = 4,
    desc: str = "token log-probs",
) -> list[torch.Tensor]:
    """Per text, log p(token_t | tokens_<t) for t >= 1 (the first token has no prefix), as a
    float32 CPU tensor without padding. Texts longer than `max_length` tokens are truncated."""
    out: list[torch.Tensor | None] = [None] * len(texts)
    for batch, logits, ids, lengths in text_logits(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, desc=desc
    ):
        logits = logits[:, :-1].float()
        targets = ids[:, 1:]
        # logit(target) - logsumexp avoids materialising a second vocab-sized tensor.
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logprobs = (picked - logits.logsumexp(-1)).cpu()
        for row, i in enumerate(batch):
            out[i] = logprobs[row, : max(int(lengths[row]) - 1, 0)].clone()
    return out  # type: ignore[return-value]


@torch.no_grad()
def greedy_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 4,
    desc: str = "generate",
    stop_strings: Sequence[str] | None = None,
) -> list[str]:
    """Greedy continuation of each prompt, prompt removed, special tokens dropped. Left padding
    keeps every prompt's last token next to the generated ones, so batching does not change
    what is generated. A sequence ends early at any of `stop_strings` (kept in the text)."""
    stop = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    with _eval_mode(model), _padding(tokenizer, "left"):
        for batch in tqdm(_batches(list(map(len, prompts)), batch_size), desc=desc, unit="batch"):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(
                device
            )
            generated = model.generate(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **stop,
            )
            new_tokens = generated[:, enc.input_ids.shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                out[i] = text
    return out


@torch.no_grad()
def continuation_logprobs(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    desc: str = "scoring",
) -> list[tuple[float, int]]:
    """(sum of log P(continuation | context), number of continuation tokens) per pair.

    The context is encoded as the tokenizer does by default (BOS where the model uses one) and
    the continuation without special tokens, then concatenated: the continuation's tokens are the
    same whatever the context, as in lm-eval's loglikelihood requests.
    """
    scored = _score_continuations(model, tokenizer, pairs, batch_size=batch_size, desc=desc)
    return [(total, n) for total, n, _ in scored]


@torch.no_grad()
def continuation_top1(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    desc: str = "top-1 agreement",
) -> list[float]:
    """Per (context, continuation): the share of the continuation's tokens that are the model's
    most likely next token given the context and the continuation's earlier tokens (teacher
    forcing, so one early change does not decide every later token; EasyEdit's locality).
    Encoded as in `continuation_logprobs`."""
    scored = _score_continuations(model, tokenizer, pairs, batch_size=batch_size, desc=desc)
    return [hits / n for _, n, hits in scored]


def _score_continuations(
    model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int, desc: str
) -> list[tuple[float, int, int]]:
    """(summed log-probability, tokens, tokens that are the top-1 prediction) per pair."""
    encoded = [encoded_pair(tokenizer, context, continuation) for context, continuation in pairs]
    results: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(pairs)
    found = continuation_logits(model, encoded, pad_id(tokenizer), batch_size=batch_size, desc=desc)
    for i, logits, tokens in found:
        total, hits = _picked(logits, tokens)
        results[i] = (total, len(tokens), hits)
    return results


def encoded_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(the context's tokens, encoded as the tokenizer does by default: BOS where the model uses
    one; the continuation's, without special tokens): the continuation's tokens are the same
    whatever the context, as in lm-eval's loglikelihood requests."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"empty continuation after {context!r}")
    return ctx, cont


def continuation_logits(
    model, encoded: list[tuple[list[int], list[int]]], pad: int, *, batch_size: int, desc: str
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per encoded (context, continuation), in right-padded batches grouped by length: its index,
    the logits that predict each continuation token (one row per token) and those tokens.
    Logits are computed only from the earliest position a batch's rows need (a context's last
    token) on, not for every context."""
    device = _device(model)
    batches = _batches([len(ctx) + len(cont) for ctx, cont in encoded], batch_size)
    with _eval_mode(model):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=len(batches) < 2):
            ids, mask = right_padded([encoded[i][0] + encoded[i][1] for i in batch], pad)
            first = min(len(encoded[i][0]) for i in batch) - 1
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            logits = _logits_from(model, first, **inputs)
            for row, i in enumerate(batch):
                ctx, cont = encoded[i]
                at = slice(len(ctx) - 1 - first, len(ctx) + len(cont) - 1 - first)
                yield i, logits[row, at], torch.tensor(cont, device=device)


def _logits_from(model, first: int, **inputs) -> torch.Tensor:
    """The model's logits at positions `first`.. of its inputs (index 0 is position `first`):
    the output head runs only where a score is read (`logits_to_keep`, for models that take
    it), and no key-value cache is built."""
    if not _takes_logits_to_keep(model):
        return model(**inputs, use_cache=False).logits[:, first:]
    width = inputs["input_ids"].shape[1]
    return model(**inputs, use_cache=False, logits_to_keep=width - first).logits


def _takes_logits_to_keep(model) -> bool:
    """Whether the causal LM under `model` (itself, or a PEFT wrapper's base) names
    `logits_to_keep` in its forward, as transformers' decoder-only models do."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _picked(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed log-probability of `targets` under `logits` (one row per target) and how many
    are the top-1 prediction, normalising only the rows read."""
    logits = logits.float()
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return logprobs.sum().item(), int((logits.argmax(-1) == targets).sum())


@torch.no_grad()
def option_logprobs(
    model,
    tokenizer,
    groups: list[tuple[str, list[str]]],
    *,
    batch_size: int = 16,
    desc: str = "scoring options",
) -> list[list[tuple[float, int]]]:
    """For each (context, options): (summed log P(option | context), tokens) per option, the
    options scored over ONE copy of the shared context.

    Each group is packed as context + option 1 + ... + option K in one row, with a 4D attention
    mask in which an option sees the context and its own earlier tokens only, and position ids
    that restart after the context for every option: each option is scored exactly as if it
    followed the context alone (what `continuation_logprobs` computes), for far fewer tokens.
    """
    scored = option_scores(model, tokenizer, groups, batch_size=batch_size, desc=desc)
    return [[(total, n) for total, n, _ in options] for options in scored]


@torch.no_grad()
def option_scores(
    model,
    tokenizer,
    groups: list[tuple[str, list[str]]],
    *,
    batch_size: int = 16,
    desc: str = "scoring options",
) -> list[list[tuple[float, int, int]]]:
    """`option_logprobs` with, per option, how many of its tokens are the top-1 prediction
    given the context and the option's earlier tokens (`continuation_top1`'s count): a
    teacher-forced continuation packed as one more option costs one forward pass, not two."""
    device = _device(model)
    packed = []
    for context, options in groups:
        ctx = tokenizer(context)["input_ids"]
        conts = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        if not all(conts):
            raise ValueError(f"an empty option after {context!r}")
        packed.append((ctx, conts))
    pad = pad_id(tokenizer)
    results: list[list[tuple[float, int, int]]] = [[] for _ in groups]
    batches = _batches([len(c) + sum(map(len, o)) for c, o in packed], batch_size)
    with _eval_mode(model):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=len(batches) < 2):
            for i, scores in zip(
                batch, _score_packed(model, [packed[i] for i in batch], pad, device), strict=True
            ):
                results[i] = scores
    return results


def _score_packed(model, packed, pad: int, device) -> list[list[tuple[float, int, int]]]:
    width = max(len(ctx) + sum(map(len, conts)) for ctx, conts in packed)
    rows = len(packed)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    allowed = torch.zeros((rows, width, width), dtype=torch.bool)
    spans = []  # per row: (start, length) of each option
    for row, (ctx, conts) in enumerate(packed):
        m = len(ctx)
        ids[row, :m] = torch.tensor(ctx)
        positions[row, :m] = torch.arange(m)
        allowed[row, :m, :m] = torch.ones(m, m, dtype=torch.bool).tril()
        start, row_spans = m, []
        for cont in conts:
            n = len(cont)
            ids[row, start : start + n] = torch.tensor(cont)
            positions[row, start : start + n] = torch.arange(m, m + n)
            allowed[row, start : start + n, :m] = True
            allowed[row, start : start + n, start : start + n] = torch.ones(n, n).tril().bool()
            row_spans.append((start, n))
            start += n
        allowed[row, start:, start:] = torch.eye(width - start, dtype=torch.bool)  # padding
        spans.append(row_spans)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((rows, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    first = min(len(ctx) for ctx, _ in packed) - 1
    logits = _logits_from(
        model,
        first,
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
    )
    out = []
    for row, (ctx, conts) in enumerate(packed):
        scores = []
        for (start, n), cont in zip(spans[row], conts, strict=True):
            # token j of an option is predicted at the previous token: the context's last for j=0
            at = torch.tensor([len(ctx) - 1] + list(range(start, start + n - 1)), device=device)
            total, hits = _picked(logits[row, at - first], torch.tensor(cont, device=device))
            scores.append((total, n, hits))
        out.append(scores)
    return out
