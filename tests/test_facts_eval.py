"""The knowledge set and its evaluation: schema checks, subject spans, scoring primitives equal
to their unbatched definitions, multiple choice and greedy answers that follow what the model
learned, fluency figures, and agreement with a reference run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kuda_cli.compose import compose
from kuda_cli.data.fact_set import (
    Fact,
    load_facts,
    parse_fact,
    probes,
    split_facts,
    subject_key,
    subject_subsets,
)
from kuda_cli.errors import UserError
from kuda_cli.evaluate.fact_scoring import (
    answer_matches,
    evaluate_facts,
    fluency,
    mc_and_top1,
    mc_correct,
    ngram_entropy,
    read_reference_answers,
    repetition_rate,
    rotate_within_domain,
    word_tokens,
)
from kuda_cli.evaluate.scoring import (
    continuation_logprobs,
    continuation_top1,
    greedy_continuations,
    option_logprobs,
    option_scores,
)

PARIS = Fact(
    id="capitals-001",
    domain="capitals",
    subject="France",
    target="Paris",
    prompts=("The capital of {} is", "{} has its capital in"),
    distractors=("Rome", "Lima", "Oslo"),
    passage="Paris is where the government of France sits.",
)
IRON = Fact(
    id="chemistry-001",
    domain="chemistry",
    subject="iron",
    target="Fe",
    prompts=("The chemical symbol for {} is", "{} is written with the symbol"),
    distractors=("Ir", "In", "I"),
    passage="Iron carries the symbol Fe.",
)


def record(fact: Fact) -> dict:
    return {**fact.__dict__, "prompts": list(fact.prompts), "distractors": list(fact.distractors)}


def test_prompts_mark_the_subject_span_and_start_upper_case():
    assert IRON.prompt(1) == "Iron is written with the symbol"
    for fact in (PARIS, IRON):
        for i in range(len(fact.prompts)):
            start, end = fact.subject_span(i)
            assert fact.prompt(i)[start:end].lower() == fact.subject.lower()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompts": ["no placeholder"]}, "must hold"),
        ({"distractors": ["Paris", "Rome"]}, "distractors other than"),
        ({"passage": None}, "lacks passage"),
    ],
)
def test_bad_facts_are_rejected_with_the_fact_named(change, message):
    rec = {**record(PARIS), **change}
    if rec["passage"] is None:
        del rec["passage"]
    with pytest.raises(UserError, match=message):
        parse_fact(rec, "test.jsonl")


def test_split_by_domain(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(record(f)) + "\n" for f in (PARIS, IRON)))
    facts = load_facts(path)
    forget, retain = split_facts(facts, ["chemistry"], ["capitals"])
    assert [f.id for f in forget] == ["chemistry-001"] and [f.id for f in retain] == [
        "capitals-001"
    ]
    with pytest.raises(UserError, match="domains: capitals, chemistry"):
        split_facts(facts, ["biology"], ["capitals"])
    with pytest.raises(UserError, match="both forgotten and retained"):
        split_facts(facts, ["chemistry"], ["chemistry"])


def test_retain_domains_unset_means_every_domain_not_forgotten():
    facts = load_facts()
    forget, retain = split_facts(facts, ["capitals"], None)
    assert {f.domain for f in forget} == {"capitals"}
    domains = {f.domain for f in facts}
    assert {f.domain for f in retain} == domains - {"capitals"}
    assert len(forget) + len(retain) == len(facts)


def test_retain_domains_null_retains_every_other_domain():
    from kuda_cli.compose import compose
    from kuda_cli.data.fact_set import retain_of

    cfg = compose(["stage=unlearn", "data.forget_domains=[landmarks]", "data.retain_domains=null"])
    assert cfg.data.retain_domains is None
    forget, retain = split_facts(load_facts(), ["landmarks"], retain_of(cfg.data))
    assert "landmarks" not in {f.domain for f in retain} and forget


def test_builtin_set_has_five_domains_of_forty_facts():
    facts = load_facts()
    per_domain: dict[str, int] = {}
    for fact in facts:
        per_domain[fact.domain] = per_domain.get(fact.domain, 0) + 1
        assert len(fact.prompts) >= 2 and len(fact.distractors) == 3
        assert fact.passage not in {fact.prompt(i) for i in range(len(fact.prompts))}
    assert len(per_domain) >= 5 and min(per_domain.values()) >= 40, per_domain
    assert len({f.id for f in facts}) == len(facts)


def test_makefile_all_domains_are_the_shipped_domains():
    """table-domains, frontier and table-robustness forget each of ALL_DOMAINS in turn and retain
    the others: the list must name every shipped domain and nothing else."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    listed = re.search(r"^ALL_DOMAINS := (.*)$", makefile, re.MULTILINE)
    assert listed, "the Makefile has no ALL_DOMAINS line"
    assert sorted(listed.group(1).split()) == sorted({f.domain for f in load_facts()})


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_continuation_logprobs_equal_the_unbatched_definition(tiny, batch_size):
    model, tokenizer = tiny
    pairs = [("The capital of France is", " Paris"), ("Iron", " is Fe, a metal"), ("A", " b")]
    got = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    for (context, continuation), (total, n) in zip(pairs, got, strict=True):
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = F.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        expected = sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert n == len(cont) and total == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_top1_agreement_is_the_share_of_continuation_tokens_ranked_first(tiny, batch_size):
    model, tokenizer = tiny
    pairs = [("The capital of France is", " Paris"), ("Iron", " is Fe, a metal"), ("A", " b c")]
    got = continuation_top1(model, tokenizer, pairs, batch_size=batch_size)
    for (context, continuation), share in zip(pairs, got, strict=True):
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            top = model(input_ids=torch.tensor([ctx + cont])).logits[0].argmax(-1)
        expected = sum(int(top[len(ctx) - 1 + j]) == t for j, t in enumerate(cont)) / len(cont)
        assert share == pytest.approx(expected)
    # the model's own greedy continuation is, token by token, its top-1 prediction (once it has
    # learned text that survives decoding: a random byte-level model writes invalid UTF-8)
    memorise(model, tokenizer, ["Iron is Fe, a metal"])
    own = greedy_continuations(model, tokenizer, ["Iron"], max_new_tokens=5)[0]
    assert own == " is F" and continuation_top1(model, tokenizer, [("Iron", own)]) == [1.0]


