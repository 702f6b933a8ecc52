"""Figures that say how an update relates to the retain data: the cosine between forget and
retain gradients (before and after projection), and how much of the final weight change
reaches held-out retain keys."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kuda_cli.models.adapter import Adapter
from kuda_cli.unlearn.batches import TokenSet
from kuda_cli.unlearn.methods import Method, sequence_nll
from kuda_cli.unlearn.nullspace import UpdateProjector, key_moments
from kuda_cli.unlearn.representations import RepresentationStore, krd, record_sites


def _grads(loss: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(params[n]))
        for n, g in zip(names, grads, strict=True)
    }


def _cos(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    flat_a = torch.cat([a[n].flatten().float() for n in names])
    flat_b = torch.cat([b[n].flatten().float() for n in names])
    return float(F.cosine_similarity(flat_a, flat_b, dim=0, eps=1e-12))


def gradient_conflict(
    method: Method,
    params: dict[str, nn.Parameter],
    forget: dict,
    retain: dict,
    projector: UpdateProjector | None,
) -> dict[str, Any]:
    """Cosine between the method's forget gradient and the retain NLL gradient, over all trained
    parameters and per parameter; `after` projects the forget gradient first."""
    loss, _ = method.loss(forget, None)
    g_forget = _grads(loss, params)
    g_retain = _grads(sequence_nll(method.ctx.model, retain), params)
    names = list(params)
    out: dict[str, Any] = {"before": _cos(g_forget, g_retain, names)}
    if projector is not None:
        projected = dict(g_forget)
        for name, (_, p, in_out) in projector.projectors.items():
            projected[name] = UpdateProjector.apply(g_forget[name], p, in_out)
        out["after"] = _cos(projected, g_retain, names)
        out["per_param"] = {
            name: {
                "before": _cos(g_forget, g_retain, [name]),
                "after": _cos(projected, g_retain, [name]),
            }
            for name in projector.projectors
        }
    return out


@torch.no_grad()
def retain_leak(
    model,
    adapter: Adapter,
    layers: list[int],
    before: dict[int, torch.Tensor],
    keys: TokenSet,
    starting_weights,
) -> dict[str, Any]:
    """Per trained layer, with dW the change of its down_proj (out, in) and K the held-out retain
    keys of the starting model (what the null-space projector protects, on inputs it never saw;
    `starting_weights()` swaps them in): `dw_k_over_dw = ||dW K||_F / (||dW||_F sqrt(n))`, the
    change's action on an average retain key per unit of change, and `vs_random`, the same
    divided by what a random change of the same norm would give (1: the update ignores the
    retain keys; 0: it never touches them)."""
    with starting_weights():
        moments, count = key_moments(model, adapter, layers, keys, desc="held-out retain keys")
    out: dict[str, Any] = {"keys": count}
    for layer in layers:
        dw = adapter.down_proj_weight(model, layer).double() - before[layer].double()
        norm2 = float((dw * dw).sum())
        c = moments[layer]
        if norm2 == 0:
            out[f"l{layer}"] = {"dw_norm": 0.0, "dw_k_over_dw": 0.0, "vs_random": 0.0}
            continue
        action2 = float(torch.trace(dw @ c @ dw.T))  # ||dW K||^2 / n
        isotropic2 = float(torch.trace(c)) / c.shape[0]  # the same for a random unit change
        out[f"l{layer}"] = {
            "dw_norm": norm2**0.5,
            "dw_k_over_dw": (action2 / norm2) ** 0.5,
            "vs_random": (action2 / norm2 / isotropic2) ** 0.5,
        }
    return out


@torch.no_grad()
def heldout_krd(
    model: nn.Module,
    adapter: Adapter,
    layers: list[int],
    heldout: TokenSet,
    starting_weights,
) -> dict[str, Any]:
    """KRD for any method: mean 1 - cos between the MLP outputs of the located layers on the
    held-out forget inputs, now and with the starting weights (`starting_weights()`: a context
    manager that swaps them in), over the subject tokens where the data names them, else every
    token. About 0: unchanged; about 1: orthogonal."""
    sites = {layer: adapter.module_name("mlp", layer) for layer in layers}
    indices = list(range(len(heldout)))
    now, before = RepresentationStore("memory"), RepresentationStore("memory")
    record_sites(model, heldout, indices, list(sites.values()), now, desc="held-out now")
    with starting_weights():
        record_sites(model, heldout, indices, list(sites.values()), before, desc="held-out start")
    return krd(now, before, sites, indices, heldout.focus)


@contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]):
    """`values` copied into `params` for the block, their current values put back after (a
    starting model without a second copy of it: `heldout_krd`'s `starting_weights`)."""
    with torch.no_grad():
        current = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(current[n])
