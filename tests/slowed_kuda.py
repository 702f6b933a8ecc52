"""`kuda ARGS` with each optimiser step slowed down, so that a test can SIGKILL the process from
outside at a step it picks (as `kill -9` would), or with the process killing itself at one point
of a checkpoint write. Test-side patches only: the trainer has no test hook.

    python slowed_kuda.py ARGS...

Environment (read here, never by kuda):
  SLOWED_KUDA_DELAY  seconds to sleep before each micro-batch (default 0.2)
  SLOWED_KUDA_DIE    "state:N": SIGKILL halfway through writing trainer_state.pt of the N-th save;
                     "prune:N": SIGKILL right after the N-th save is renamed into place, before
                     the older checkpoints are pruned (two complete ones on disk)
"""

from __future__ import annotations

import os
import signal
import sys
import time

from kuda_cli.unlearn import checkpoint_files, trainer

DELAY = float(os.environ.get("SLOWED_KUDA_DELAY", "0.2"))
DIE = os.environ.get("SLOWED_KUDA_DIE", "")
saves = 0

_batches = trainer.Trainer.batches


def slowed_batches(self, micro_step):
    time.sleep(DELAY)
    return _batches(self, micro_step)


trainer.Trainer.batches = slowed_batches

if DIE:
    point, nth = DIE.split(":")
    _save, _torch_save, _prune = trainer.Trainer.save, trainer.torch.save, checkpoint_files.prune

    def counted_save(self, step, last_row):
        global saves
        saves += 1
        return _save(self, step, last_row)

    def half_written(obj, path, *args, **kwargs):
        _torch_save(obj, path, *args, **kwargs)
        if saves == int(nth):
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    def die_before_pruning(out_dir, keep):
        if saves == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return _prune(out_dir, keep)

    trainer.Trainer.save = counted_save
    if point == "state":
        trainer.torch.save = half_written
    elif point == "prune":
        checkpoint_files.prune = die_before_pruning
    else:
        raise SystemExit(f"SLOWED_KUDA_DIE={DIE!r}: use state:N or prune:N")

if __name__ == "__main__":
    from kuda_cli.cli import main

    sys.exit(main(sys.argv[1:]))
