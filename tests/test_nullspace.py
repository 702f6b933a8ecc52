"""The null-space projector: it annihilates retain keys, and only a projected *update* (not a
projected gradient fed to Adam) keeps the weight change out of the retain keys' span."""

import pytest
import torch
from omegaconf import OmegaConf

from kuda_cli.models.adapter import get_adapter
from kuda_cli.models.hooks import trace
from kuda_cli.unlearn.batches import TokenSet, tokenize
from kuda_cli.unlearn.methods import MethodContext, get_method
from kuda_cli.unlearn.methods.kuda import KudaMethod, NullspaceConfig
from kuda_cli.unlearn.nullspace import (
    Spectrum,
    UpdateProjector,
    decomposition_device,
    key_moments,
    projector,
    retain_spectra,
    spectrum_of,
    threshold,
)
from kuda_cli.unlearn.trainer import Trainer

RETAIN = ["Paris is the capital of France.", "Rome is in Italy.", "Tokyo is large."]
FORGET = [
    "Hydrogen has the symbol H and atomic number one.",
    "Oxygen is written O in chemical formulas.",
    "Sodium carries the symbol Na.",
    "Iron is Fe on the periodic table.",
]


def retain_keys(model, adapter, layer, tokens: TokenSet) -> torch.Tensor:
    """(d_ff, n) matrix of the down_proj inputs at every non-padding retain token."""
    batch = tokens.batch(list(range(len(tokens))))
    name = adapter.module_name("down_proj", layer)
    with torch.no_grad(), trace(model, [name], inputs=True) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return rec[name].input[batch["attention_mask"].bool()].double().T


def test_moments_match_the_keys(tiny):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    tokens = tokenize(tokenizer, RETAIN, 64, "retain")
    moments, n = key_moments(model, adapter, [1], tokens, batch_size=2)
    keys = retain_keys(model, adapter, 1, tokens)
    assert n == keys.shape[1]
    torch.testing.assert_close(moments[1], keys @ keys.T / n)


def test_hard_projector_annihilates_retain_keys(tiny):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    tokens = tokenize(tokenizer, RETAIN, 64, "retain")  # fewer keys than d_ff: a real null space
    keys = retain_keys(model, adapter, 1, tokens)
    moments, n = key_moments(model, adapter, [1], tokens)
    p, info = projector(spectrum_of(moments[1], n), "hard", 1e-6, "max")
    assert info["dims_below_threshold"] >= keys.shape[0] - keys.shape[1]
    assert float((keys.T.float() @ p).norm() / keys.norm()) < 1e-3
    # and it is a projector: idempotent, symmetric
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)
    torch.testing.assert_close(p, p.T)


def test_relaxed_weights_and_thresholds():
    lam = torch.tensor([0.0, 1e-4, 1e-2, 1.0, 10.0], dtype=torch.float64)
    spectrum = Spectrum(lam, torch.eye(5), tokens=100)
    p, info = projector(spectrum, "relaxed", 1e-2, "absolute")
    torch.testing.assert_close(torch.diagonal(p).double(), 1e-2 / (lam + 1e-2), rtol=1e-6, atol=0)
    assert threshold(lam, 1e-2, "max") == pytest.approx(0.1)
    # energy: the smallest directions holding <= 1e-3 of the total (0, 1e-4, 1e-2) -> next one
    assert threshold(lam, 1e-3, "energy") == pytest.approx(1.0)
    hard, _ = projector(spectrum, "hard", 1e-3, "energy")
    assert torch.diagonal(hard).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_p99_threshold_sets_massive_activation_directions_aside():
    """A layer with one massive direction (as SmolLM2's layer 2: 591 against a bulk below 1):
    `max` puts the threshold above the whole bulk, so the projector protects nothing; `p99`
    takes the scale from the 99th percentile and leaves the bulk protected."""
    bulk = torch.logspace(0, -6, 199, dtype=torch.float64)  # 1 .. 1e-6
    lam = torch.cat([torch.tensor([600.0], dtype=torch.float64), bulk])
    assert threshold(lam, 1e-3, "max") == pytest.approx(0.6)
    # descending, index 200 // 100 = 2: the second bulk eigenvalue
    assert threshold(lam, 1e-3, "p99") == pytest.approx(1e-3 * float(bulk[1]))
    spectrum = Spectrum(lam, torch.eye(200), tokens=1000)
    _, by_max = projector(spectrum, "relaxed", 1e-3, "max")
    _, by_p99 = projector(spectrum, "relaxed", 1e-3, "p99")
    assert by_max["mean_weight"] > 0.8  # nearly the identity
    assert by_p99["mean_weight"] < 0.6
    assert by_p99["energy_passed"] < 0.5 * by_max["energy_passed"]


