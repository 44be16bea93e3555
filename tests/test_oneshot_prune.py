"""One-shot 2:4 pruning: magnitude, Wanda, SparseGPT — layer primitives and the model-level pass."""

from __future__ import annotations

import pytest
import torch

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.train.calibration import InputStats
from sparsert.train.oneshot_prune import (
    ONESHOT_METHODS,
    magnitude_prune,
    prune_model_oneshot,
    sparsegpt_prune,
    wanda_prune,
)
from sparsert.train.sparse_linear import SparsityConfig
from sparsert.train.sparsify import sparsify_model


def _is_exact_24(mask: torch.Tensor) -> bool:
    return mask.dtype == torch.bool and bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def _recon_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x.double() @ w.double().t() - x.double() @ w_hat.double().t()).norm())


def _stats(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[1], with_gram=True)
    s.add(x)
    return s


def test_correlated_inputs_sparsegpt_beats_wanda_and_magnitude():
    g = torch.Generator().manual_seed(0)
    k, out, tokens = 64, 32, 1024
    # strongly correlated input channels: a few latent factors plus noise, channels of different scales
    latent = torch.randn(tokens, 8, generator=g)
    x = (latent @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(tokens, k, generator=g))
    x = x * torch.linspace(0.2, 3.0, k)
    w = torch.randn(out, k, generator=g)
    st = _stats(x)
    m_mag = magnitude_prune(w)
    m_wanda = wanda_prune(w, st.norms)
    w_sgpt, m_sgpt = sparsegpt_prune(w, st.gram, blocksize=16)
    for m in (m_mag, m_wanda, m_sgpt):
        assert _is_exact_24(m)
    assert is_nm_sparse(w_sgpt) and torch.equal(w_sgpt != 0, m_sgpt & (w_sgpt != 0))
    e_mag, e_wanda, e_sgpt = (_recon_error(x, w, w * m_mag), _recon_error(x, w, w * m_wanda),
                              _recon_error(x, w, w_sgpt))
    assert e_sgpt < 0.8 * e_wanda, (e_sgpt, e_wanda)
    assert e_wanda < e_mag, (e_wanda, e_mag)


def test_orthogonal_inputs_wanda_is_optimal_mask_so_never_worse_than_magnitude():
    # columns of X orthogonal with different norms: ‖X(W − Ŵ)ᵀ‖² = Σ_ij pruned w_ij² ‖X_j‖², which Wanda's
    # per-group choice minimises exactly, so it must be <= magnitude (and SparseGPT cannot do better)
    g = torch.Generator().manual_seed(1)
    k, out = 32, 16
    q, _ = torch.linalg.qr(torch.randn(256, k, generator=g, dtype=torch.float64))
    x = (q * torch.logspace(-1, 1, k, dtype=torch.float64)).float()
    w = torch.randn(out, k, generator=g)
    st = _stats(x)
    e_mag = _recon_error(x, w, w * magnitude_prune(w))
    e_wanda = _recon_error(x, w, w * wanda_prune(w, st.norms))
    w_sgpt, _ = sparsegpt_prune(w, st.gram, percdamp=1e-6)
    assert e_wanda < e_mag
    assert _recon_error(x, w, w_sgpt) == pytest.approx(e_wanda, rel=1e-3)


def test_sparsegpt_with_identity_hessian_is_magnitude():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    w_new, mask = sparsegpt_prune(w, torch.eye(32), blocksize=8)
    assert torch.equal(mask, nm_mask(w))
    torch.testing.assert_close(w_new, w * mask)  # no cross-channel terms: nothing to compensate


def test_sparsegpt_dead_channels_and_errors():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g)
    x[:, 5] = 0  # a channel that never fires
    w = torch.randn(4, 16, generator=g)
    w_new, mask = sparsegpt_prune(w, _stats(x).gram)
    assert _is_exact_24(mask) and torch.isfinite(w_new).all() and w_new[:, 5].eq(0).all()
    with pytest.raises(ConfigError, match="blocksize must be a positive multiple of m=4"):
        sparsegpt_prune(w, torch.eye(16), blocksize=6)
    with pytest.raises(FormatError, match=r"Hessian for weight: shape \(8, 8\), expected \(16, 16\)"):
        sparsegpt_prune(w, torch.eye(8))
    with pytest.raises(FormatError, match=r"Wanda input norms for weight"):
        wanda_prune(w, torch.ones(8))
    with pytest.raises(FormatError, match="not divisible by M=4"):
        magnitude_prune(torch.randn(4, 6))


def _model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=16))


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_oneshot_returns_valid_24_masks(method):
    model = _model()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in sparse_linear_names(model)}
    masks = prune_model_oneshot(model, method, _calib())
    assert list(masks) == sparse_linear_names(model)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert _is_exact_24(mask) and mask.shape == w.shape
        assert not w[~mask].any()  # pruned weights zeroed in the model
        if method != "sparsegpt":
            assert torch.equal(w[mask], dense[name][mask])  # kept weights untouched
    if method == "magnitude":
        assert all(torch.equal(masks[n], nm_mask(dense[n])) for n in masks)
    logits = model(_calib()[0])
    assert torch.isfinite(logits).all()
    assert model.training  # mode restored
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_wanda_runs_block_by_block_on_the_pruned_model():
    model = _model()
    calib = _calib()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in sparse_linear_names(model)}
    masks = prune_model_oneshot(model, "wanda", calib)
    # the input of blocks.1.attn.q_proj depends only on block 0 (pruned first): recompute its norms now
    sumsq = torch.zeros(32)

    def hook(module, inputs):  # noqa: ANN001, ANN202
        sumsq.add_(inputs[0].detach().pow(2).reshape(-1, 32).sum(0))

    h = model.get_submodule("blocks.1.attn.q_proj").register_forward_pre_hook(hook)
    with torch.no_grad():
        for x in calib:
            model(x)
    h.remove()
    name = "blocks.1.attn.q_proj"
    assert torch.equal(masks[name], wanda_prune(before[name], sumsq.sqrt()))


def test_prune_model_oneshot_updates_mask_buffers_and_rejects_bad_input():
    model = _model()
    sparsify_model(model, SparsityConfig())
    masks = prune_model_oneshot(model, "sparsegpt", _calib())
    for name, mask in masks.items():
        assert torch.equal(model.get_submodule(name).mask.bool(), mask)
    assert set(ONESHOT_METHODS) == {"magnitude", "wanda", "sparsegpt"}
    assert prune_model_oneshot(_model(), "magnitude", None)  # no calibration needed
    with pytest.raises(ConfigError, match="'wanda' needs calibration batches"):
        prune_model_oneshot(_model(), "wanda", [])
    with pytest.raises(ConfigError, match="unknown one-shot pruning method 'obs'"):
        prune_model_oneshot(_model(), "obs", _calib())
    with pytest.raises(ConfigError, match="no submodule 'blocks.9.mlp.up_proj'"):
        prune_model_oneshot(_model(), "magnitude", names=["blocks.9.mlp.up_proj"])
