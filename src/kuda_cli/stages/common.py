"""What several stages do the same way: load the configured model (recording what was loaded),
and record the layers located (`kuda trace` traces them; `kuda unlearn` takes them from
`locate`, a previous trace run, or traces them inline into its own trace/ directory: see
locate.pipeline)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from kuda_cli.locate.pipeline import Located
from kuda_cli.models.loading import LoadedModel, load_model
from kuda_cli.run import Run
from kuda_cli.validate import validate_layers_against


def load_configured_model(cfg: DictConfig, run: Run) -> LoadedModel:
    loaded = load_model(OmegaConf.to_object(cfg.model), cfg.cache_dir)
    validate_layers_against(cfg, loaded.num_layers)
    run.update_meta(
        model={
            "name": cfg.model.name,
            "origin": loaded.origin,
            "family": loaded.adapter.family,
            "num_layers": loaded.num_layers,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "device": str(loaded.device),
        }
    )
    return loaded


def recorded(run: Run, located: Located) -> list[int]:
    """The layers located, after recording the trace (when one was done now) in metrics.json."""
    if located.trace is not None:
        run.log_metrics({"trace": located.trace})
    return located.layers