def test_top1_packed_beside_the_options_equals_teacher_forcing_on_its_own(tiny):
    """Token agreement read off the MC forward pass (the reference's line packed as one more
    option) is what `continuation_top1` computes alone, and the MC answers do not change."""
    model, tokenizer = tiny
    memorise(model, tokenizer, ["The capital of France is Paris, a city", "Iron is Fe, a metal"])
    chosen = probes([PARIS, IRON])
    forced = [" Paris, a city", None, " is Fe, a metal", " Fe"]
    mc, top1 = mc_and_top1(model, tokenizer, chosen, forced, batch_size=3)
    assert mc == mc_correct(model, tokenizer, chosen)
    assert top1[1] is None
    for probe, line, share in zip(chosen, forced, top1, strict=True):
        if line is not None:
            assert share == pytest.approx(
                continuation_top1(model, tokenizer, [(probe.text, line)])[0]
            )
    assert top1[0] > 0.5  # a memorised line is mostly the model's own top-1


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not take `logits_to_keep` (as some remote-code models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )


def test_scores_of_a_model_without_logits_to_keep_equal_the_cut_ones(tiny):
    """The output head runs only where a score is read; a model that cannot be asked to do so
    gets every position's logits, cut afterwards: the same scores either way."""
    model, tokenizer = tiny
    plain = _NoLogitsToKeep(model)
    pairs = [("The capital of France is", " Paris"), ("A much longer context, here", " b c")]
    groups = [("Iron", [" Fe", " Ir is long"]), ("The capital of France is", [" Paris"])]
    for a, b in zip(
        continuation_logprobs(model, tokenizer, pairs),
        continuation_logprobs(plain, tokenizer, pairs),
        strict=True,
    ):
        assert a[1] == b[1] and a[0] == pytest.approx(b[0], abs=1e-5)
    for a, b in zip(
        option_scores(model, tokenizer, groups, batch_size=2),
        option_scores(plain, tokenizer, groups, batch_size=2),
        strict=True,
    ):
        assert [(n, h) for _, n, h in a] == [(n, h) for _, n, h in b]
        assert [t for t, _, _ in a] == pytest.approx([t for t, _, _ in b], abs=1e-5)


