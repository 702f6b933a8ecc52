"""unlearn.lora: the full-parameter baselines train peft LoRA adapters; the final checkpoint is
the merged model (any tool loads it) with the adapter beside it (peft loads it)."""

import copy

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kuda_cli import cli
from kuda_cli.unlearn.lora import ADAPTER_DIR
from kuda_cli.unlearn.trainer import Trainer
from test_precision_checkpoints import make

from conftest import read_json


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_trains_adapters_only_and_saves_a_merged_model_and_the_adapter(tiny, tmp_path):
    model, tokenizer = tiny
    start = copy.deepcopy(model)
    method, cfg, forget, retain = make(
        model, tokenizer, "npo", steps=4, lr=1e-2, trainable=["all"], lora={"enabled": True, "r": 4}
    )
    trainer = Trainer(
        model, tokenizer, method, cfg, forget, retain, out_dir=tmp_path, progress=False
    )
    trainer.train()
    assert trainer.params and all("lora_" in n for n in trainer.params)
    assert all(p.dtype == torch.float32 for p in trainer.params.values())
    now = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for name, p in start.named_parameters():  # the weights themselves never moved
        torch.testing.assert_close(now[name], p, rtol=0, atol=0)
    batch = forget.batch([0, 1, 2])
    trained = logits(model, batch)
    assert (trained - logits(start, batch)).abs().max() > 1e-3  # the adapters changed the model

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-4, atol=1e-4)
    adapted = PeftModel.from_pretrained(copy.deepcopy(start), tmp_path / "checkpoint" / ADAPTER_DIR)
    torch.testing.assert_close(logits(adapted.eval(), batch), trained, rtol=1e-4, atol=1e-4)
    assert read_json(tmp_path / "checkpoint" / "trainer_state.json")["final"] is True

    # a finished run found again (killed while evaluating): the adapters from its checkpoint
    again = copy.deepcopy(start)
    method, cfg, forget, retain = make(
        again, tokenizer, "npo", steps=4, lr=1e-2, trainable=["all"], lora={"enabled": True, "r": 4}
    )
    second = Trainer(
        again, tokenizer, method, cfg, forget, retain, out_dir=tmp_path, progress=False
    )
    assert second.train().resumed_from == 4
    torch.testing.assert_close(logits(again, batch), trained, rtol=0, atol=0)


def test_lora_is_refused_for_methods_that_train_named_matrices(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["unlearn", "model=tiny-random", "unlearn=kuda", "unlearn.lora.enabled=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "unlearn.lora.enabled=true is for the full-parameter baselines" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_lora_target_modules_the_model_lacks_give_one_line(kuda, tmp_path, monkeypatch):
    monkeypatch.setenv("KUDA_CACHE", str(tmp_path / "cache"))
    done = kuda(
        "unlearn",
        "model=tiny-random",
        "unlearn=ga",
        "locate=fixed",
        "locate.layers=[1]",
        "eval=none",
        "unlearn.steps=1",
        "unlearn.lora.enabled=true",
        "unlearn.lora.target_modules=[c_attn]",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kuda: unlearn.lora could not attach adapters"), last
