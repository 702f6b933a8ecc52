"""KUDA's deviation objective: push the representations of forget tokens at the located layers
away from their original values, under a relaxed null-space projection of the retain keys.

Per forget token the loss reads (`unlearn.tokens`; by default the last token of each mention of
the subject where the data names subjects, else every non-padding token) and located layer, with
c the cosine between the current and the original representation (the MLP output, or the
residual stream after the block):

    softplus  softplus(beta * (c - margin)) / beta     (default: a smooth hinge at `margin`)
    linear    relu(c - margin)
    square    relu(c - margin) ** 2

averaged over tokens, then over layers. Originals come from the starting model, computed once
before the first step (memory or disk), never from a second model copy.

`unlearn.target=unknown` replaces the push by a pull: each mention's last token towards what
the starting model writes there when an invented name stands in the subject's place (an entity
it never learned), as the squared distance relative to the original's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kuda_cli.config import UnlearnConfig, bounded, choice
from kuda_cli.data.kinds import kind_of
from kuda_cli.errors import ConfigError, UserError
from kuda_cli.models.hooks import trace
from kuda_cli.unlearn.general_keys import (
    GeneralTextConfig,
    check_general,
    general_hub_sources,
    general_texts,
    key_budget,
    key_dims,
    key_sets,
    uses_general,
)
from kuda_cli.unlearn.methods import Method, register_method, with_retain_nll
from kuda_cli.unlearn.methods.rmu import retain_mse_of
from kuda_cli.unlearn.nullspace import UpdateProjector, projector, retain_spectra
from kuda_cli.unlearn.representations import RepresentationStore, deepest, krd, record_sites
from kuda_cli.unlearn.unknown import unknown_loss, unknown_targets

log = logging.getLogger(__name__)


def deviation(cos: torch.Tensor, form: str, beta: float, margin: float) -> torch.Tensor:
    if form == "softplus":
        return F.softplus(beta * (cos - margin)) / beta
    if form == "linear":
        return F.relu(cos - margin)
    if form == "square":
        return F.relu(cos - margin) ** 2
    raise ValueError(f"unknown loss form {form!r}")


def masked_cosine(h: torch.Tensor, h0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token cosine, 0 (and no gradient) at padding."""
    cos = F.cosine_similarity(h.float(), h0.float(), dim=-1, eps=1e-8)
    return torch.where(mask.bool(), cos, torch.zeros_like(cos))


def last_of_spans(focus: torch.Tensor) -> torch.Tensor:
    """1 at the last token of each run of 1s along the last dimension, 0 elsewhere."""
    following = torch.zeros_like(focus)
    following[..., :-1] = focus[..., 1:]
    return focus * (1 - following)


@dataclass
class NullspaceConfig:
    enabled: bool = True
    form: str = choice("relaxed", "relaxed", "hard")
    tau: float = bounded(4e-3, gt=0)
    # tau x the retain keys' eigenvalue at the 99th percentile: robust to the massive-activation
    # directions of some layers (docs/kuda_measurements.md)
    tau_mode: str = choice("p99", "energy", "max", "p99", "absolute")
    project_on: str = choice("update", "update", "grad")
    samples: int = bounded(256, ge=1)  # retain sequences used to estimate the key covariance
    # whose down_proj inputs the projection keeps out of the update's way: `retain` (the first
    # `samples` retain sequences), `general` (general text, from `general`), `retain+general`
    # (both moments mixed, general.share of it general's): docs/kuda_measurements.md
    key_source: str = choice("retain", "retain", "general", "retain+general")
    general: GeneralTextConfig = field(default_factory=GeneralTextConfig)
    # where the d_ff x d_ff key moments, spectra and projectors live: `host` (one key pass per
    # layer, the eigendecomposition and the projectors on the CPU, each projector streamed to
    # the GPU in row blocks at every step: about 0.8 GB less GPU memory per trained layer at
    # d_ff 14336), `model` (the model's device: faster, more memory); `auto`: host for a model
    # on a GPU (KUDA's peak within 1.3x the bf16 weights at 7B), the same thing on a CPU
    device: str = choice("auto", "auto", "host", "model")


