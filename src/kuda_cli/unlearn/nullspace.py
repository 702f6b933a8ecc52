"""Relaxed null-space projection: keep the weight change of a `down_proj` out of the directions
its retain inputs ("keys") use, so `dW @ k_retain` stays close to 0.

On retain data the second moment `C = K K^T / n` of each trained `down_proj`'s input is
accumulated in a streaming way (float64), then eigen-decomposed. With threshold t:

    hard     P = U_{lambda < t} U_{lambda < t}^T          (directions retain keys barely use)
    relaxed  P = U diag(t / (lambda + t)) U^T             (no direction fully frozen)

and `t` is `tau` itself (`absolute`), `tau` times the largest eigenvalue (`max`), or the
eigenvalue below which the smallest directions hold a fraction `tau` of the keys' energy
(`energy`). The keys are the retain tokens' by default; general text can join or replace them
(unlearn/key_moments.py, unlearn/general_keys.py). Eigen-decompositions are cached on disk per
(model, layer, key sets: their names, sources, shares and tokens), so sweeps over tau reuse
them.

Memory, with d_ff = 14336 (a 7B Llama/Mistral): each layer's moment is one d_ff x d_ff float64
matrix (1.6 GB) on the model's device, summed in place batch after batch (on a CPU through one
shared product buffer, so that the sums are bit-identical to adding fresh products); the
eigendecomposition holds about three such matrices at once (the moment, the eigenvectors, the
solver's workspace: ~5 GB), one layer at a time, on the GPU when there is one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kuda_cli.cache import shared_mode, shared_temp_file
from kuda_cli.models.adapter import Adapter
from kuda_cli.unlearn.batches import TokenSet
from kuda_cli.unlearn.key_moments import KeySet, mixed_key_moments
from kuda_cli.unlearn.key_moments import key_moments as key_moments  # where callers look

log = logging.getLogger(__name__)
STREAM_ROWS = 2048  # rows of a host-resident projector moved to the GPU at a time (14336 wide:
# 117 MB in float32)


@dataclass
class Spectrum:
    eigenvalues: torch.Tensor  # ascending, float64, >= 0
    eigenvectors: torch.Tensor  # columns, float32
    tokens: int  # keys the moment was estimated from


def decomposition_device(
    moment: torch.Tensor, device: str | torch.device | None = "auto"
) -> torch.device:
    """Where `spectrum_of` decomposes: `auto` (or None) is the moment's CUDA device, else the
    first GPU when there is one (cuSOLVER's float64 eigh is far faster than LAPACK's on a few
    CPU cores), else the moment's own device."""
    if device not in (None, "auto"):
        return torch.device(device)
    if moment.device.type == "cuda":
        return moment.device
    return torch.device("cuda") if torch.cuda.is_available() else moment.device


def spectrum_of(
    moment: torch.Tensor, tokens: int, *, device: str | torch.device | None = "auto"
) -> Spectrum:
    """Eigen-decomposition of a key moment, in float64, on `decomposition_device(moment,
    device)`; the spectrum lives on the moment's device. A caller that passes its last
    reference to the moment (`moments.pop(layer)`) frees it here, before the eigenvectors are
    kept. Needs about three d_ff x d_ff float64 matrices on that device (14336: ~5 GB); a GPU
    out of memory falls back to the CPU."""
    home, target = moment.device, decomposition_device(moment, device)
    work = moment.to(device=target, dtype=torch.float64)
    del moment
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(work)
    except torch.cuda.OutOfMemoryError:
        log.warning("no GPU memory for a %d-wide eigendecomposition: on the CPU", work.shape[0])
        work = work.cpu()
        torch.cuda.empty_cache()
        eigenvalues, eigenvectors = torch.linalg.eigh(work)
    del work
    vectors = eigenvectors.float()
    del eigenvectors
    return Spectrum(eigenvalues.clamp_min(0.0).to(home), vectors.to(home), tokens)