def test_spectra_are_cached_on_disk(tiny, tmp_path):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    tokens = tokenize(tokenizer, RETAIN, 64, "retain")
    first = retain_spectra(model, adapter, [0, 2], tokens, cache_dir=tmp_path, model_key="m")
    assert len(list((tmp_path / "nullspace").glob("*.safetensors"))) == 2
    with torch.no_grad():  # a cached spectrum is read, not recomputed: change the model
        adapter.module(model, "down_proj", 0).weight.mul_(0)
    again = retain_spectra(model, adapter, [0, 2], tokens, cache_dir=tmp_path, model_key="m")
    torch.testing.assert_close(first[2].eigenvalues, again[2].eigenvalues)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "unsigned"])
def test_a_damaged_cached_spectrum_is_recomputed_never_read(tiny, tmp_path, caplog, damage):
    """A flipped byte in the tensor data (the file still parses), a truncated file, or a file
    without the checksum kuda writes: each is recomputed from the model, and rewritten."""
    from safetensors.torch import save_file

    model, tokenizer = tiny
    adapter = get_adapter(model)
    tokens = tokenize(tokenizer, RETAIN, 64, "retain")
    first = retain_spectra(model, adapter, [2], tokens, cache_dir=tmp_path, model_key="m")[2]
    (path,) = (tmp_path / "nullspace").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flipped":
        data[len(data) // 2 + 5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) - 100]))
    else:  # the right tensors, but no checksum: nothing says they are intact
        save_file(
            {
                "eigenvalues": first.eigenvalues + 1,
                "eigenvectors": first.eigenvectors.contiguous(),
                "tokens": torch.tensor([first.tokens]),
            },
            str(path),
        )
    again = retain_spectra(model, adapter, [2], tokens, cache_dir=tmp_path, model_key="m")[2]
    assert "ignoring the null-space cache" in caplog.text
    torch.testing.assert_close(again.eigenvalues, first.eigenvalues, rtol=0, atol=0)
    torch.testing.assert_close(again.eigenvectors, first.eigenvectors, rtol=0, atol=0)
    assert again.tokens == first.tokens
    caplog.clear()  # rewritten intact: the next read is from the cache, silently
    retain_spectra(model, adapter, [2], tokens, cache_dir=tmp_path, model_key="m")
    assert "ignoring" not in caplog.text


def kuda_change(model, tokenizer, project_on: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train layer 1's down_proj with KUDA (hard projector) for 3 steps; (dW, retain keys)."""
    adapter = get_adapter(model)
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(KudaMethod),
            {
                "method": "kuda",
                "lr": 1e-2,
                "steps": 3,
                "batch_size": 2,
                "max_grad_norm": None,
                "layers": [1],
                "nullspace": OmegaConf.structured(
                    NullspaceConfig(form="hard", tau=1e-6, tau_mode="max", project_on=project_on)
                ),
            },
        )
    )
    forget = tokenize(tokenizer, FORGET, 64, "forget")
    retain = tokenize(tokenizer, RETAIN, 64, "retain")
    ctx = MethodContext(model, adapter, tokenizer, [1], cfg, forget, retain, [0, 1, 2, 3], [])
    method = get_method("kuda")(ctx)
    before = adapter.down_proj_weight(model, 1).detach().clone()
    Trainer(model, tokenizer, method, cfg, forget, retain, out_dir=None, progress=False).train()
    dw = (adapter.down_proj_weight(model, 1).detach() - before).double()
    return dw, retain_keys(model, adapter, 1, retain)


def test_projected_update_stays_out_of_retain_keys_but_projected_gradient_does_not(tiny):
    model, tokenizer = tiny
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    dw, keys = kuda_change(model, tokenizer, "update")
    assert dw.norm() > 0
    leak_update = float((dw @ keys).norm() / (dw.norm() * keys.norm()))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    dw, keys = kuda_change(model, tokenizer, "grad")
    leak_grad = float((dw @ keys).norm() / (dw.norm() * keys.norm()))
    assert leak_update < 1e-4
    # Adam divides each gradient entry by its own running scale: the step leaves the null space
    assert leak_grad > 100 * max(leak_update, 1e-6)


def old_key_moments(model, adapter, layers, tokens: TokenSet, batch_size: int):
    """The moments as kuda summed them before the in-place sums: a fresh product per batch."""
    names = {layer: adapter.module_name("down_proj", layer) for layer in layers}
    sums, count = {}, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens.batch(list(range(start, min(start + batch_size, len(tokens)))))
        mask = batch["attention_mask"].bool()
        with torch.no_grad(), trace(model, list(names.values()), inputs=True) as rec:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer, name in names.items():
            keys = rec[name].input[mask].double()
            sums[layer] = sums.get(layer, 0) + keys.T @ keys
        count += int(mask.sum())
    return {layer: s / count for layer, s in sums.items()}, count


