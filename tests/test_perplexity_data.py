"""Perplexity is the exponential of the mean next-token NLL, whatever the batching; text sets
load from the built-in files and from local JSONL, JSON, parquet, txt files and directories."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from kuda_cli.data.texts import load_texts, read_records
from kuda_cli.errors import UserError
from kuda_cli.evaluate.metrics.perplexity import perplexity

TEXTS = [
    "The Nile flows north.",
    "Water boils at one hundred degrees at sea level, mostly.",
    "Bees make honey.",
    "A violin has four strings tuned in fifths.",
]


def reference_nll(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    return nll.item(), ids.shape[1] - 1


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_batched_perplexity_equals_token_weighted_unbatched(tiny, batch_size):
    model, tokenizer = tiny
    total, count = 0.0, 0
    for text in TEXTS:
        nll, n = reference_nll(model, tokenizer, text)
        total, count = total + nll, count + n
    result = perplexity(model, tokenizer, TEXTS, batch_size=batch_size)
    assert result["tokens"] == count and result["texts"] == len(TEXTS)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_truncation_limits_tokens(tiny):
    model, tokenizer = tiny
    result = perplexity(model, tokenizer, TEXTS, max_length=8)
    assert result["tokens"] == len(TEXTS) * 7


def test_builtin_general_text_set():
    texts = load_texts(source="builtin", builtin="general")
    assert len(texts) >= 30 and all(len(t) > 80 for t in texts)
    assert len(load_texts(source="builtin", max_items=5)) == 5
    with pytest.raises(UserError, match="built-in sets: general"):
        load_texts(source="builtin", builtin="nope")


def test_local_files_of_every_format(tmp_path):
    records = [{"text": t, "n": i} for i, t in enumerate(TEXTS)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(TEXTS))
    for name in ("a.jsonl", "b.json", "c.parquet", "d.txt"):
        assert load_texts(source="path", path=str(tmp_path / name)) == TEXTS
    assert read_records(tmp_path) == [*records, *records, *records, *({"text": t} for t in TEXTS)]


def test_bad_local_sources_say_what_to_do(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no field 'text'.*body"):
        load_texts(source="path", path=str(tmp_path / "a.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_texts(source="path", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="needs a path"):
        load_texts(source="path")


def test_unreachable_hub_dataset_names_the_local_fallback():
    with pytest.raises(UserError, match="kuda-test/none.*path="):
        load_texts(source="hub", hub_id="kuda-test/none")


def test_gated_hub_dataset_says_how_to_get_access(monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise OSError("401 Client Error: this dataset is gated, you must be authenticated")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(UserError, match="gated: request access on the hub and log in.*path="):
        load_texts(source="hub", hub_id="cais/wmdp-bio-forget-corpus")
