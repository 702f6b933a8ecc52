"""Model loading: tiny random models are deterministic, local directories load through
from_pretrained, bad paths give clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kuda_cli.config import ModelConfig, TinySpec
from kuda_cli.errors import UserError
from kuda_cli.models.loading import load_model, resolve_device, resolve_dtype
from kuda_cli.models.tiny import byte_tokenizer

CHECKSUM = (
    "from kuda_cli.config import TinySpec\n"
    "from kuda_cli.models.tiny import tiny_random\n"
    "m, t = tiny_random(TinySpec())\n"
    "ids = t('Héllo, wörld')['input_ids']\n"
    "print(ids, sum(float(p.detach().double().sum()) for p in m.parameters()))\n"
)


def tiny_config(**spec) -> ModelConfig:
    return ModelConfig(name="tiny", source="tiny-random", device="cpu", tiny=TinySpec(**spec))


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "Hé said: 東京 is big.\n  Tabs\tand émoji 🙂"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 260 and max(ids) < 260


def test_tiny_random_is_identical_across_processes(capsys):
    """Same seed, same weights and token ids, whatever the process's hash seed."""
    exec(CHECKSUM, {})
    here = capsys.readouterr().out.strip()
    env = {**os.environ, "PYTHONHASHSEED": str(hash("kuda") % 1000 + 1)}
    done = subprocess.run(
        [sys.executable, "-c", CHECKSUM], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == here


def test_tiny_random_loads_with_the_configured_shape():
    loaded = load_model(tiny_config(num_layers=2, hidden_size=48, num_heads=4, num_kv_heads=2))
    assert loaded.num_layers == 2
    assert loaded.model.config.hidden_size == 48
    assert loaded.tokenizer.pad_token == "<pad>"
    assert not loaded.model.training
    assert loaded.origin == "tiny-random"


def test_local_directory_loads_through_from_pretrained(tmp_path):
    original = load_model(tiny_config())
    original.model.save_pretrained(tmp_path / "ckpt")
    original.tokenizer.save_pretrained(tmp_path / "ckpt")
    spec = ModelConfig(name="local", source="local", path=str(tmp_path / "ckpt"), device="cpu")
    reloaded = load_model(spec)
    batch = original.tokenizer(["a test"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch).logits, original.model(**batch).logits)
    assert reloaded.origin == str(tmp_path / "ckpt")
    assert next(reloaded.model.parameters()).dtype == torch.float32


def test_tokenizer_can_come_from_elsewhere(tmp_path):
    original = load_model(tiny_config())
    original.model.save_pretrained(tmp_path / "weights_only")
    original.tokenizer.save_pretrained(tmp_path / "tokenizer")
    spec = ModelConfig(
        name="local",
        source="local",
        path=str(tmp_path / "weights_only"),
        tokenizer=str(tmp_path / "tokenizer"),
        device="cpu",
    )
    loaded = load_model(spec)
    assert loaded.tokenizer("abc")["input_ids"] == original.tokenizer("abc")["input_ids"]


def test_local_path_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        load_model(ModelConfig(name="x", source="local", path=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no config.json"):
        load_model(ModelConfig(name="x", source="local", path=str(tmp_path)))


def test_unreachable_hub_id_says_how_to_work_offline():
    spec = ModelConfig(name="x", source="hub", id="kuda-test/does-not-exist", device="cpu")
    with pytest.raises(UserError, match="model.path=DIR"):
        load_model(spec)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == "auto"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="model.device=cuda"):
            resolve_device("cuda")


def test_a_gpu_model_loads_straight_to_its_device(monkeypatch):
    """On CUDA `from_pretrained` gets `device_map` (the weights go to the GPU shard by shard, no
    host copy of the whole model) and the model is not moved again; on the CPU neither."""
    from kuda_cli.models import loading

    calls = {}

    class Fake:
        def to(self, device):
            calls["moved"] = device
            return self

    def fake_model(name, **kwargs):
        calls["kwargs"] = kwargs
        return Fake()

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fake_model)
    spec = ModelConfig(name="m", source="local", device="cuda", dtype="bfloat16")
    loading._from_pretrained("dir", spec, torch.device("cuda", 1))
    assert calls["kwargs"]["device_map"] == torch.device("cuda", 1) and "moved" not in calls
    loading._from_pretrained("dir", spec, torch.device("cpu"))
    assert "device_map" not in calls["kwargs"] and calls["moved"] == torch.device("cpu")