@dataclass
class KudaMethod(UnlearnConfig):
    """Settings the paper does not state are our defaults, chosen on the embedded model
    (docs/kuda_measurements.md)."""

    method: str = "kuda"
    lr: float = bounded(3e-3, gt=0)
    beta: float = bounded(10.0, gt=0)
    margin: float = bounded(0.0, ge=-1, le=1)
    loss_form: str = choice("softplus", "softplus", "linear", "square")
    site: str = choice("mlp_out", "mlp_out", "residual")
    # forget tokens the loss reads: `subject` (the subject's tokens, where the data names one:
    # facts), `last` (the last token of each subject mention: ROME's site), `all` (every
    # non-padding token), `auto` (last when subjects are known, else all; the subject's tokens
    # were the default until 2026-12-03: docs/kuda_measurements.md)
    tokens: str = choice("auto", "auto", "subject", "last", "all")
    # what the loss does with them: `away` (push from the original: the cosine forms above),
    # `unknown` (pull each subject mention's last token towards what the starting model writes
    # there for invented names in the same passage: an entity it never learned; needs subjects)
    target: str = choice("away", "away", "unknown")
    unknown_names: int = bounded(4, ge=1)  # invented names averaged into each target
    retain_weight: float = bounded(0.0, ge=0)
    # RMU's retain term beside the projection: weight x the mean squared difference between the
    # block output of the deepest trained layer on retain tokens and its original (what the
    # per-layer projection cannot see: the trained layers' changes composing); 0: none
    retain_act_weight: float = bounded(0.0, ge=0)
    # the cosine is maximal at the original, so its gradient there is 0: a seeded perturbation of
    # the trained weights (std = init_noise x the weight's std, projected) breaks the symmetry
    init_noise: float = bounded(1e-2, ge=0)
    nullspace: NullspaceConfig = field(default_factory=NullspaceConfig)