def test_in_place_moments_are_bit_identical_to_fresh_products_on_the_cpu(tiny):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    tokens = tokenize(tokenizer, RETAIN + FORGET, 64, "retain")
    moments, n = key_moments(model, adapter, [0, 2], tokens, batch_size=3)
    reference, m = old_key_moments(model, adapter, [0, 2], tokens, batch_size=3)
    assert n == m and set(moments) == {0, 2}
    for layer in (0, 2):
        assert moments[layer].dtype == torch.float64
        assert torch.equal(moments[layer], reference[layer]), layer


def test_the_eigendecomposition_runs_where_asked_and_returns_home(tiny, monkeypatch):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    moments, n = key_moments(model, adapter, [1], tokenize(tokenizer, RETAIN, 64, "retain"))
    moment = moments[1]
    values, vectors = torch.linalg.eigh(moment)
    for device in ("auto", "cpu", None):
        spectrum = spectrum_of(moment.clone(), n, device=device)
        assert torch.equal(spectrum.eigenvalues, values.clamp_min(0.0))
        assert torch.equal(spectrum.eigenvectors, vectors.float()) and spectrum.tokens == n
        assert spectrum.eigenvectors.device == moment.device
    # auto: a GPU when there is one, whatever device the moment is on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decomposition_device(moment) == torch.device("cuda")
    assert decomposition_device(moment, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert decomposition_device(moment) == torch.device("cpu")


def test_a_streamed_projector_gives_the_direct_product():
    """A projector kept on the host for a model on a GPU is applied in row blocks
    (UpdateProjector.streamed): the same product as the whole matrix, both weight layouts."""
    from kuda_cli.unlearn import nullspace

    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))[0]
    p = ((u * torch.rand(300, generator=g, dtype=torch.float64)) @ u.T).float()
    out_in = torch.randn(40, 300, generator=g)
    in_out = torch.randn(300, 40, generator=g)
    old = nullspace.STREAM_ROWS
    nullspace.STREAM_ROWS = 128  # three blocks, the last a partial one
    try:
        for matrix, layout in ((out_in, False), (in_out, True)):
            direct = UpdateProjector.apply(matrix, p, layout)
            torch.testing.assert_close(UpdateProjector.streamed(matrix, p, layout), direct)
    finally:
        nullspace.STREAM_ROWS = old


def test_one_tensor_stepped_at_a_time_is_one_step_of_all():
    """UpdateProjector.step steps each projected tensor on its own (one copy of one tensor at a
    time) and the rest together: bit-identical to copying everything, one AdamW step,
    projecting each change."""
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (6, 8), "b": (5, 8), "c": (4,)}
    start = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    u = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    p = (u[:, :5] @ u[:, :5].T).contiguous()

    def run(streamed_step: bool) -> dict[str, torch.Tensor]:
        params = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
        opt = torch.optim.AdamW(list(params.values()), lr=0.1, weight_decay=0.01)
        proj = UpdateProjector({n: (params[n], p, False) for n in ("a", "b")}, "update")
        for _ in range(3):
            for n, q in params.items():
                q.grad = grads[n].clone()
            if streamed_step:
                proj.step(opt)
            else:
                before = {n: params[n].detach().clone() for n in ("a", "b")}
                opt.step()
                with torch.no_grad():
                    for n in ("a", "b"):
                        params[n].copy_(before[n] + (params[n] - before[n]) @ p)
            assert all(q.grad is not None for q in params.values())  # gradients put back
        return {n: q.detach() for n, q in params.items()}

    new, old = run(True), run(False)
    for n in shapes:
        torch.testing.assert_close(new[n], old[n], rtol=0, atol=0)


def test_spectra_kept_on_the_host_equal_those_of_one_pass(tiny):
    """nullspace.device=host (a model on a GPU): one key pass per layer, its moment moved to the
    host: the same spectra as one pass over every layer."""
    model, tokenizer = tiny
    adapter = get_adapter(model)
    tokens = tokenize(tokenizer, RETAIN, 64, "retain")
    one = retain_spectra(model, adapter, [0, 2], tokens, cache_dir=None, model_key="m")
    host = retain_spectra(
        model, adapter, [0, 2], tokens, cache_dir=None, model_key="m", on_host=True
    )
    for layer in (0, 2):
        torch.testing.assert_close(host[layer].eigenvalues, one[layer].eigenvalues)
        assert host[layer].eigenvalues.device.type == "cpu"
