"""Representation misdirection for unlearning (RMU, Li et al. 2024, WMDP).

With h(x) the residual stream after block `steer_layer` (null: the last trained layer), u a
fixed random unit vector and c the steering coefficient:

    mean over forget tokens of  MSE(h(x), c * u)
      + alpha * mean over retain tokens of  MSE(h(x), h_original(x))

MSE is the mean over the hidden dimension; only the counted tokens count (`counted_tokens`: not
padding; on TOFU with `data.loss_tokens: answer`, the answer's, as open-unlearning's RMU masks both
terms by its labels); the WMDP code averages over padding too. u is drawn uniform in [0, 1) per
dimension from the run's seed and normalised, as in the WMDP code. Retain originals come from the
starting model, computed once in `prepare` (memory or disk, `unlearn.originals`): no second model
copy; `prepare` runs before a resumed run loads its checkpoint. Trained: `unlearn.trainable`
(default `down_proj`) of the trained layers. The forward pass stops after `steer_layer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kuda_cli.config import UnlearnConfig, bounded
from kuda_cli.errors import ConfigError, UserError
from kuda_cli.models.hooks import trace
from kuda_cli.models.precision import autocast
from kuda_cli.unlearn.methods import Method, counted_tokens, register_method
from kuda_cli.unlearn.representations import RepresentationStore, record_sites


def steering_vector(hidden_size: int, c: float, seed: int) -> torch.Tensor:
    """c * u, u uniform in [0, 1)^hidden normalised to unit length (float32, CPU)."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return u / u.norm() * c


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `mask` is 1 of the per-token mean squared error; padding
    contributes nothing, not even a gradient."""
    per_token = (h.float() - target.float()).pow(2).mean(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def site_output(model, site: str, batch: dict) -> torch.Tensor:
    """The output of module `site` for a batch; the layers after it are not run."""
    with trace(model, [site], stop_after=site) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return rec[site].output


def retain_mse_of(model, site: str, originals, retain: dict) -> torch.Tensor:
    """RMU's retain term: the MSE between `site`'s output on a retain batch and its stored
    originals, over the counted tokens."""
    mask = counted_tokens(retain)
    original = originals.padded(retain["index"], site, mask.shape[1], mask.device)
    return masked_mse(site_output(model, site, retain), original, mask)


@dataclass
class SteeringConfig(UnlearnConfig):
    """What RMU and adaptive RMU (adaptive_rmu.py) share: the steered layer, the retain weight."""

    lr: float = bounded(1e-3, gt=0)
    steer_layer: int | None = bounded(None, ge=0)  # null: the last trained layer
    alpha: float = bounded(100.0, ge=0)


@dataclass
class RmuMethod(SteeringConfig):
    """Sized for the embedded SmolLM2-135M on data=facts: its residual-stream norms are about 100
    at layers 3-5, so c is far larger than zephyr's 6.5 (docs/baselines.md); unlearn=rmu_zephyr
    is the published zephyr-7b setting."""

    method: str = "rmu"
    c: float = bounded(300.0, gt=0)


@register_method("rmu", RmuMethod)
class Rmu(Method):
    supports_lora = False  # its loss reads named down_proj modules' outputs

    @classmethod
    def layer_options(cls, unlearn) -> list[tuple[str, list[int]]]:
        steer = unlearn.get("steer_layer")
        return [] if steer is None else [("unlearn.steer_layer", [steer])]

    @classmethod
    def check_config(cls, cfg) -> None:
        """RMU reads the layer `steer_layer` and stops the forward pass there: a trained layer
        after it would get no gradient."""
        steer = cfg.unlearn.get("steer_layer")
        if steer is None or "all" in cfg.unlearn.get("trainable", []):
            return
        if cfg.unlearn.get("layers") is not None:
            key, trained = "unlearn.layers", list(cfg.unlearn.layers)
        elif cfg.locate.method == "fixed":
            key, trained = "locate.layers", list(cfg.locate.layers or [])
        else:
            return  # located at run time; the method checks then
        if trained and steer < max(trained):
            raise ConfigError(
                f"unlearn.steer_layer={steer} comes before layer {max(trained)} of {key}, which "
                f"would get no gradient; set unlearn.steer_layer>={max(trained)} or null"
            )

    @property
    def needs_retain(self) -> bool:  # type: ignore[override]
        return self.cfg.alpha > 0

    @property
    def steer_layer(self) -> int:
        if self.cfg.steer_layer is not None:
            return self.cfg.steer_layer
        return max(self.trained_layers)

    @property
    def site(self) -> str:
        return self.ctx.adapter.module_name("layer", self.steer_layer)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        deepest = max(self.trained_layers)
        if "all" not in self.cfg.trainable and self.steer_layer < deepest:
            raise UserError(
                f"unlearn.steer_layer={self.steer_layer} comes before trained layer {deepest}, "
                f"which would get no gradient; set unlearn.steer_layer>={deepest} or null (the "
                "last trained layer)"
            )
        return super().trainable_parameters()

    def prepare(self) -> None:
        ctx = self.ctx
        device = next(ctx.model.parameters()).device
        coefficient = self.steering_coefficient()
        self.control = steering_vector(ctx.model.config.hidden_size, coefficient, ctx.seed)
        self.control = self.control.to(device)
        self.store = None
        if self.needs_retain:
            directory = ctx.work_dir / "originals" if ctx.work_dir else None
            self.store = RepresentationStore(self.cfg.originals, directory)
            with autocast(self.cfg.precision, device):  # as the loss will see them
                record_sites(
                    ctx.model,
                    ctx.retain,
                    ctx.retain_used,
                    [self.site],
                    self.store,
                    desc="original retain activations",
                )

    def steering_coefficient(self) -> float:
        """c, the norm of the forget tokens' target (computed in `prepare`)."""
        return self.cfg.c

    def activations(self, batch: dict) -> torch.Tensor:
        """h at `steer_layer` for a batch; the layers after it are not run."""
        return site_output(self.ctx.model, self.site, batch)

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        forget_mse = masked_mse(self.activations(forget), self.control, counted_tokens(forget))
        terms = {"forget_mse": float(forget_mse.detach())}
        if retain is None or not self.needs_retain:
            return forget_mse, terms
        retain_mse = retain_mse_of(self.ctx.model, self.site, self.store, retain)
        terms["retain_mse"] = float(retain_mse.detach())
        return forget_mse + self.cfg.alpha * retain_mse, terms

    def close(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.close()

    # the memory plan's view (unlearn/memory_plan.py)
    def forget_reach(self, num_layers: int) -> Method.LossReach:
        """Up to `steer_layer`; one site, its float32 difference (the MSE)."""
        return self.LossReach(self.steer_layer, logits=False, sites=1, site_bytes=4)

    def retain_reach(self, num_layers: int) -> Method.LossReach:
        """The same forward as the forget loss's (the MSE to the stored originals)."""
        return self.forget_reach(num_layers)

    @property
    def recorded_sites(self) -> int:
        """The retain originals at `steer_layer`, where the retain term reads them."""
        return 1 if self.needs_retain else 0
