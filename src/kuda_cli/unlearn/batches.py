"""The texts a method unlearns and protects, tokenised, and the batches the trainer feeds it.

The batch of step s is a function of (seed, s) alone: every epoch is a permutation drawn from
`numpy.random.default_rng([seed, epoch])`, so a resumed run sees exactly the batches an
uninterrupted run would, without saving any sampler state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from kuda_cli.data.kinds import UnlearnTexts, kind_of
from kuda_cli.errors import UserError
from kuda_cli.evaluate.scoring import pad_id, right_padded

log = logging.getLogger(__name__)


@dataclass
class TokenSet:
    """Tokenised texts (no padding), each at most `max_length` tokens."""

    ids: list[list[int]]
    pad_id: int
    # per token, 1 where it belongs to a subject span (None: the data names no subjects)
    focus: list[list[int]] | None = None
    # per token, 1 where its prediction counts in a loss: the answer's tokens, where the data has
    # prompts (None: every token's)
    label_mask: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> dict:
        """Right-padded `input_ids`, `attention_mask`, and the items' `index`; `focus_mask` and
        `label_mask` (0 at padding) where the set has them."""
        input_ids, mask = right_padded([self.ids[i] for i in indices], self.pad_id)
        out = {
            "input_ids": input_ids.to(device),
            "attention_mask": mask.to(device),
            "index": list(indices),
        }
        # a focus or label row has a value per token: padded as the ids, to the mask's width
        for key, rows in (("focus_mask", self.focus), ("label_mask", self.label_mask)):
            if rows is not None:
                out[key] = right_padded([rows[i] for i in indices], 0)[0].to(device)
        return out


def tokenize(
    tokenizer,
    texts: list[str],
    max_length: int,
    what: str,
    spans: list[list[tuple[int, int]]] | None = None,
    answer_starts: list[int] | None = None,
) -> TokenSet:
    """Tokenise `texts`; with character `spans` per text, also mark the tokens that overlap
    them (`focus`); with `answer_starts` (a character offset per text), the tokens that start
    there or later (`label_mask`). A text whose spans cover no token is focused on every token,
    and one whose answer has no token (cut by `max_length`) counts every token. Slow tokenizers
    give no offsets: no focus and no label mask then."""
    if not getattr(tokenizer, "is_fast", False):
        for name, given in (("subject", spans), ("answer", answer_starts)):
            if given is not None:
                log.warning("the %s texts' %s tokens are unknown (slow tokenizer)", what, name)
        spans = answer_starts = None
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=spans is not None or answer_starts is not None,
    )
    keep = [i for i, row in enumerate(enc["input_ids"]) if len(row) > 1]
    if not keep:
        raise UserError(f"the {what} texts are empty after tokenisation; check the data options")
    ids = [list(enc["input_ids"][i]) for i in keep]
    offsets = enc["offset_mapping"] if "offset_mapping" in enc else None
    focus = None
    if spans is not None:
        focus = []
        for i in keep:
            row = [
                int(any(start < end_ and stop > start_ for start_, end_ in spans[i]))
                for start, stop in offsets[i]
            ]
            focus.append(row if any(row) else [1] * len(row))
    label_mask = None
    if answer_starts is not None:
        label_mask = [answer_tokens(offsets[i], answer_starts[i]) for i in keep]
        cut = [r for r, row in enumerate(label_mask) if not any(row)]
        for r in cut:
            label_mask[r] = [1] * len(label_mask[r])
        if cut:
            log.info(
                "%d of the %s texts have no answer token within unlearn.max_length=%d: every "
                "token of theirs counts",
                len(cut),
                what,
                max_length,
            )
    return TokenSet(ids=ids, pad_id=pad_id(tokenizer), focus=focus, label_mask=label_mask)


def answer_tokens(offsets: list[tuple[int, int]], start: int) -> list[int]:
    """Per token (its character offsets), 1 where it starts at `start` or later."""
    return [int(first >= start) for first, _ in offsets]


@lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Item indices of micro-batch `micro_step`: consecutive slices of per-epoch permutations."""
    out = []
    for position in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(int(epoch_order(n, seed, epoch)[offset]))
    return out


def unlearn_texts(data_cfg) -> UnlearnTexts:
    """Forget/retain texts for the data group, as its kind gives them."""
    return kind_of(data_cfg).unlearn_texts(data_cfg)
