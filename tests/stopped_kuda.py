"""`kuda ARGS` whose training stops with an error at the start of step STOPPED_KUDA_AT (1-based)
in every process, as a crash of the job would: the checkpoints written before it stay. Test-side
patch only (torchrun runs this file in each process): the trainer has no test hook.

    python stopped_kuda.py ARGS...
"""

from __future__ import annotations

import os
import sys

from kuda_cli.unlearn import trainer

AT = int(os.environ.get("STOPPED_KUDA_AT", "0"))
_step = trainer.Trainer._step


def stopping_step(self, step, optimised, t0):
    if step + 1 == AT:
        raise RuntimeError(f"stopped at step {AT} (tests/stopped_kuda.py)")
    return _step(self, step, optimised, t0)


trainer.Trainer._step = stopping_step

if __name__ == "__main__":
    from kuda_cli.cli import main

    sys.exit(main(sys.argv[1:]))
