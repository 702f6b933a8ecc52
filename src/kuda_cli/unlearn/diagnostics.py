"""Figures that say how an update relates to the retain data: the cosine between forget and
retain gradients (before and after projection), and how much of the final weight change
reaches held-out retain keys."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kuda_cli.models.adapter import Adapter
from kuda_cli.unlearn.batches import TokenSet
from kuda_cli.unlearn.methods import Method, predicted_tokens, sequence_logprob
from kuda_cli.unlearn.nullspace import UpdateProjector, key_moments
from kuda_cli.unlearn.representations import RepresentationStore, krd, record_sites


class _Sums:
    """Dot products and squared norms of two gradients, per parameter, in float64."""

    def __init__(self):
        self.per: dict[str, dict[str, float]] = {}

    def add(self, name: str, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.flatten().double(), b.flatten().double()
        row = self.per.setdefault(name, {})
        row[f"{key}_dot"] = row.get(f"{key}_dot", 0.0) + float(a @ b)
        row[f"{key}_aa"] = row.get(f"{key}_aa", 0.0) + float(a @ a)
        row["bb"] = float(b @ b)

    @staticmethod
    def cos(rows: list[dict[str, float]], key: str) -> float:
        dot = sum(r.get(f"{key}_dot", 0.0) for r in rows)
        aa = sum(r.get(f"{key}_aa", 0.0) for r in rows)
        bb = sum(r.get("bb", 0.0) for r in rows)
        return dot / max(aa**0.5 * bb**0.5, 1e-12)


def gradient_conflict(
    method: Method,
    params: dict[str, nn.Parameter],
    forget: dict,
    retain: dict,
    projector: UpdateProjector | None,
) -> dict[str, Any]:
    """Cosine between the method's forget gradient and the retain NLL gradient, over all trained
    parameters and per parameter; `after` projects the forget gradient first.

    Streamed: the retain gradient is summed one sequence at a time and kept (one copy of the
    trained parameters, in their dtype), then the forget gradient is reduced to dot products
    parameter by parameter as backward produces it, each freed at once; no float32
    concatenation of either."""
    names = list(params)
    saved = {n: params[n].grad for n in names}
    retain_grads = _retain_gradients(method, params, retain)
    projected = projector.projectors if projector is not None else {}
    try:
        sums = _forget_dots(method, params, forget, retain_grads, projected)
    finally:
        for n in names:
            params[n].grad = saved[n]
    for n in names:  # trained but unused by the forget loss: the retain gradient's norm only
        if retain_grads[n] is not None:
            g = retain_grads[n].flatten().double()
            sums.per[n] = {"bb": float(g @ g)}
    return _cosines(sums, names, projected)


def _retain_gradients(method: Method, params: dict[str, nn.Parameter], retain: dict) -> dict:
    """The retain batch's token-weighted NLL gradient of each parameter (None where it has
    none), the parameters' .grad left empty."""
    names = list(params)
    for n in names:
        params[n].grad = None
    # one retain sequence at a time, each weighted by its share of the batch's tokens: the sum
    # is the batch's token-weighted NLL gradient, with one sequence's activations alive
    tokens = predicted_tokens(retain).sum()
    for i in range(retain["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in retain.items() if isinstance(v, torch.Tensor)}
        logp, _ = sequence_logprob(method.ctx.model, row)
        (-logp.sum() / tokens).backward(inputs=[params[n] for n in names])
    retain_grads = {n: params[n].grad for n in names}
    for n in names:
        params[n].grad = None
    return retain_grads


def _forget_dots(
    method: Method, params: dict[str, nn.Parameter], forget: dict, retain_grads: dict, projected
) -> _Sums:
    """The forget loss's backward, each parameter's gradient reduced against its retain
    gradient (and projected, where the projector acts on it) as soon as it is accumulated,
    then freed with the retain gradient (set to None in `retain_grads`)."""
    names = list(params)
    sums = _Sums()

    def reduce(name: str):
        def hook(param: torch.Tensor) -> None:
            g_forget = param.grad
            g_retain = retain_grads[name]
            if g_retain is None:
                g_retain = torch.zeros_like(g_forget)
            sums.add(name, "before", g_forget, g_retain)
            if name in projected:
                _, p, in_out = projected[name]
                sums.add(name, "after", UpdateProjector.apply(g_forget, p, in_out), g_retain)
            param.grad = None
            retain_grads[name] = None  # this parameter is done: free its retain gradient

        return hook

    handles = [params[n].register_post_accumulate_grad_hook(reduce(n)) for n in names]
    try:
        loss, _ = method.loss(forget, None)
        loss.backward(inputs=[params[n] for n in names])
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _cosines(sums: _Sums, names: list[str], projected) -> dict[str, Any]:
    """The cosines over all parameters, before and (with a projector) after projection, and
    per projected parameter."""
    rows = [sums.per.get(n, {}) for n in names]
    out: dict[str, Any] = {"before": _Sums.cos(rows, "before")}
    if projected:
        chosen = [n for n in names if n in projected]
        # parameters the projector leaves alone enter "after" unprojected
        rows_after = [
            {
                **r,
                "after_dot": r.get("after_dot", r.get("before_dot", 0.0)),
                "after_aa": r.get("after_aa", r.get("before_aa", 0.0)),
            }
            for r in rows
        ]
        out["after"] = _Sums.cos(rows_after, "after")
        out["per_param"] = {
            n: {
                "before": _Sums.cos([sums.per.get(n, {})], "before"),
                "after": _Sums.cos([sums.per.get(n, {})], "after"),
            }
            for n in chosen
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
        now = adapter.down_proj_weight(model, layer)
        dw = now.double() - before[layer].to(now.device).double()
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
