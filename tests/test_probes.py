"""Tracing probes: a long prompt is cut from its start to `locate.max_tokens` (the corrupted span
shifted with it, the target kept), and corpus / MUSE probes never come from the evaluation
questions: from `data.probes` when set, else cloze probes from the trained forget passages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import processors

from kuda_cli import requires
from kuda_cli.compose import compose
from kuda_cli.data.probes import CLOZE_WORDS, cloze_probes, qa_probe
from kuda_cli.errors import UserError
from kuda_cli.locate.probes import build_probes, encode, left_truncate, probe_source
from kuda_cli.models.tiny import byte_tokenizer

from conftest import read_json

WORDS = (
    "virus capsid protein binds receptor membrane fusion entry replication genome polymerase "
    "transcript assembly budding release host immune response antibody neutralizing epitope "
    "mutation variant strain lineage spread outbreak transmission aerosol droplet surface"
).split()
QUESTIONS = [
    {"question": "Which enzyme copies the viral genome?", "choices": list("abcd"), "answer": 1},
    {"question": "What does the capsid protect?", "choices": list("wxyz"), "answer": 0},
]


def with_bos():
    """The byte tokenizer, adding <s> before every text (as Llama's tokenizers do)."""
    tokenizer = byte_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    return tokenizer


def passage(seed: int, words: int = 120) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=words)) + "."


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- max_tokens
def test_a_long_probe_is_left_truncated_with_its_span_shifted_and_its_target_kept():
    tokenizer = with_bos()
    question = "Which of these long-winded options names the enzyme that copies the genome?"
    probe = qa_probe(question, "polymerase", "q0")  # byte tokens: one per character
    full = encode(tokenizer, probe)
    assert full.input_ids[0] == tokenizer.bos_token_id and full.truncated == 0
    cut = encode(tokenizer, probe, max_tokens=40)
    drop = len(full.input_ids) - 40
    assert len(cut.input_ids) == 40 and cut.truncated == drop
    # BOS stays, the rest is the end of the prompt
    assert cut.input_ids[0] == tokenizer.bos_token_id
    assert cut.input_ids[1:] == full.input_ids[-39:]
    assert cut.target_id == full.target_id and cut.tokens == (cut.tokens[0], *full.tokens[-39:])
    # the question's start was dropped: the span starts at the first kept token, ends shifted
    assert cut.span == (1, full.span[1] - drop)
    kept = tokenizer.decode(list(cut.input_ids[cut.span[0] : cut.span[1]]))
    assert question.endswith(kept) and len(kept) == 40 - 1 - len("\nAnswer:")
    # a prompt within the cap is left alone, and null means no cap
    assert encode(tokenizer, probe, max_tokens=len(full.input_ids)) == full
    assert encode(tokenizer, probe, max_tokens=None) == full


def test_a_span_after_the_cut_is_shifted_and_one_cut_entirely_clipped_to_what_is_kept():
    ids = list(range(100, 120))  # 20 tokens, the first a BOS
    assert left_truncate(ids, (15, 18), 10, lead=1) == ([100, *range(111, 120)], (5, 8), 10)
    # a span straddling the cut keeps its kept part
    assert left_truncate(ids, (5, 15), 10, lead=1)[1] == (1, 5)
    # a span wholly in the dropped part: every kept prompt token is corrupted
    assert left_truncate(ids, (1, 4), 10, lead=1)[1] == (1, 10)
    assert left_truncate(ids, (1, 4), 10, lead=0) == (ids[10:], (0, 10), 10)
    assert left_truncate(ids, (1, 4), None) == (ids, (1, 4), 0)


def test_the_default_config_caps_probe_length():
    locate = compose(["stage=trace"]).locate
    assert locate.max_tokens == 256
    assert compose(["stage=trace", "locate.max_tokens=null"]).locate.max_tokens is None


# ----------------------------------------------------------------------------- cloze probes
def test_cloze_probes_end_before_a_content_word_of_the_passage():
    text = passage(0, 200)
    (probe,) = cloze_probes([text])
    assert text.startswith(probe.prompt) and probe.span == (0, len(probe.prompt))
    assert len(probe.prompt.split()) == CLOZE_WORDS
    following = text[len(probe.prompt) :].split()[0].rstrip(".")
    assert probe.target == " " + following
    # windows spread through the passage, each a piece of it followed by its target word
    spread = cloze_probes([text], per_passage=4)
    assert len(spread) == 4 and len({p.id for p in spread}) == 4
    for p in spread:
        at = text.index(p.prompt)
        assert text[at + len(p.prompt) :].split()[0].rstrip(".") == p.target.strip()
    # stop words and short words are skipped; a passage shorter than a window gives none
    words = ["alpha"] * CLOZE_WORDS + ["with", "of", "the", "genome"]
    (skipped,) = cloze_probes([" ".join(words)])
    assert skipped.target == " genome" and skipped.prompt.endswith("alpha with of the")
    assert cloze_probes([" ".join(["alpha"] * CLOZE_WORDS)]) == []