def threshold(eigenvalues: torch.Tensor, tau: float, tau_mode: str) -> float:
    if tau_mode == "absolute":
        return float(tau)
    if tau_mode == "max":
        return float(tau * eigenvalues.max())
    if tau_mode == "p99":
        # the largest eigenvalue once the top 1% is set aside: some layers have a few massive
        # activation directions (SmolLM2's layer 2: 591 against 0.27 at the 99th percentile)
        # that make `max` a threshold nothing falls under
        descending = eigenvalues.sort(descending=True).values
        return float(tau * descending[len(descending) // 100])
    if tau_mode == "energy":
        ascending = eigenvalues.sort().values
        share = ascending.cumsum(0) / ascending.sum().clamp_min(1e-300)
        below = int((share <= tau).sum())  # the smallest directions holding <= tau of the energy
        return float(ascending[min(below, len(ascending) - 1)])
    raise ValueError(f"unknown tau_mode {tau_mode!r}")


def projector(
    spectrum: Spectrum, form: str, tau: float, tau_mode: str
) -> tuple[torch.Tensor, dict]:
    """The (d_ff x d_ff) float32 projector and what it keeps."""
    lam = spectrum.eigenvalues
    t = threshold(lam, tau, tau_mode)
    if form == "hard":
        weights = (lam < t).double()
    elif form == "relaxed":
        weights = t / (lam + t) if t > 0 else torch.zeros_like(lam)
    else:
        raise ValueError(f"unknown projector form {form!r}")
    u = spectrum.eigenvectors.double()
    p = (u * weights) @ u.T
    info = {
        "threshold": t,
        "dims": len(lam),
        "dims_below_threshold": int((lam < t).sum()),
        "mean_weight": float(weights.mean()),
        # share of the retain keys' energy the projector lets an update touch
        "energy_passed": float((lam * weights**2).sum() / lam.sum().clamp_min(1e-300)),
        "keys": spectrum.tokens,
    }
    return p.float(), info


def tokens_fingerprint(tokens: TokenSet) -> str:
    return hashlib.sha256(json.dumps(tokens.ids).encode()).hexdigest()


def keys_fingerprint(sets: list[KeySet]) -> str:
    """What the cached spectra of `sets` are keyed by: the retain tokens alone as ever (caches
    written before general keys stay valid); otherwise each set's name, source, share and
    tokens, so that no other key source or mix reads them."""
    if len(sets) == 1 and sets[0].name == "retain" and not sets[0].label:
        return tokens_fingerprint(sets[0].tokens)
    parts = [[s.name, s.label, s.share, tokens_fingerprint(s.tokens)] for s in sets]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def retain_spectra(
    model,
    adapter: Adapter,
    layers: list[int],
    keys: TokenSet | list[KeySet],
    *,
    cache_dir: Path | None,
    model_key: str,
    batch_size: int = 8,
    eigh_device: str | torch.device | None = "auto",
    on_host: bool = False,
) -> dict[int, Spectrum]:
    """Per layer, the spectrum of the keys' second moment (`keys`: the retain tokens, or key
    sets mixed as `mixed_key_moments`), from the cache when there;
    the eigendecompositions run on `eigh_device` (see spectrum_of), one layer at a time, each
    moment freed once decomposed. `on_host` (a model on a GPU, `nullspace.device=host`): one
    key pass per layer, its moment moved to the host as soon as it is summed, so the GPU holds
    one float64 d_ff x d_ff sum at a time and no spectrum (the projector then stays on the host
    too, UpdateProjector streams it)."""
    sets = [KeySet("retain", keys)] if isinstance(keys, TokenSet) else list(keys)
    data_key = keys_fingerprint(sets)
    paths = {
        layer: _cache_path(cache_dir, model_key, layer, data_key) if cache_dir else None
        for layer in layers
    }
    spectra = {layer: _load(path) for layer, path in paths.items() if path and path.exists()}
    missing = [layer for layer in layers if spectra.get(layer) is None]
    if missing and on_host:
        for layer in missing:
            moments, count = mixed_key_moments(model, adapter, [layer], sets, batch_size=batch_size)
            moment = moments.pop(layer).cpu()
            spectra[layer] = spectrum_of(moment, count, device="cpu")
            if paths[layer]:
                _save(paths[layer], spectra[layer])
    elif missing:
        moments, count = mixed_key_moments(model, adapter, missing, sets, batch_size=batch_size)
        for layer in missing:
            spectra[layer] = spectrum_of(moments.pop(layer), count, device=eigh_device)
            if paths[layer]:
                _save(paths[layer], spectra[layer])
    else:
        log.info("null-space spectra of layers %s from the cache", layers)
    return spectra


def _cache_path(cache_dir: Path, model_key: str, layer: int, data_key: str) -> Path:
    key = hashlib.sha256(f"{model_key}|{layer}|{data_key}".encode()).hexdigest()[:24]
    return Path(cache_dir) / "nullspace" / f"layer{layer}-{key}.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load(path: Path) -> Spectrum | None:
    """The cached spectrum, or None (with a warning) when the file is unreadable or its tensors
    do not match the checksum written with them: a damaged entry is recomputed, never trusted."""
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        if expected is None:
            raise ValueError("no checksum (written by an older kuda)")
        if _digest(tensors) != expected:
            raise ValueError("its tensors do not match their checksum")
        return Spectrum(
            tensors["eigenvalues"], tensors["eigenvectors"], int(tensors["tokens"].item())
        )
    except Exception as err:
        log.warning("ignoring the null-space cache %s (%s): recomputing it", path, err)
        return None


def _save(path: Path, spectrum: Spectrum) -> None:
    """Written to a private temporary file and renamed into place: concurrent runs sharing the
    cache see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = shared_temp_file(path, suffix="")
    os.close(fd)
    tensors = {
        "eigenvalues": spectrum.eigenvalues.detach().cpu().contiguous(),
        "eigenvectors": spectrum.eigenvectors.detach().cpu().contiguous(),
        "tokens": torch.tensor([spectrum.tokens]),
    }
    try:
        save_file(tensors, tmp, metadata={"sha256": _digest(tensors)})
        os.chmod(tmp, shared_mode())  # safetensors writes its files 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class UpdateProjector:
    """Applies per-parameter projectors on the input side of `down_proj` weights.

    `project_on="update"`: the step's change `W_new - W_old` is replaced by `(W_new - W_old) P`
    after the optimiser step (Adam rescales gradients element-wise, so a projected gradient does
    not give a projected update). `project_on="grad"`: the gradient is projected before the step.
    """

    def __init__(
        self, projectors: dict[str, tuple[torch.nn.Parameter, torch.Tensor, bool]], on: str
    ):
        # name -> (parameter, P, weight stored as (in, out))
        self.projectors = projectors
        self.on = on

    @staticmethod
    def apply(matrix: torch.Tensor, p: torch.Tensor, in_out: bool) -> torch.Tensor:
        """`matrix @ P` for (out, in) weights, `P @ matrix` for (in, out) ones (P symmetric), in
        float32. A P kept on another device (the host, for a model on a GPU) is streamed over in
        blocks of STREAM_ROWS rows: the matrix's device never holds more than one block of it."""
        if p.device == matrix.device:
            projected = p @ matrix.float() if in_out else matrix.float() @ p
            return projected.to(matrix.dtype)
        return UpdateProjector.streamed(matrix, p, in_out)

    @staticmethod
    def streamed(matrix: torch.Tensor, p: torch.Tensor, in_out: bool) -> torch.Tensor:
        """`apply` with P moved to the matrix's device STREAM_ROWS rows at a time."""
        work = matrix.float()
        out = torch.empty_like(work)
        for start in range(0, p.shape[0], STREAM_ROWS):
            rows = p[start : start + STREAM_ROWS].to(matrix.device, non_blocking=True)
            if in_out:  # rows of P @ M
                out[start : start + STREAM_ROWS] = rows @ work
            else:  # columns of M @ P = M @ (rows of P)^T, P symmetric
                out[:, start : start + STREAM_ROWS] = work @ rows.T
            del rows
        return out.to(matrix.dtype)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step with the projection around it. `update`: each projected tensor is
        stepped on its own (the others' gradients set aside, which every torch optimiser skips,
        so the result is that of one step of all), its change projected, then the rest; one
        copy of one tensor at a time instead of a copy of them all. `grad`: the gradients are
        projected, then one step."""
        params = {id(param) for param, _, _ in self.projectors.values()}
        if self.on == "grad":
            for param, p, in_out in self.projectors.values():
                if param.grad is not None:
                    param.grad.copy_(self.apply(param.grad, p, in_out))
            optimizer.step()
            return
        everything = [q for group in optimizer.param_groups for q in group["params"]]
        grads = {id(q): q.grad for q in everything}
        try:
            for param, p, in_out in self.projectors.values():
                if grads.get(id(param)) is None:
                    continue
                for q in everything:
                    q.grad = grads[id(q)] if q is param else None
                before = param.detach().clone()
                optimizer.step()
                param.copy_(before + self.apply(param - before, p, in_out))
                del before
            for q in everything:
                q.grad = None if id(q) in params else grads[id(q)]
            if any(q.grad is not None for q in everything):
                optimizer.step()
        finally:
            for q in everything:
                q.grad = grads[id(q)]
