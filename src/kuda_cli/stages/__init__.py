"""One module per stage; each reads like a recipe: load the model and data, call the library,
write the results into the run directory."""

from kuda_cli.stages import eval as eval_stage
from kuda_cli.stages import pick, report, trace, unlearn

STAGE_FUNCTIONS = {
    "trace": trace.main,
    "unlearn": unlearn.main,
    "eval": eval_stage.main,
    "report": report.main,
    "pick": pick.main,
}