def test_batched_greedy_generation_equals_one_by_one(tiny):
    model, tokenizer = tiny
    prompts = ["The capital of France is", "Iron", "A much longer prompt than the others here"]
    batched = greedy_continuations(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_continuations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored


def memorise(model, tokenizer, texts, steps=60):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def test_mc_and_greedy_answers_follow_what_the_model_learned(tiny):
    model, tokenizer = tiny
    memorise(model, tokenizer, [PARIS.prompt(0) + " Paris.", IRON.prompt(0) + " Fe."])
    probe_list = probes([PARIS, IRON], all_prompts=False)
    assert mc_correct(model, tokenizer, probe_list) == [True, True]
    metrics, rows = evaluate_facts(model, tokenizer, {"forget": probe_list}, gen_max_new_tokens=6)
    assert metrics["forget"]["mc_acc"] == 1.0 and metrics["forget"]["gen_acc"] == 1.0
    assert rows[0]["answer"].startswith(" Paris") and rows[1]["answer"].startswith(" Fe")
    wrong = Fact(**{**PARIS.__dict__, "target": "Rome", "distractors": ("Paris", "Lima", "Oslo")})
    assert mc_correct(model, tokenizer, probes([wrong], all_prompts=False)) == [False]


def test_answer_matching_and_repetition():
    assert answer_matches(" Paris.\n\nThe answer", "Paris")
    assert answer_matches(' "Fe" and it is a metal', "Fe")
    assert not answer_matches(" Iron is Fe", "F")  # whole words only
    assert not answer_matches("Rome.\nParis", "Paris")  # first line only
    assert repetition_rate("a b c d") == 0.0
    # trigrams: (a b c) (b c a) (c a b) (a b c) -> 3 distinct of 4
    assert repetition_rate("a b c a b c") == pytest.approx(0.25)
    assert repetition_rate("the the the the the") == pytest.approx(2 / 3)


def test_fluency_nll_is_the_judges_mean_token_nll(tiny):
    model, tokenizer = tiny
    prompts, answers = ["Q1", "Q2", "Q3"], [" an answer", "", " the the the the"]
    result = fluency(model, tokenizer, prompts, answers)
    scored = continuation_logprobs(model, tokenizer, [("Q1", " an answer"), ("Q3", answers[2])])
    expected = -sum(t for t, _ in scored) / sum(n for _, n in scored)
    assert result["nll"] == pytest.approx(expected) and math.isfinite(result["nll"])
    assert result["empty"] == 1 and result["n"] == 3
    assert result["repetition"] == pytest.approx((0 + 0 + 0.5) / 3)


def test_agreement_with_a_reference_run(tiny, tmp_path):
    model, tokenizer = tiny
    probe_list = probes([PARIS, IRON])
    memorise(model, tokenizer, [p.text + " " + p.fact.target + "." for p in probe_list])
    _, rows = evaluate_facts(model, tokenizer, {"retain": probe_list}, gen_max_new_tokens=4)
    (tmp_path / "facts_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = read_reference_answers(tmp_path)
    metrics, _ = evaluate_facts(
        model, tokenizer, {"retain": probe_list}, gen_max_new_tokens=4, reference=reference
    )
    assert metrics["retain"]["agreement"] == 1.0
    assert metrics["retain"]["token_agreement"] == 1.0
    changed = {**reference, probe_list[0].text: "something else entirely"}
    metrics, _ = evaluate_facts(
        model, tokenizer, {"retain": probe_list}, gen_max_new_tokens=4, reference=changed
    )
    assert metrics["retain"]["agreement"] == pytest.approx(3 / 4)
    forced = continuation_top1(model, tokenizer, [(probe_list[0].text, "something else entirely")])
    assert forced[0] < 1.0
    assert metrics["retain"]["token_agreement"] == pytest.approx((3 + forced[0]) / 4)
    with pytest.raises(UserError, match="facts_answers.jsonl"):
        read_reference_answers(tmp_path / "nothing")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_options_scored_over_a_shared_context_equal_separate_scoring(tiny, family):
    """Packing a context with all its options (4D mask, restarted positions) changes nothing."""
    import transformers

    model, tokenizer = tiny
    if family == "gpt2":
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    groups = [
        ("The capital of France is", [" Paris", " Rome", " Lima", " Oslo and more"]),
        ("Iron", [" Fe", " Ir"]),
        ("A longer context than the others here", [" b"]),
    ]
    packed = option_logprobs(model, tokenizer, groups, batch_size=2)
    for (context, options), got in zip(groups, packed, strict=True):
        separate = continuation_logprobs(model, tokenizer, [(context, o) for o in options])
        for (total, n), (expected, m) in zip(got, separate, strict=True):
            assert n == m and total == pytest.approx(expected, abs=1e-4)


def test_facts_metric_with_a_judge_directory_scores_like_the_model_itself(tmp_path):
    """eval.facts.judge=DIR loads that model (and its tokenizer) to score fluency; judging with a
    saved copy of the evaluated model gives the evaluated model's own figure."""
    from omegaconf import OmegaConf

    from kuda_cli.config import ModelConfig, TinySpec
    from kuda_cli.evaluate import EvalContext, get_metric
    from kuda_cli.models.loading import load_model

    loaded = load_model(ModelConfig(name="t", source="tiny-random", tiny=TinySpec(), device="cpu"))
    loaded.model.save_pretrained(tmp_path / "judge")
    loaded.tokenizer.save_pretrained(tmp_path / "judge")
    cfg = compose(
        [
            "stage=eval",
            "model=tiny-random",
            "eval.facts.all_prompts=false",
            "eval.facts.gen_max_new_tokens=4",
            "eval.facts.fluency_max_new_tokens=6",
            "data.retain_domains=[capitals]",
        ]
    )
    results = {}
    for judge in (None, str(tmp_path / "judge")):
        eval_cfg = OmegaConf.to_object(cfg.eval)
        eval_cfg.facts.judge = judge
        ctx = EvalContext(
            loaded=loaded, eval=eval_cfg, data=OmegaConf.to_object(cfg.data), out_dir=tmp_path
        )
        results[judge is None] = get_metric("facts").compute(ctx)["fluency"]["forget"]
    assert results[True]["judge"] == "self" and results[False]["judge"].endswith("judge")
    assert results[False]["nll"] == pytest.approx(results[True]["nll"], rel=1e-5)
    assert (tmp_path / "facts_answers.jsonl").is_file() and (tmp_path / "samples.jsonl").is_file()


def test_ngram_entropy_equals_hand_computed_values():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # four distinct words: 3 distinct bigrams, 2 distinct trigrams
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("of the of the of the of the") < ngram_entropy("a b c d e f g h")
    assert ngram_entropy("x x x x x") == 0.0
    assert ngram_entropy("too short") is None  # no trigram: a short answer, left out
    assert ngram_entropy(" Venice.") is None
    # a long run without word structure (an unlearned model's "capital of Italy") is no variety
    assert ngram_entropy(" " + "1" * 60) == 0.0 and ngram_entropy(" " + "²" * 30) == 0.0
    assert word_tokens("It's Paris, France.") == ["It's", "Paris", ",", "France", "."]


def test_retain_facts_split_by_whether_their_subject_is_forgotten():
    lang = Fact(
        id="languages-001",
        domain="languages",
        subject="france",
        target="French",
        prompts=("In {}, people speak",),
        distractors=("German",),
        passage="",
    )
    tower = Fact(
        id="landmarks-001",
        domain="landmarks",
        subject="the Eiffel Tower",
        target="Paris",
        prompts=("{} is in",),
        distractors=("Rome",),
        passage="",
    )
    # "France" and "france" are one subject; the landmark's city (Paris) is not a subject
    subsets = subject_subsets([lang, tower, IRON], [PARIS])
    assert subsets == {
        "other_subjects": {"landmarks-001", "chemistry-001"},
        "same_subjects": {"languages-001"},
    }
    assert subject_key("The  United Kingdom") == "united kingdom"


def test_split_subsets_are_summarised_on_their_own(tiny):
    model, tokenizer = tiny
    memorise(model, tokenizer, [PARIS.prompt(0) + " Paris.", IRON.prompt(0) + " Fe."])
    split = probes([PARIS, IRON], all_prompts=False)
    metrics, _ = evaluate_facts(
        model,
        tokenizer,
        {"retain": split},
        gen_max_new_tokens=4,
        subsets={"retain": {"other_subjects": {IRON.id}, "same_subjects": {PARIS.id}}},
        no_answers=("retain",),
    )
    retain = metrics["retain"]
    mc = mc_correct(model, tokenizer, split)
    assert (
        retain["other_subjects"]["mc_acc"] == float(mc[1])
        and retain["other_subjects"]["n_facts"] == 1
    )
    assert retain["same_subjects"]["mc_acc"] == float(mc[0])
    assert "gen_acc" not in retain and "agreement" not in retain  # no answers asked for


def test_fluent_wrong_reference_is_another_facts_answer_scored_by_the_judge(tiny):
    model, tokenizer = tiny
    facts = [
        Fact(**{**PARIS.__dict__, "id": f"capitals-{i}", "subject": s})
        for i, s in enumerate(["France", "Spain", "Peru"])
    ]
    chosen = probes([*facts, IRON], all_prompts=False)
    answers = [" Paris is big.", " Madrid is hot.", " Lima is far.", " Fe is iron."]
    wrong = rotate_within_domain(chosen, answers)
    assert wrong == [" Madrid is hot.", " Lima is far.", " Paris is big.", None]  # iron: alone
    prompts = [p.text for p in chosen]
    result = fluency(model, tokenizer, prompts, answers, fluent_wrong=wrong)
    own = continuation_logprobs(model, tokenizer, list(zip(prompts[:3], answers[:3], strict=True)))
    other = continuation_logprobs(model, tokenizer, list(zip(prompts[:3], wrong[:3], strict=True)))
    expected_wrong = -sum(t for t, _ in other) / sum(n for _, n in other)
    expected_own = -sum(t for t, _ in own) / sum(n for _, n in own)
    assert result["nll_fluent_wrong"] == pytest.approx(expected_wrong)
    assert result["nll_vs_fluent_wrong"] == pytest.approx(expected_own / expected_wrong)
    # scores of the reference kept from an earlier run are used as they are
    again = fluency(
        model,
        tokenizer,
        prompts,
        answers,
        fluent_wrong=wrong,
        fluent_wrong_scores=result["fluent_wrong_scores"],
    )
    assert again["nll_vs_fluent_wrong"] == result["nll_vs_fluent_wrong"]
    halved = [None if s is None else (s[0] * 2, s[1]) for s in result["fluent_wrong_scores"]]
    doubled = fluency(
        model, tokenizer, prompts, answers, fluent_wrong=wrong, fluent_wrong_scores=halved
    )
    assert doubled["nll_fluent_wrong"] == pytest.approx(2 * expected_wrong)
    # the reference's own answers, scored in place of the answers, give exactly 1
    same = fluency(model, tokenizer, prompts, wrong[:3] + [""], fluent_wrong=wrong)
    assert same["nll_vs_fluent_wrong"] == pytest.approx(1.0)


def test_unlearn_reuses_the_starting_models_scores_of_the_fluent_wrong_reference(tmp_path):
    """The starting model's evaluation keeps its judge's scores of the fluent wrong answers; an
    evaluation lent the starting model as judge with that run as reference uses them, and gets
    what scoring them again gives."""
    from contextlib import contextmanager

    from omegaconf import OmegaConf

    from kuda_cli.config import ModelConfig, TinySpec
    from kuda_cli.evaluate import STARTING_JUDGE, EvalContext, get_metric
    from kuda_cli.evaluate.fact_scoring import FLUENCY_FILE
    from kuda_cli.models.loading import load_model

    loaded = load_model(ModelConfig(name="t", source="tiny-random", tiny=TinySpec(), device="cpu"))
    cfg = compose(
        [
            "stage=eval",
            "model=tiny-random",
            "eval.facts.all_prompts=false",
            "eval.facts.gen_max_new_tokens=4",
            "eval.facts.fluency_max_new_tokens=6",
            "eval.facts.floors=false",
            "data.retain_domains=[capitals]",
        ]
    )

    @contextmanager
    def lend():
        yield loaded.model, loaded.tokenizer, STARTING_JUDGE

    def evaluate(out, reference=None, judge=None):
        out.mkdir()
        eval_cfg = OmegaConf.to_object(cfg.eval)
        eval_cfg.facts.reference = reference
        ctx = EvalContext(
            loaded=loaded,
            eval=eval_cfg,
            data=OmegaConf.to_object(cfg.data),
            out_dir=out,
            judge=judge,
        )
        return get_metric("facts").compute(ctx)["fluency"]["forget"]

    before = evaluate(tmp_path / "before")
    rows = [json.loads(x) for x in (tmp_path / "before" / FLUENCY_FILE).read_text().splitlines()]
    assert before["fluent_wrong"] == "self" and all(r["judge"] == "self" for r in rows)
    reused = evaluate(tmp_path / "a", reference=str(tmp_path / "before"), judge=lend)
    scored = evaluate(tmp_path / "b", reference=str(tmp_path / "before"))  # judge: itself
    assert reused["fluent_wrong"] == "reference" == scored["fluent_wrong"]
    assert reused["nll_fluent_wrong"] == pytest.approx(before["nll_fluent_wrong"], rel=1e-5)
    assert reused["nll_vs_fluent_wrong"] == pytest.approx(scored["nll_vs_fluent_wrong"], rel=1e-5)
    # and they are read, not scored again: doubled stored log-probabilities double the NLL
    for r in rows:
        r["fluent_wrong_score"] = r["fluent_wrong_score"] and [
            2 * r["fluent_wrong_score"][0],
            r["fluent_wrong_score"][1],
        ]
    (tmp_path / "before" / FLUENCY_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    doubled = evaluate(tmp_path / "c", reference=str(tmp_path / "before"), judge=lend)
    assert doubled["nll_fluent_wrong"] == pytest.approx(2 * before["nll_fluent_wrong"], rel=1e-5)