@register_method("kuda", KudaMethod)
class Kuda(Method):
    supports_lora = False  # its loss and projector read named down_proj modules

    @classmethod
    def check_config(cls, cfg) -> None:
        """The subject-token options need data that names subjects: refused before anything
        loads, not after tracing."""
        unlearn, data = cfg.unlearn, cfg.data
        check_general(cfg)
        if kind_of(data).names_subjects:
            return
        if unlearn.get("target") == "unknown":
            raise ConfigError(
                f"unlearn.target=unknown needs data that names subjects (data=facts), not "
                f"data={data.get('name')}; use unlearn.target=away"
            )
        if unlearn.get("tokens") in ("subject", "last"):
            raise ConfigError(
                f"unlearn.tokens={unlearn.tokens} needs data that names subjects (data=facts), "
                f"not data={data.get('name')}; use unlearn.tokens=auto or all"
            )

    @classmethod
    def hub_sources(cls, cfg) -> list:
        return general_hub_sources(cfg)

    @classmethod
    def report_settings(cls, unlearn: dict[str, Any]) -> list[tuple[str, Any]]:
        nullspace = unlearn.get("nullspace")
        if not isinstance(nullspace, dict):
            return []
        if not nullspace.get("enabled", True):
            return [("nullspace", "off")]
        shown = ("form", "tau", "tau_mode", "project_on")
        out = [(f"ns.{k}", nullspace[k]) for k in shown if k in nullspace]
        if nullspace.get("key_source", "retain") != "retain":
            out.append(
                ("ns.key_source", f"{nullspace['key_source']}:{nullspace['general']['source']}")
            )
        return out

    def sites(self) -> dict[int, str]:
        kind = "mlp" if self.cfg.site == "mlp_out" else "layer"
        return {layer: self.ctx.adapter.module_name(kind, layer) for layer in self.trained_layers}

    @property
    def reads_own_site(self) -> bool:
        """Whether the loss reads another site or other tokens than the shared KRD (MLP outputs,
        subject tokens), so that KUDA reports `krd_loss_site` beside it."""
        heldout = self.ctx.forget_heldout
        named = heldout is not None and heldout.focus is not None
        last = self.cfg.tokens in ("last", "auto") and named
        return self.cfg.site != "mlp_out" or self.cfg.tokens == "all" or last

    @property
    def needs_retain(self) -> bool:  # type: ignore[override]
        return self.cfg.retain_weight > 0 or self.cfg.retain_act_weight > 0

    @property
    def retain_site(self) -> str:
        return self.ctx.adapter.module_name("layer", max(self.trained_layers))

    def prepare(self) -> None:
        ctx = self.ctx
        directory = ctx.work_dir / "originals" if ctx.work_dir else None
        self.store = RepresentationStore(self.cfg.originals, directory)
        sites = list(self.sites().values())
        record_sites(ctx.model, ctx.forget, ctx.forget_used, sites, self.store)
        if self.cfg.retain_act_weight > 0:
            self.retain_store = RepresentationStore("memory")
            record_sites(
                ctx.model,
                ctx.retain,
                ctx.retain_used,
                [self.retain_site],
                self.retain_store,
                desc="original retain activations",
            )
        if self.cfg.target == "unknown":
            self.unknown = unknown_targets(ctx, self.store, sites, self.cfg.unknown_names)
        # held-out originals only where KUDA reports its own site's KRD (the KRD every method
        # reports, diagnostics.heldout_krd, records its own from the starting weights)
        self.heldout = ctx.forget_heldout if self.reads_own_site else None
        if self.heldout is not None:
            self.heldout_store = RepresentationStore("memory")
            record_sites(
                ctx.model,
                self.heldout,
                list(range(len(self.heldout))),
                sites,
                self.heldout_store,
                desc="held-out originals",
            )

    def loss_mask(self, batch: dict) -> torch.Tensor:
        """The tokens the loss reads: non-padding, and the subject's where asked and known."""
        mask = batch["attention_mask"]
        if self.cfg.tokens != "all" and "focus_mask" in batch:
            focus = batch["focus_mask"]
            return mask * (focus if self.cfg.tokens == "subject" else last_of_spans(focus))
        if self.cfg.tokens in ("subject", "last"):
            raise UserError(
                f"unlearn.tokens={self.cfg.tokens} needs data that names subjects (data=facts); "
                "use unlearn.tokens=all"
            )
        return mask

    def loss(self, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        total, terms = self.forget_loss(forget)
        if retain is not None and self.cfg.retain_act_weight > 0:
            mse = retain_mse_of(self.ctx.model, self.retain_site, self.retain_store, retain)
            terms["retain_mse"] = float(mse.detach())
            total = total + self.cfg.retain_act_weight * mse
        return with_retain_nll(self.ctx.model, total, retain, self.cfg.retain_weight, terms), terms

    def forget_loss(self, forget: dict) -> tuple[torch.Tensor, dict[str, float]]:
        sites = self.sites()
        with trace(
            self.ctx.model,
            list(sites.values()),
            stop_after=deepest(self.ctx.model, list(sites.values())),
        ) as rec:
            self.ctx.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"])
        if self.cfg.target == "unknown":
            terms: dict[str, float] = {}
            total = unknown_loss(self.unknown, self.store, forget, rec, sites, terms)
            terms["deviation"] = float(total.detach())
            return total, terms
        mask = self.loss_mask(forget)
        width = mask.shape[1]
        total = torch.zeros((), device=mask.device)
        terms: dict[str, float] = {}
        tokens = mask.sum().clamp_min(1)
        for layer, site in sites.items():
            original = self.store.padded(forget["index"], site, width, mask.device)
            cos = masked_cosine(rec[site].output, original, mask)
            per_token = deviation(cos, self.cfg.loss_form, self.cfg.beta, self.cfg.margin)
            total = total + (per_token * mask).sum() / tokens / len(sites)
            terms[f"cos_l{layer}"] = float(cos.detach().sum() / tokens)
        terms["deviation"] = float(total.detach())
        return total, terms

    def projector(self, params: dict[str, nn.Parameter]) -> UpdateProjector | None:
        ns = self.cfg.nullspace
        if not ns.enabled:
            return None
        ctx = self.ctx
        model_device = next(ctx.model.parameters()).device
        on_host = model_device.type != "cpu" and ns.device in ("auto", "host")
        spectra = retain_spectra(
            ctx.model,
            ctx.adapter,
            self.trained_layers,
            key_sets(ctx, ns, self.trained_layers[0]),
            cache_dir=ctx.cache_dir,
            model_key=ctx.model_key,
            on_host=on_host,
        )
        by_param = {
            f"{ctx.adapter.module_name('down_proj', layer)}.weight": layer
            for layer in self.trained_layers
        }
        projectors, self.projector_info = {}, {}
        for name, param in params.items():
            if name not in by_param:
                log.warning(
                    "null-space projection covers down_proj weights only; %s is not projected", name
                )
                continue
            layer = by_param[name]
            p, info = projector(spectra[layer], ns.form, ns.tau, ns.tau_mode)
            # on the host (pinned, for asynchronous copies) or on the model's device
            p = p.cpu().pin_memory() if on_host else p.to(param.device)
            projectors[name] = (param, p, ctx.adapter.down_proj_weight_is_in_out)
            info["device"] = "host" if on_host else str(param.device)
            self.projector_info[f"l{layer}"] = info
        return UpdateProjector(projectors, ns.project_on)

    def tuning_texts(self) -> list[str] | None:
        """With general keys, auto_tune's stability texts: the same source's held out ones."""
        ns, ctx = self.cfg.nullspace, self.ctx
        if not uses_general(ns):
            return None
        budget = key_budget(ns.general, key_dims(ctx, self.trained_layers[0]))
        return general_texts(ctx, ns.general, budget).heldout

    @torch.no_grad()
    def initialise(self, params: dict[str, nn.Parameter], projector) -> None:
        if not self.cfg.init_noise:
            return
        generator = torch.Generator().manual_seed(self.ctx.seed)
        for name, param in params.items():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            noise = (noise * self.cfg.init_noise * param.float().std().cpu()).to(param.device)
            if projector is not None and name in projector.projectors:
                _, p, in_out = projector.projectors[name]
                noise = UpdateProjector.apply(noise, p, in_out)
            param.add_(noise.to(param.dtype))

    @torch.no_grad()
    def diagnostics(self, params: dict[str, nn.Parameter]) -> dict[str, Any]:
        """The projector's figures; and where the loss reads another site or other tokens than
        the KRD every method reports (MLP outputs, subject tokens: diagnostics.heldout_krd),
        `krd_loss_site`, the same measure at the loss's own site and tokens."""
        out: dict[str, Any] = {}
        if getattr(self, "projector_info", None):
            out["projector"] = self.projector_info
        if self.heldout is None:
            return out
        sites = self.sites()
        now = RepresentationStore("memory")
        indices = list(range(len(self.heldout)))
        record_sites(
            self.ctx.model,
            self.heldout,
            indices,
            list(sites.values()),
            now,
            desc="held-out representations",
        )
        focus = self.heldout.focus if self.cfg.tokens != "all" else None
        if focus is not None and self.cfg.tokens != "subject":  # last / auto: mentions' last
            focus = [last_of_spans(torch.tensor(row)).tolist() for row in focus]
        out["krd_loss_site"] = krd(now, self.heldout_store, sites, indices, focus)
        return out

    def close(self) -> None:
        stores = ("store", "heldout_store", "retain_store")
        for store in (getattr(self, name, None) for name in stores):
            if store is not None:
                store.close()

    # the memory plan's view (unlearn/memory_plan.py)
    memory_target = 1.3  # KUDA's peak within 1.3x the bf16 weights (at 7B)

    def forget_reach(self, num_layers: int) -> Method.LossReach:
        """Up to the deepest trained layer; per site, float32 copies of h and h0 (the cosine)."""
        layers = self.trained_layers
        return self.LossReach(max(layers), logits=False, sites=len(layers), site_bytes=8)

    @property
    def recorded_sites(self) -> int:
        """The forget originals at every trained layer's site."""
        return len(self.trained_layers)

    @property
    def nullspace_settings(self) -> NullspaceConfig | None:
        return self.cfg.nullspace if self.cfg.nullspace.enabled else None
