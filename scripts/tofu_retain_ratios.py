"""Print the override that makes a retain model's TOFU truth ratios the reference of forget
quality: `data.retain_truth_ratios=[...]`, read from the metrics.json of its `kuda eval` run.

    kuda eval model=tofu-llama3.2-1b-retain90 data=tofu eval=tofu hydra.run.dir=runs/retain90
    kuda unlearn data=tofu "$(python scripts/tofu_retain_ratios.py runs/retain90)"

A retain model is one fine-tuned without the forget split (open-unlearning's `_retain90` for
forget10, `_retain95` for forget05, `_retain99` for forget01); evaluate it on the same forget
split as the runs that use its ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def retain_ratios_override(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ratios = metrics["tofu"]["forget"]["truth_ratios"]
    return f"data.retain_truth_ratios=[{','.join(repr(float(r)) for r in ratios)}]"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "metrics.json").is_file():
        print(
            "usage: tofu_retain_ratios.py RUN_DIR (a kuda eval run with eval=tofu)", file=sys.stderr
        )
        return 2
    try:
        print(retain_ratios_override(Path(argv[0])))
    except KeyError:
        print(
            f"{argv[0]}/metrics.json holds no tofu.forget.truth_ratios; run it with eval=tofu",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
