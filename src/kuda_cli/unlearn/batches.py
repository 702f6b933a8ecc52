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

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> dict:
        """Right-padded `input_ids`, `attention_mask`, and the items' `index`."""
        input_ids, mask = right_padded([self.ids[i] for i in indices], self.pad_id)
        out = {
            "input_ids": input_ids.to(device),
            "attention_mask": mask.to(device),
            "index": list(indices),
        }
        if self.focus is not None:
            focus = torch.zeros_like(mask)
            for r, i in enumerate(indices):
                focus[r, : len(self.focus[i])] = torch.tensor(self.focus[i])
            out["focus_mask"] = focus.to(device)
        return out


def tokenize(
    tokenizer,
    texts: list[str],
    max_length: int,
    what: str,
    spans: list[list[tuple[int, int]]] | None = None,
) -> TokenSet:
    """Tokenise `texts`; with character `spans` per text, also mark the tokens that overlap
    them (`focus`). A text whose spans cover no token is focused on every token. Slow
    tokenizers give no offsets: no focus then."""
    if spans is not None and not getattr(tokenizer, "is_fast", False):
        log.warning("the %s texts' subject tokens are unknown (slow tokenizer)", what)
        spans = None
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=spans is not None,
    )
    keep = [i for i, row in enumerate(enc["input_ids"]) if len(row) > 1]
    if not keep:
        raise UserError(f"the {what} texts are empty after tokenisation; check the data options")
    ids = [list(enc["input_ids"][i]) for i in keep]
    focus = None
    if spans is not None:
        focus = []
        for i in keep:
            row = [
                int(any(start < end_ and stop > start_ for start_, end_ in spans[i]))
                for start, stop in enc["offset_mapping"][i]
            ]
            focus.append(row if any(row) else [1] * len(row))
    return TokenSet(ids=ids, pad_id=pad_id(tokenizer), focus=focus)


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
