"""data=tofu: `kuda unlearn` end to end on local TOFU-format files (tests/tofu/), the texts it
trains on, and the one-line refusals of a local file that is missing or not TOFU's, and of a
hub that does not answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kuda_cli import cli
from kuda_cli.compose import compose
from kuda_cli.data.kinds import kind_of

from conftest import read_json

FIXTURE = Path(__file__).parent / "tofu"
SPLITS = ("forget", "retain", "holdout", "forget_perturbed", "retain_perturbed")
SPLITS += ("real_authors", "world_facts")
LOCAL = [f"data.{key}.path={FIXTURE / key}.jsonl" for key in SPLITS]


def rows(key: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / f"{key}.jsonl").read_text().splitlines()]


def test_kuda_unlearn_on_local_tofu_files_scores_tofu_before_and_after(kuda, tmp_path):
    kuda(
        "unlearn",
        "model=tiny-random",
        "data=tofu",
        *LOCAL,
        "locate=fixed",
        "locate.layers=[1,2]",
        "unlearn.steps=2",
        "eval.tofu.max_new_tokens=4",
        "eval.tofu.max_items=2",
        "hydra.run.dir=run",
        f"cache_dir={tmp_path / 'cache'}",  # the starting model's evaluation scored here, now
        check=True,
    )
    metrics = read_json(tmp_path / "run" / "metrics.json")
    for found in (metrics["tofu"], metrics["before"]["tofu"]):
        for split in ("forget", "retain", "real_authors", "world_facts"):
            assert set(found[split]) >= {"prob", "rouge", "truth_ratio", "n"}
            assert found[split]["n"] == 2
        forget = found["forget"]
        assert 0 <= forget["extraction_strength"] <= forget["exact_memorization"] <= 1
        assert found["forget_quality"] is None  # no retain model's truth ratios given
        assert 0 <= found["model_utility"] <= 1 and 0 <= found["mia"]["loss"]["auc"] <= 1
    summary = metrics["summary"]
    assert {"forget_truth_ratio", "forget_truth_ratio_before", "mia_loss_auc"} <= set(summary)
    # the unlearned model is attacked with a reference model too: the starting one
    assert "reference" in metrics["tofu"]["mia"]


def test_the_forget_and_retain_items_are_trained_on_as_question_answer_documents():
    cfg = compose(["data=tofu", "eval=tofu", "stage=unlearn", *LOCAL])
    data = OmegaConf.to_object(cfg.data)
    texts = kind_of(data).unlearn_texts(data)
    forget = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows("forget")]
    retain = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows("retain")]
    assert texts.forget + texts.forget_heldout == forget
    assert texts.retain + texts.retain_heldout == retain
    assert texts.forget_heldout == forget[-1:]  # the held-out tail is never trained on
    # the answer of each trained item begins right after "Answer:" (data.loss_tokens: answer)
    for documents, starts in (
        (texts.forget, texts.forget_answer_starts),
        (texts.retain, texts.retain_answer_starts),
    ):
        assert [d[:s] for d, s in zip(documents, starts, strict=True)] == [
            d[: d.index("\nAnswer:") + len("\nAnswer:")] for d in documents
        ]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refusal(capsys, *argv: str) -> str:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kuda: "), err
    return err


def test_a_missing_local_tofu_file_is_refused_in_one_line(capsys, in_tmp):
    err = refusal(
        capsys, "unlearn", "model=tiny-random", "data=tofu", *LOCAL, "data.retain.path=nope.jsonl"
    )
    assert "data.retain.path=nope.jsonl does not exist" in err
    assert not (in_tmp / "outputs").exists()


def test_a_local_file_without_tofus_fields_is_refused_before_any_model_loads(capsys, in_tmp):
    """world_facts rows without perturbed answers: refused at validation, not when scored."""
    bare = in_tmp / "world_facts.jsonl"
    bare.write_text(
        "".join(
            json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
            for r in rows("world_facts")
        )
    )
    err = refusal(
        capsys, "eval", "model=tiny-random", "data=tofu", *LOCAL, f"data.world_facts.path={bare}"
    )
    assert "data.world_facts" in err and "perturbed_answer" in err
    assert not (in_tmp / "outputs").exists()


def test_an_unreachable_tofu_split_is_refused_in_one_line_naming_its_local_option(capsys, in_tmp):
    local = [o for o in LOCAL if not o.startswith("data.holdout.")]
    err = refusal(capsys, "eval", "model=tiny-random", "data=tofu", *local)
    assert err.startswith("kuda: data.holdout") and "locuslab/TOFU" in err
    assert "data.holdout.path=" in err
    assert not (in_tmp / "outputs").exists()
