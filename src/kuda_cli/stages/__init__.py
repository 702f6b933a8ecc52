"""One module per stage, named as the stage (`kuda_cli.config.STAGES` lists them once); each reads
like a recipe: load the model and data, call the library, write the results into the run
directory."""

import importlib

from kuda_cli.config import STAGES

# stage -> its module's `main(cfg, run)`
STAGE_FUNCTIONS = {stage: importlib.import_module(f"{__name__}.{stage}").main for stage in STAGES}
