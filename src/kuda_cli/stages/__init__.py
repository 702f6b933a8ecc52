"""One module per stage; each reads like a recipe: load the model and data, call the library,
write the results into the run directory."""

from kuda_cli.stages import eval as eval_stage
from kuda_cli.stages import pick, report, trace, unlearn

STAGE_FUNCTIONS = {
    "trace": trace.run,
    "unlearn": unlearn.run,
    "eval": eval_stage.run,
    "report": report.run,
    "pick": pick.run,
}
