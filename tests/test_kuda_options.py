"""KUDA's loss restricted to the subject's tokens (unlearn.tokens)."""

import pytest

from kuda_cli.errors import UserError
from kuda_cli.unlearn.batches import subject_spans, tokenize
from test_unlearn import FORGET, kuda_method, site_grad

SUBJECTS = ["hydrogen", "oxygen", "sodium", "iron"]


def test_subject_spans_find_every_occurrence_in_any_case():
    assert subject_spans("Iron is iron; IRON.", "iron") == [(0, 4), (8, 12), (14, 18)]
    assert subject_spans("nothing here", "iron") == []


def test_tokenize_marks_the_subject_tokens(tiny):
    _, tokenizer = tiny
    texts = FORGET + ["No element is named in this one."]
    spans = [subject_spans(t, s) for t, s in zip(texts, SUBJECTS + ["gold"], strict=True)]
    tokens = tokenize(tokenizer, texts, 64, "forget", spans)
    for ids, focus, text, subject in zip(tokens.ids, tokens.focus, texts, SUBJECTS, strict=False):
        marked = tokenizer.decode([i for i, f in zip(ids, focus, strict=True) if f])
        assert marked.strip().lower() == subject, text
        assert 0 < sum(focus) < len(ids)
    assert all(tokens.focus[-1])  # no subject in the text: every token counts
    batch = tokens.batch([0, 1])
    assert batch["focus_mask"].shape == batch["attention_mask"].shape
    assert (batch["focus_mask"] <= batch["attention_mask"]).all()


def _subject_method(model, tokenizer, tokens):
    method, cfg, _, _ = kuda_method(model, tokenizer, tokens=tokens)
    spans = [subject_spans(t, s) for t, s in zip(FORGET, SUBJECTS, strict=True)]
    method.ctx.forget = tokenize(tokenizer, FORGET, 64, "forget", spans)
    return method


def _site_grad(method, batch):
    return site_grad(method, batch)[1].abs().amax(-1)


@pytest.mark.parametrize("tokens", ["subject", "auto"])
def test_subject_loss_has_no_gradient_outside_the_subject(tiny, tokens):
    model, tokenizer = tiny
    method = _subject_method(model, tokenizer, tokens)
    method.prepare()
    method.initialise(method.trainable_parameters(), None)
    batch = method.ctx.forget.batch([0, 2])
    grad = _site_grad(method, batch)
    subject = batch["focus_mask"].bool()
    assert grad[~subject].max().item() == 0.0
    assert grad[subject].min().item() > 0.0


def test_all_tokens_loss_reads_every_token(tiny):
    model, tokenizer = tiny
    method = _subject_method(model, tokenizer, "all")
    method.prepare()
    method.initialise(method.trainable_parameters(), None)
    batch = method.ctx.forget.batch([0, 2])
    grad = _site_grad(method, batch)
    real = batch["attention_mask"].bool()
    assert grad[real & ~batch["focus_mask"].bool()].min().item() > 0.0


def test_subject_loss_without_subjects_is_refused(tiny):
    model, tokenizer = tiny
    method, _, forget, _ = kuda_method(model, tokenizer, tokens="subject")  # no spans given
    method.prepare()
    with pytest.raises(UserError, match="unlearn.tokens=all"):
        method.loss(forget.batch([0, 1]), None)
