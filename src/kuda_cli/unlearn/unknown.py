"""KUDA's invented-subject target (`unlearn.target=unknown`): what the starting model writes at
the last token of each subject mention when an invented name stands in the subject's place: an
entity it never learned. Subject mentions are the runs of focused tokens of a TokenSet."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from kuda_cli.errors import UserError
from kuda_cli.unlearn.batches import TokenSet
from kuda_cli.unlearn.representations import RepresentationStore, record_sites

log = logging.getLogger(__name__)


def spans_of(row: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each run of 1s in `row`."""
    spans, start = [], None
    for i, flag in enumerate([*row, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


SYLLABLES = ("ka lo mi ra ve tu no shi bel dor fen gar lin mor pel quin sar tor vas zen").split()


def invented_name(rng: np.random.Generator) -> str:
    """A pronounceable name that names nothing (two or three syllables)."""
    return "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))


def spelled_like(mention: str, name: str) -> str:
    """`name` spelled as `mention` is: a capital where it has one, its leading space."""
    spelled = name.capitalize() if mention.strip()[:1].isupper() else name
    return " " + spelled if mention[:1].isspace() else spelled


def with_invented_subject(
    ids: list[int], focus: list[int], tokenizer, name: str
) -> tuple[list[int], list[int], list[int]] | None:
    """`ids` with every subject mention (a run of focused tokens) replaced by `name`, spelled as
    the mention is (leading space, capital), and for each mention the position of its last
    token in `ids` and of the name's last token in the result. None where no token or every
    token is focused (no subject was found in the text)."""
    spans = spans_of(focus)
    if not spans or all(focus):
        return None
    out, original, replaced, cursor = [], [], [], 0
    for start, stop in spans:
        spelled = spelled_like(tokenizer.decode(ids[start:stop]), name)
        out += ids[cursor:start]
        out += tokenizer(spelled, add_special_tokens=False)["input_ids"]
        cursor = stop
        original.append(stop - 1)
        replaced.append(len(out) - 1)
    out += ids[cursor:]
    return out, original, replaced


def unknown_targets(ctx, originals: RepresentationStore, sites: list[str], count: int) -> dict:
    """Per forget item: the positions of its subject mentions' last tokens, what the starting
    model writes at each site there for `count` invented names put in the subject's place
    (averaged), and the squared distance of the original (`originals`) from that target. `ctx`:
    the method's context (model, tokenizer, forget texts and the items used, seed)."""
    if ctx.forget.focus is None:
        raise UserError(
            "unlearn.target=unknown needs data that names subjects (data=facts); "
            "use unlearn.target=away"
        )
    rng = np.random.default_rng([ctx.seed, 7])
    names = [invented_name(rng) for _ in range(count)]
    used = sorted(set(ctx.forget_used))
    rows, where = [], []
    for index in used:
        for k, name in enumerate(names):
            swapped = with_invented_subject(
                ctx.forget.ids[index], ctx.forget.focus[index], ctx.tokenizer, name
            )
            if swapped is None:
                continue
            ids, original, replaced = swapped
            rows.append(ids)
            where.append((index, k, original, replaced))
    if not rows:
        raise UserError(
            "unlearn.target=unknown found no subject mention in the forget texts; "
            "use unlearn.target=away"
        )
    swapped_set = TokenSet(rows, ctx.forget.pad_id)
    store = RepresentationStore("memory")
    record_sites(
        ctx.model,
        swapped_set,
        list(range(len(rows))),
        sites,
        store,
        desc="invented-subject targets",
    )
    sums: dict[int, dict[str, torch.Tensor]] = {}
    counts: dict[int, int] = {}
    positions: dict[int, list[int]] = {}
    for row, (index, _, original, replaced) in enumerate(where):
        positions[index] = original
        counts[index] = counts.get(index, 0) + 1
        acc = sums.setdefault(index, {})
        for site in sites:
            value = store.get(row, site)[replaced].float()
            acc[site] = acc[site] + value if site in acc else value
    out = {}
    for index, acc in sums.items():
        pos = torch.tensor(positions[index])
        targets = {site: acc[site] / counts[index] for site in sites}
        scale = {
            site: ((originals.get(index, site)[pos].float() - targets[site]) ** 2)
            .sum(-1)
            .clamp_min(1e-8)
            for site in sites
        }
        out[index] = (pos, targets, scale)
    store.close()
    log.info("unknown targets: %d forget texts, names %s", len(out), ", ".join(names))
    return out


def unknown_loss(
    targets: dict,
    originals: RepresentationStore,
    forget: dict,
    rec,
    sites: dict[int, str],
    terms: dict,
) -> torch.Tensor:
    """Mean over subject mentions and sites of the squared distance to the invented-subject
    target, relative to the original's (1 at the start, 0 at the target)."""
    total, count = None, 0
    for layer, site in sites.items():
        output = rec[site].output
        layer_sum, layer_count, cos_sum = None, 0, 0.0
        for r, index in enumerate(forget["index"]):
            if index not in targets:
                continue
            pos, target, scale = targets[index]
            pos = pos.to(output.device)
            h = output[r, pos].float()
            part = (((h - target[site].to(h.device)) ** 2).sum(-1) / scale[site].to(h.device)).sum()
            layer_sum = part if layer_sum is None else layer_sum + part
            layer_count += len(pos)
            h0 = originals.get(index, site)[pos.cpu()].float().to(h.device)
            cos_sum += float(F.cosine_similarity(h.detach(), h0, dim=-1).sum())
        if layer_sum is None:
            continue
        total = layer_sum / layer_count if total is None else total + layer_sum / layer_count
        count += 1
        terms[f"cos_l{layer}"] = cos_sum / layer_count
    if total is None:
        return torch.zeros((), device=forget["input_ids"].device, requires_grad=True)
    return total / count
