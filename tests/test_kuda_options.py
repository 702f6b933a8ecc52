"""KUDA's loss restricted to the subject's tokens or their last ones (unlearn.tokens), and its
invented-subject target (unlearn.target=unknown)."""

import pytest

from kuda_cli.data.kinds.facts import subject_spans
from kuda_cli.errors import UserError
from kuda_cli.unlearn.batches import tokenize
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


def test_subject_loss_has_no_gradient_outside_the_subject(tiny):
    model, tokenizer = tiny
    method = _subject_method(model, tokenizer, "subject")
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


def test_last_of_spans_marks_each_mention_s_last_token():
    import torch

    from kuda_cli.unlearn.methods.kuda import last_of_spans
    from kuda_cli.unlearn.unknown import spans_of

    focus = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1, 1]])
    assert last_of_spans(focus).tolist() == [[0, 0, 1, 0, 1, 0, 0, 0, 1]]
    assert spans_of(focus[0].tolist()) == [(1, 3), (4, 5), (6, 9)]
    assert spans_of([0, 0]) == []


@pytest.mark.parametrize("tokens", ["last", "auto"])
def test_last_token_loss_reads_only_each_subject_s_last_token(tiny, tokens):
    from kuda_cli.unlearn.methods.kuda import last_of_spans

    model, tokenizer = tiny
    method = _subject_method(model, tokenizer, tokens)
    method.prepare()
    method.initialise(method.trainable_parameters(), None)
    batch = method.ctx.forget.batch([0, 2])
    grad = _site_grad(method, batch)
    last = last_of_spans(batch["focus_mask"]).bool()
    assert last.sum() < batch["focus_mask"].sum()  # a multi-token subject: fewer tokens read
    assert grad[~last].max().item() == 0.0
    assert grad[last].min().item() > 0.0


def test_invented_subject_replaces_every_mention_spelled_alike(tiny):
    from kuda_cli.unlearn.unknown import with_invented_subject

    _, tokenizer = tiny
    text = "Sodium burns. Salt holds sodium."
    tokens = tokenize(tokenizer, [text], 64, "forget", [subject_spans(text, "sodium")])
    ids, original, replaced = with_invented_subject(
        tokens.ids[0], tokens.focus[0], tokenizer, "kavequin"
    )
    assert tokenizer.decode(ids) == "Kavequin burns. Salt holds kavequin."
    assert len(original) == len(replaced) == 2
    for o in original:  # the last token of each mention of the subject
        assert tokens.focus[0][o] == 1 and (
            o + 1 == len(tokens.ids[0]) or not tokens.focus[0][o + 1]
        )
    assert tokenizer.decode(ids[: replaced[1] + 1]).endswith("kavequin")
    # a text where no subject was found (every token focused) has no substitute
    assert with_invented_subject([5, 6], [1, 1], tokenizer, "kavequin") is None


def test_unknown_target_loss_starts_at_one_and_reaches_zero_at_the_target(tiny):
    model, tokenizer = tiny
    method = _subject_method(model, tokenizer, "auto")
    method.cfg.target = "unknown"
    method.cfg.unknown_names = 2
    method.prepare()
    batch = method.ctx.forget.batch([0, 1, 2, 3])
    loss, _ = method.loss(batch, None)
    assert abs(loss.item() - 1.0) < 1e-4  # the starting model: relative distance 1
    # the gradient reaches the trained layer only through the mentions' last tokens
    grad = _site_grad(method, batch)
    from kuda_cli.unlearn.methods.kuda import last_of_spans

    last = last_of_spans(batch["focus_mask"]).bool()
    assert grad[~last].max().item() == 0.0 and grad[last].abs().max().item() > 0
    # put the targets in place of the outputs at those tokens: the loss is 0
    from kuda_cli.models.hooks import trace

    (site,) = method.sites().values()

    def swap(output):
        output = output.clone()
        for r, index in enumerate(batch["index"]):
            pos, targets, _ = method.unknown[index]
            output[r, pos] = targets[site].to(output.dtype)
        return output

    with trace(model, [], edit={site: swap}):
        at_target, _ = method.loss(batch, None)
    assert at_target.item() < 1e-8


def test_unknown_target_without_subjects_is_refused(tiny):
    model, tokenizer = tiny
    method, _, _, _ = kuda_method(model, tokenizer, target="unknown")  # no spans given
    with pytest.raises(UserError, match="unlearn.target=away"):
        method.prepare()


def _block_output(model, layer, batch):
    """The residual stream after block `layer`, from a plain forward hook, in float64."""
    import torch

    got = {}

    def hook(module, args, output):
        got["h"] = (output[0] if isinstance(output, tuple) else output).double()

    handle = model.model.layers[layer].register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return got["h"]


def test_retain_activation_term_is_rmu_s_retain_mse_at_the_deepest_layer(tiny):
    import torch

    model, tokenizer = tiny
    method, _, forget, retain = kuda_method(model, tokenizer, retain_act_weight=10.0, layers=[0, 1])
    assert method.needs_retain
    method.ctx.retain_used = list(range(len(retain)))
    method.prepare()
    fbatch, rbatch = forget.batch([0, 1]), retain.batch([0, 1])
    mask = rbatch["attention_mask"].double()
    assert (mask == 0).any()  # the second retain text is padded
    original = _block_output(model, 1, rbatch)  # layer 1: the deepest trained one
    loss, terms = method.loss(fbatch, rbatch)
    # the starting model matches its own originals up to float32 rounding: they were recorded
    # in other batches (other padding, another split of the work over threads: 6e-19 with two
    # threads), so not bit for bit; 1e-12 of the mean square is a relative RMS difference of
    # 1e-6, ~10 float32 epsilons
    scale = float((original.pow(2).mean(-1) * mask).sum() / mask.sum())
    assert terms["retain_mse"] <= 1e-12 * scale, (terms["retain_mse"], scale)
    forget_only, _ = method.loss(fbatch, None)  # the diagnostics' forget term: no retain term
    torch.testing.assert_close(loss, forget_only + 10.0 * terms["retain_mse"])
    with torch.no_grad():
        for param in method.trainable_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    loss, terms = method.loss(fbatch, rbatch)
    forget_only, _ = method.loss(fbatch, None)
    # RMU's retain MSE, computed here: mean over the hidden dimension, then over the retain
    # batch's non-padding tokens, of the squared change of block 1's output
    per_token = (_block_output(model, 1, rbatch) - original).pow(2).mean(-1)
    expected = float((per_token * mask).sum() / mask.sum())
    assert expected > 1e-4 * scale  # the noise moved it: the comparison can tell
    assert terms["retain_mse"] == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(loss, forget_only + 10.0 * terms["retain_mse"], rtol=1e-5)
    method.close()
    assert not method.retain_store._memory


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("unlearn.target=unknown", "use unlearn.target=away"),
        ("unlearn.tokens=last", "use unlearn.tokens=auto or all"),
        ("unlearn.tokens=subject", "use unlearn.tokens=auto or all"),
    ],
)
def test_subject_options_on_data_without_subjects_exit_2_before_any_work(
    option, says, capsys, tmp_path, monkeypatch
):
    from kuda_cli import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["unlearn", "model=tiny-random", "data=wmdp_bio", option])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "needs data that names subjects (data=facts), not data=wmdp_bio" in err and says in err
    assert not list(tmp_path.iterdir())  # nothing written
