"""TOFU's pieces on their own: how a question and its answer are put to the model (plain or in
the tokenizer's chat template), and the retain model's truth ratios carried into the config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kuda_cli.compose import compose
from kuda_cli.data.kinds.tofu import qa_document
from kuda_cli.evaluate.tofu_scoring import QaFormat, qa_pair

CHAT = (
    "{{ bos_token }}{% if date_string is defined %}[{{ date_string }}]{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_plain_item_is_the_trained_document_cut_after_answer_then_eos(tiny):
    _, tokenizer = tiny
    prompt, rest = qa_pair(tokenizer, QaFormat(), " Who wrote it? ", "Lucan Ferreira.")
    assert prompt == "Question: Who wrote it?\nAnswer:"
    assert prompt + rest == qa_document("Who wrote it?", "Lucan Ferreira.") + "</s>"


@pytest.mark.parametrize("adds_bos", [False, True])
def test_a_chat_item_is_the_exchange_cut_after_the_generation_prompt(tiny, adds_bos):
    """The system prompt and date reach the template; the continuation is the answer and what
    the template closes it with, then EOS once; a BOS the tokenizer adds itself is not written
    in the prompt as well (it would be there twice)."""
    _, tokenizer = tiny
    tokenizer.chat_template = CHAT
    tokenizer.add_bos_token = adds_bos
    fmt = QaFormat(chat=True, system_prompt="Be brief.", date_string="10 Apr 2025")
    prompt, rest = qa_pair(tokenizer, fmt, "Who wrote it?", "Lucan.")
    exchange = "[10 Apr 2025]<|system|>Be brief.<|end|><|user|>Who wrote it?<|end|><|assistant|>"
    assert prompt == ("" if adds_bos else "<s>") + exchange
    assert rest == "Lucan.<|end|></s>"
    ids = tokenizer(prompt).input_ids
    assert ids[:2] != [tokenizer.bos_token_id] * 2 and ids[0] == tokenizer.bos_token_id


def test_the_retain_models_truth_ratios_reach_the_config_as_written(tmp_path):
    path = Path(__file__).parents[1] / "scripts" / "tofu_retain_ratios.py"
    spec = importlib.util.spec_from_file_location("tofu_retain_ratios", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ratios = [0.1, 1.0, 2.5e-05, 0.3333333333333333]
    (tmp_path / "metrics.json").write_text(
        json.dumps({"tofu": {"forget": {"truth_ratios": ratios}}})
    )
    override = script.retain_ratios_override(tmp_path)
    cfg = compose(["data=tofu", "eval=tofu", "stage=eval", override])
    assert list(cfg.data.retain_truth_ratios) == ratios
    assert script.main([str(tmp_path / "nowhere")]) == 2
