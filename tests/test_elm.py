"""ELM (`unlearn=elm`, methods/elm.py) against rohitgandikota/erasing-llm's trainscripts/erase.py:
the erasure target equals `get_edit_vector`'s guided distribution, the guided continuation
equals the `ELMLogits` sampling rule, the loss and its gradient equal a hand computation of
`train_elm`'s three terms, the references do not depend on the order of the items (resume) nor
on how many continuations decode together, and `kuda unlearn unlearn=elm` runs end to end on the
tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kuda_cli import cli
from kuda_cli.unlearn.batches import tokenize
from kuda_cli.unlearn.elm_reference import fluency_sequences, guided_continuations, item_prompts
from test_baseline_options import FORGET, RETAIN, gradients, perturb
from test_baselines import TINY, starting_model

from conftest import method_on, read_json


def make(model, tokenizer, forget_used=(0, 1, 2, 3), **overrides):
    settings = {"batch_size": 2, "steps": 2, "concept": "chemistry", "fluency_tokens": 6}
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    context = {"forget_used": list(forget_used), "retain_used": [0, 1, 2], "seed": 3}
    found, _ = method_on(
        "elm", model, tokenizer, forget, retain, context=context, **{**settings, **overrides}
    )
    return found, forget, retain


def reference_edit_vector(model, tokenizer, text, expert, novice, eta, top_k, temperature):
    """erase.py's `get_edit_vector` (action erase, start_eta 1) on one prompt: the softmax over
    the top-k of log p(x) - linspace(1, eta)_t (log p(x | expert) - log p(x | novice))."""

    def logp(prompt):
        ids = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            return (model(**ids).logits[0].double() / temperature).log_softmax(-1)

    original = logp(text)
    n = original.shape[0]
    diff = logp(f"{expert}{text}")[-n:] - logp(f"{novice}{text}")[-n:]
    etas = torch.linspace(-1, -eta, n, dtype=torch.float64)[:, None]
    edit = original + etas * diff
    kth = torch.topk(edit, k=top_k, dim=-1).values[:, -1:]
    edit[edit < kth] = -torch.inf
    return edit.softmax(-1)


def dense(target, vocab):
    ids, probs = target
    return torch.zeros(ids.shape[0], vocab, dtype=torch.float64).scatter_(1, ids, probs.double())


def test_erasure_target_equals_the_references_edit_vector():
    model, tokenizer = starting_model()
    method, _, _ = make(model, tokenizer, eta=4.0, top_k=20, fluency_weight=0.0)
    method.prepare()
    vocab = model.config.vocab_size
    for item in (0, 3):
        p = method.prompts[item]
        assert "chemistry" in p.expert and "chemistry" in p.novice
        want = reference_edit_vector(
            model, tokenizer, FORGET[item], p.expert, p.novice, 4.0, 20, 1.2
        )
        got = dense(method.targets[item], vocab)
        assert (got > 0).sum(-1).eq(20).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fluency_continuation_samples_the_references_guided_rule():
    """ELMLogits: log p(. | prompt, z_<t) - gamma (log p(. | expert, z_<t) - log p(. | novice,
    z_<t)), top 50, sampled; recomputed here without a KV cache, from the same generator."""
    model, tokenizer = starting_model()
    method, forget, _ = make(model, tokenizer, fluency_tokens=8, fluency_gamma=3.0)
    prompt, expert, novice = forget.ids[0], [70, 71, 72], [80, 81]
    (got,) = guided_continuations(
        model, [(prompt, expert, novice)], method.cfg, [torch.Generator().manual_seed(5)], 0
    )
    generator, want = torch.Generator().manual_seed(5), []
    for _ in range(8):
        with torch.no_grad():
            last = [
                model(input_ids=torch.tensor([s + want])).logits[0, -1].log_softmax(-1)
                for s in (prompt, expert, novice)
            ]
        scores = last[0] - 3.0 * (last[1] - last[2])
        values, ids = scores.topk(50)
        want.append(int(ids[int(torch.multinomial(values.softmax(-1), 1, generator=generator))]))
    assert got == want and len(set(got)) > 1


def test_elm_continuations_are_the_same_in_a_batch_of_1_and_of_4():
    """The continuations decode several items together, left-padded; each item samples from its
    own generator: batching changes no token."""
    model, tokenizer = starting_model()
    method, _, _ = make(model, tokenizer, fluency_tokens=10)
    texts = ["Neon is Ne.", "Zinc is Zn.", "Gold is Au, " * 16, "Pb."]  # one longer than any prefix
    forget, items = tokenize(tokenizer, texts, 256, "forget"), [0, 1, 2, 3]
    prompts = item_prompts(method.cfg, "chemistry", items, 3)
    one, four = (
        fluency_sequences(model, tokenizer, forget, items, prompts, method.cfg, 3, size)
        for size in (1, 4)
    )
    assert one == four and len(set(map(str, four.values()))) == 4


def test_elm_loss_and_gradient_equal_a_hand_computation_of_erase_py():
    model, tokenizer = starting_model()
    frozen = copy.deepcopy(model)
    weights = {"erase_weight": 1.5, "retain_weight": 2.0, "fluency_weight": 0.5}
    method, forget, retain = make(model, tokenizer, eta=3.0, top_k=30, **weights)
    method.prepare()
    perturb(model)
    f, r = forget.batch([2, 1]), retain.batch([1, 0])
    assert bool(f["attention_mask"].all()) and bool(r["attention_mask"].all())
    loss, terms = method.loss(f, r)
    got = gradients(model, loss)

    erase = torch.stack(
        [  # CrossEntropyLoss(activations[0], edit_vector[0]) per prompt
            F.cross_entropy(
                model(**tokenizer([FORGET[i]], return_tensors="pt")).logits[0],
                reference_edit_vector(
                    frozen, tokenizer, FORGET[i], p.expert, p.novice, 3.0, 30, 1.2
                ).float(),
            )
            for i, p in ((i, method.prompts[i]) for i in (2, 1))
        ]
    ).mean()
    held = []
    for j in (1, 0):  # use_retain_soft_loss False: the argmax of the frozen model's softmax
        ids = tokenizer([RETAIN[j]], return_tensors="pt")
        with torch.no_grad():
            greedy = frozen(**ids).logits[0].softmax(-1).argmax(-1)
        held.append(F.cross_entropy(model(**ids).logits[0], greedy))
    fluent = []
    for i in (2, 1):  # the consistency NLL over the tokens after the prompt
        seq, start = method.fluency[i]
        logits = model(input_ids=torch.tensor([seq])).logits[0]
        fluent.append(F.cross_entropy(logits[start - 1 : -1], torch.tensor(seq[start:])))
    retain_term, fluency_term = torch.stack(held).mean(), torch.stack(fluent).mean()
    expected = 1.5 * erase + 2.0 * retain_term + 0.5 * fluency_term
    want = gradients(model, expected)
    assert terms["erase"] == pytest.approx(erase.item(), rel=1e-5)
    assert terms["retain"] == pytest.approx(retain_term.item(), rel=1e-5)
    assert terms["fluency"] == pytest.approx(fluency_term.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.keys() == want.keys() and got
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_elm_references_do_not_depend_on_the_order_of_the_items():
    """A resumed run prepares again from the starting weights: each item's prefixes, target and
    continuation are a function of (seed, item), whatever else is drawn."""
    model, tokenizer = starting_model()
    first, _, _ = make(model, tokenizer, forget_used=(0, 1, 2, 3))
    again, _, _ = make(model, tokenizer, forget_used=(3, 2))
    first.prepare()
    again.prepare()
    for item in (2, 3):
        assert first.prompts[item] == again.prompts[item]
        assert first.fluency[item] == again.fluency[item]
        for a, b in zip(first.targets[item], again.targets[item], strict=True):
            assert torch.equal(a, b)
    assert len({first.prompts[i] for i in range(4)}) > 1  # drawn per item, not one for all


def test_elm_runs_end_to_end_with_lora_on_the_facts_concept(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    fixed = ["locate=fixed", "locate.layers=[1,2]", "unlearn.layers=[1,2]"]
    kuda("unlearn", *TINY, "unlearn=elm", *fixed, "unlearn.fluency_tokens=4", check=True)
    run = next(p.parent for p in tmp_path.rglob("meta.json"))
    assert read_json(run / "meta.json")["status"] == "completed"
    rows = (run / "train_log.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all('"erase"' in r and '"retain"' in r for r in rows)
    assert '"fluency"' in rows[0]
    assert (run / "checkpoint" / "adapter" / "adapter_config.json").is_file()


def test_elm_without_a_concept_for_wmdp_exits_2_with_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were it accepted, the run would go there
    args = ["unlearn", "model=tiny-random", "data=wmdp_bio", "unlearn=elm", "unlearn.layers=[1]"]
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "unlearn.concept" in err, err
    assert not list(tmp_path.iterdir())