def corpus_overrides(tmp_path) -> list[str]:
    forget = [{"text": passage(i)} for i in range(6)]
    return [
        "stage=trace",
        "data=wmdp_bio",
        f"data.forget.path={write_jsonl(tmp_path / 'forget.jsonl', forget)}",
        f"data.questions.path={write_jsonl(tmp_path / 'questions.jsonl', QUESTIONS)}",
    ]


def test_corpus_probes_come_from_the_trained_forget_passages_never_the_questions(tmp_path):
    cfg = compose(corpus_overrides(tmp_path))
    built = build_probes(cfg)
    passages = [passage(i) for i in range(5)]  # the last of six is held out (KRD)
    assert built and all(any(p.prompt in t for t in passages) for p in built)
    assert not any(p.prompt in passage(5) for p in built)
    assert not any(
        q["question"] in p.prompt or "Question:" in p.prompt for q in QUESTIONS for p in built
    )
    assert probe_source(cfg).startswith("data.forget")
    # the hub check asks for the forget corpus, not the questions
    sources = [str(s) for s in requires.hub_sources(compose(["stage=trace", "data=wmdp_bio"]))]
    assert "data.forget (cais/wmdp-bio-forget-corpus)" in sources
    assert not any(s.startswith("data.questions") for s in sources)


def test_muse_probes_never_come_from_the_knowmem_forget_questions(tmp_path):
    qa = [{"question": "Who signed the accord?", "answer": "Ann Lee"}]
    overrides = [
        "stage=trace",
        "data=muse_news",
        f"data.forget.path={write_jsonl(tmp_path / 'forget.jsonl', [{'text': passage(1, 400)}])}",
        f"data.knowmem_forget.path={write_jsonl(tmp_path / 'qa.jsonl', qa)}",
    ]
    built = build_probes(compose(overrides))
    assert len(built) > 1 and all(p.prompt in passage(1, 400) for p in built)  # one book: windows
    assert not any("accord" in p.prompt for p in built)


def test_data_probes_give_held_apart_questions(tmp_path):
    held = [{"question": "Which organelle makes ATP?", "choices": list("abcd"), "answer": "C"}]
    overrides = [
        *corpus_overrides(tmp_path),
        f"data.probes.path={write_jsonl(tmp_path / 'p.jsonl', held)}",
    ]
    cfg = compose(overrides)
    (probe,) = build_probes(cfg)
    assert probe.prompt == "Question: Which organelle makes ATP?\nAnswer:" and probe.target == " c"
    assert probe_source(cfg).startswith("data.probes")
    free = write_jsonl(tmp_path / "free.jsonl", [{"question": "Who?", "answer": "Ann"}])
    (probe,) = build_probes(compose(["stage=trace", "data=muse_news", f"data.probes.path={free}"]))
    assert probe.target == " Ann"


def test_a_forget_corpus_too_short_for_a_window_is_a_user_error(tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "a short passage " * 5}] * 3)
    cfg = compose(["stage=trace", "data=wmdp_bio", f"data.forget.path={short}"])
    with pytest.raises(UserError, match="data.probes.path"):
        build_probes(cfg)


def test_kuda_trace_on_corpus_data_traces_capped_forget_probes(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = [o for o in corpus_overrides(tmp_path) if o != "stage=trace"]
    kuda(
        "trace",
        "model=tiny-random",
        *overrides,
        "locate.max_probes=2",
        "locate.samples=2",
        "locate.plot_probes=0",
        "locate.max_tokens=24",
        "hydra.run.dir=run",
        check=True,
    )
    out = tmp_path / "run" / "trace"
    layers = read_json(out / "layers.json")
    assert layers["probe_source"].startswith("data.forget") and layers["max_tokens"] == 24
    assert layers["truncated_probes"] == 2
    effects = np.load(out / "effects.npz")
    assert effects["length"].max() <= 24
    assert not any(q["question"] in str(p) for q in QUESTIONS for p in effects["prompt"])
    assert read_json(tmp_path / "run" / "metrics.json")["trace"]["truncated_probes"] == 2
