"""eval=muse end to end on local copies of the MUSE splits (the tiny model), and the one-line
error for an unreachable hub dataset."""

from __future__ import annotations

import json
import math

from omegaconf import OmegaConf

from kuda_cli import cli
from kuda_cli.config import ModelConfig, TinySpec
from kuda_cli.evaluate import EvalContext, get_metric
from kuda_cli.models.loading import load_model


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def local_muse(tmp_path) -> list[str]:
    texts = [f"Story {i}: the wizard walked to the castle number {i} at dawn." for i in range(4)]
    files = {
        "forget": write(tmp_path / "forget.jsonl", [{"text": t} for t in texts]),
        "holdout": write(tmp_path / "holdout.jsonl", [{"text": t[::-1]} for t in texts]),
        "verbmem": write(
            tmp_path / "verbmem.jsonl", [{"prompt": t[:20], "gt": t[20:]} for t in texts]
        ),
        "knowmem_forget": write(
            tmp_path / "kf.jsonl", [{"question": "Who walked?", "answer": "the wizard"}] * 2
        ),
        "knowmem_retain": write(
            tmp_path / "kr.jsonl", [{"question": "Where?", "answer": "the castle"}] * 2
        ),
        "knowmem_forget_icl": write(tmp_path / "kfi.jsonl", [{"question": "Q?", "answer": "A"}]),
        "knowmem_retain_icl": write(tmp_path / "kri.jsonl", [{"question": "Q?", "answer": "B"}]),
    }
    return [f"data.{key}.path={path}" for key, path in files.items()]


def test_muse_metric_on_local_splits(tmp_path):
    overrides = [
        *local_muse(tmp_path),
        "data=muse_news",
        "eval=muse",
        "stage=eval",
        "model=tiny-random",
        "data.retrain_auc=0.5",
        "eval.muse.verbmem_max_new_tokens=8",
        "eval.muse.knowmem_max_new_tokens=4",
        "eval.muse.icl_examples=1",
    ]
    cfg = cli.compose(overrides)
    loaded = load_model(ModelConfig(name="t", source="tiny-random", tiny=TinySpec(), device="cpu"))
    ctx = EvalContext(
        loaded=loaded, eval=OmegaConf.to_object(cfg.eval), data=OmegaConf.to_object(cfg.data)
    )
    muse = get_metric("muse")(ctx)["muse"]
    for key in ("verbmem_forget", "knowmem_forget", "knowmem_retain"):
        assert 0.0 <= muse[key]["rougeL_f1"] <= 1.0
    assert muse["verbmem_forget"]["n"] == 4 and muse["knowmem_forget"]["n"] == 2
    assert 0.0 <= muse["privleak"]["auc"] <= 1.0
    expected = (muse["privleak"]["auc"] - 0.5) / 0.5 * 100
    assert math.isclose(muse["privleak"]["privleak"], expected)


def test_unreachable_muse_dataset_is_one_line_exit_2(kuda, tmp_path):
    done = kuda("eval", "model=tiny-random", "data=muse_news", "eval=muse")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kuda: data.verbmem") and "muse-bench/MUSE-News" in last
    assert "data.verbmem.path=" in last
