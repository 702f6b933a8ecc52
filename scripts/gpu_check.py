"""Helpers of scripts/gpu_check.sh: build the random-weight model and the local data it runs on,
then summarise what the runs measured. Not a test and not a benchmark of the method's quality:
the weights are random; what is checked is that the CUDA path runs end to end, and how much
memory and time it takes.

    python scripts/gpu_check.py build DIR --shape zephyr-7b --layers 8 --device cuda
    python scripts/gpu_check.py summary DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from bench_unlearn import SHAPES as BENCH_SHAPES  # scripts/ is this script's sys.path[0]

WORDS = {
    "forget": "pathogen virus toxin spore culture strain host vector gene assay protein",
    "retain": "river city music history garden market language painting mountain poem",
}
# the widths of bench_unlearn's shapes (zephyr-7b: the real ones); the depth is chosen here
SHAPES = {
    name: {k: v for k, v in spec.items() if k not in ("family", "num_hidden_layers")}
    for name, spec in BENCH_SHAPES.items()
}


def texts(kind: str, count: int, words: int, rng: random.Random) -> list[str]:
    vocab = WORDS[kind].split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) + "." for _ in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(directory: Path, shape: str, layers: int, device: str) -> None:
    from transformers import AutoModelForCausalLM, MistralConfig

    from kuda_cli.models.tiny import byte_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(**SHAPES[shape], num_hidden_layers=layers)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):  # initialised where it runs
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory / "model", safe_serialization=True)
    byte_tokenizer().save_pretrained(directory / "model")
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {shape} widths, {layers} layers, {params / 1e9:.2f}B parameters, bf16 "
        f"{params * 2 / 2**30:.2f} GiB, built and saved in {time.perf_counter() - start:.1f} s"
    )
    rng = random.Random(0)
    write_jsonl(directory / "forget.jsonl", [{"text": t} for t in texts("forget", 64, 40, rng)])
    write_jsonl(directory / "retain.jsonl", [{"text": t} for t in texts("retain", 128, 40, rng)])
    questions = []
    for i, stem in enumerate(texts("forget", 24, 12, rng)):
        choices = [rng.choice(WORDS["forget"].split()) for _ in range(4)]
        questions.append({"question": stem, "choices": choices, "answer": i % 4})
    write_jsonl(directory / "wmdp_bio.jsonl", questions)
    mmlu = [
        {"question": q, "subject": "college_biology", "choices": c, "answer": i % 4}
        for i, (q, c) in enumerate(
            (stem, [rng.choice(WORDS["retain"].split()) for _ in range(4)])
            for stem in texts("retain", 24, 12, rng)
        )
    ]
    write_jsonl(directory / "mmlu.jsonl", mmlu)


def _metrics(run: Path) -> dict:
    path = run / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def summary(directory: Path) -> int:
    """The figures of the runs; 1 when a run did not complete."""
    failed = 0
    for name in ("kuda", "rmu", "ga"):
        run = directory / "runs" / name
        meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").exists() else {}
        m = _metrics(run)
        train = m.get("train", {})
        status = meta.get("status", "missing")
        failed += status != "completed"
        figures = [
            f"status {status}",
            f"peak {train.get('peak_gpu_gib', '?')} GiB = "
            f"{train.get('peak_over_bf16_weights', '?')}x bf16 weights",
            f"train {train.get('seconds', '?')} s for {train.get('steps', '?')} steps",
            f"checkpoint {(run / 'checkpoint').exists()}",
        ]
        print(f"  {name:<5} " + ", ".join(figures))
        leak = (m.get("diagnostics") or {}).get("retain_leak") or {}
        layers = {k: v for k, v in leak.items() if k.startswith("l")}
        if layers:
            shown = ", ".join(f"{k} {v['vs_random']:.4f}" for k, v in sorted(layers.items()))
            print(f"        retain leak vs a random change of the same norm (bf16): {shown}")
        projector = (m.get("diagnostics") or {}).get("projector") or {}
        if projector:
            shown = ", ".join(
                f"{k} energy passed {v['energy_passed']:.4f}" for k, v in sorted(projector.items())
            )
            print(f"        projector: {shown}")
    evaluated = _metrics(directory / "runs" / "eval")
    accuracy = (evaluated.get("lm_eval") or {}).get("wmdp_bio", {}).get("acc")
    print(f"  kuda eval (lm-eval, local WMDP-format file): wmdp_bio acc {accuracy}")
    failed += accuracy is None
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("directory", type=Path)
    b.add_argument("--shape", choices=sorted(SHAPES), default="zephyr-7b")
    b.add_argument("--layers", type=int, default=8)
    b.add_argument("--device", default="cuda")
    s = sub.add_parser("summary")
    s.add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.directory, args.shape, args.layers, args.device)
        return 0
    return summary(args.directory)


if __name__ == "__main__":
    sys.exit(main())
