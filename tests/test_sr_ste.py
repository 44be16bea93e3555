"""SR-STE gradients, INT4 QAT numerics, SparseLinear masks/flip rate, and sparsify_model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.int4 import dequantize_int4, quantize_int4
from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.runtime.packed_linear import pack_linear
from sparsert.train.qat import fake_quant_int4_ste
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig
from sparsert.train.sparsify import mask_sparsity, refresh_masks, set_dense, sparse_modules, sparsify_model
from sparsert.train.sr_ste import sr_ste_linear, sr_ste_weight


def _inputs(seed: int = 0, out: int = 6, k: int = 16, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, k, generator=g)
    w = torch.randn(out, k, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    r = torch.randn(3, 5, out, generator=g)  # upstream gradient via loss = sum(y * r)
    return x, w, b, r


def _reference_grads(x, w, mask, b, r, decay):
    """Manual autograd: plain linear on the masked weight as a leaf, then add λ(1 − m)⊙W."""
    xr = x.clone().requires_grad_()
    wk = (w * mask).detach().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    y = F.linear(xr, wk, br)
    (y * r).sum().backward()
    gw = wk.grad + decay * (1 - mask.float()) * w
    return y.detach(), xr.grad, gw, None if b is None else br.grad


@pytest.mark.parametrize("decay", [2e-4, 0.3, 0.0])
@pytest.mark.parametrize("bias", [True, False])
def test_sr_ste_linear_gradient_is_ste_plus_decay(decay, bias):
    x, w, b, r = _inputs(bias=bias)
    mask = nm_mask(w).to(torch.uint8)
    y_ref, gx_ref, gw_ref, gb_ref = _reference_grads(x, w, mask, b, r, decay)

    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    bs = b.clone().requires_grad_() if bias else None
    y = sr_ste_linear(xs, ws, mask, bs, decay)
    (y * r).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(xs.grad, gx_ref)
    torch.testing.assert_close(ws.grad, gw_ref)
    if bias:
        torch.testing.assert_close(bs.grad, gb_ref)
    # The decay term acts on pruned weights only: kept positions get exactly the straight-through gradient.
    kept = mask.bool()
    torch.testing.assert_close(ws.grad[kept], (gw_ref - decay * (1 - mask.float()) * w)[kept])


def test_sr_ste_weight_form_matches_fused_linear():
    x, w, b, r = _inputs(seed=1)
    mask = nm_mask(w, 1, 4).to(torch.uint8)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    (sr_ste_linear(x, w1, mask, b, 0.1) * r).sum().backward()
    (F.linear(x, sr_ste_weight(w2, mask, 0.1), b) * r).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    _, _, gw_ref, _ = _reference_grads(x, w, mask, b, r, 0.1)
    torch.testing.assert_close(w2.grad, gw_ref)


def test_sparse_linear_forward_and_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(16, 6)
    layer = SparseLinear.from_linear(lin, SparsityConfig(decay=0.05))
    assert layer.weight is lin.weight and layer.bias is lin.bias  # parameters kept
    assert layer.mask.dtype == torch.uint8 and torch.equal(layer.mask.bool(), nm_mask(lin.weight))
    x, _, _, r = _inputs(out=6)
    y_ref, _, gw_ref, gb_ref = _reference_grads(x, lin.weight.detach(), layer.mask, lin.bias.detach(), r, 0.05)
    y = layer(x)
    (y * r).sum().backward()
    torch.testing.assert_close(y.detach(), y_ref)
    torch.testing.assert_close(layer.weight.grad, gw_ref)
    torch.testing.assert_close(layer.bias.grad, gb_ref)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_ref)  # inference path: same values, no custom autograd
    layer.dense = True
    torch.testing.assert_close(layer(x).detach(), lin(x).detach())


def test_qat_forward_equals_dequant_quant_of_kept_values_and_the_artifact_weights():
    torch.manual_seed(0)
    g = 8
    layer = SparseLinear(32, 6, config=SparsityConfig(qat_group_size=g))
    x = torch.randn(2, 3, 32)
    w_kept = layer.weight.detach() * layer.mask
    codes, scales = quantize_int4(w_kept, g)
    expected_w = dequantize_int4(codes, scales, g)
    torch.testing.assert_close(layer(x), F.linear(x, expected_w, layer.bias), rtol=0, atol=0)
    assert torch.equal(layer.effective_weight(), expected_w)
    packed = pack_linear(layer.weight.detach(), mask=layer.mask.bool(), int4_group_size=g)
    assert torch.equal(packed.to_dense(), expected_w)  # what the compressed artifact will hold
    assert is_nm_sparse(expected_w)


def test_qat_gradient_is_straight_through_with_sr_ste_decay():
    torch.manual_seed(0)
    layer = SparseLinear(16, 4, bias=False, config=SparsityConfig(qat_group_size=8, decay=0.02))
    x = torch.randn(5, 16)
    r = torch.randn(5, 4)
    (layer(x) * r).sum().backward()
    weff = layer.effective_weight().requires_grad_()
    (F.linear(x, weff) * r).sum().backward()
    expected = weff.grad + 0.02 * (1 - layer.mask.float()) * layer.weight.detach()
    torch.testing.assert_close(layer.weight.grad, expected)
    w = torch.randn(4, 16, requires_grad=True)
    fake_quant_int4_ste(w, 8).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qat_rejects_group_size_not_dividing_k():
    with pytest.raises(FormatError, match=r"blocks\.0\.weight of shape \(4, 24\): K=24 is not divisible by the INT4"):
        SparseLinear(24, 4, config=SparsityConfig(qat_group_size=16), name="blocks.0.weight")


def test_flip_rate_on_a_constructed_case():
    layer = SparseLinear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3, 2, 1, 8, 7, 6, 5],
                                         [1.0, 2, 3, 4, 5, 6, 7, 8]]))
    layer.refresh_mask()
    assert layer.refresh_mask() == 0 and layer.last_flip_rate == 0.0
    assert layer.mask.tolist() == [[1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]]
    with torch.no_grad():  # row 0 group 0: keep {0, 2} instead of {0, 1} -> 2 entries change; row 1 group 1 too
        layer.weight[0, 2] = 3.5
        layer.weight[1, 4] = 9.0
    assert layer.refresh_mask() == 4
    assert layer.last_flip_rate == 4 / 16
    assert layer.mask.tolist() == [[1, 0, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0, 1]]


def test_model_flip_rate_aggregates_over_layers_and_refresh_interval_is_honoured():
    a = SparseLinear(8, 2, bias=False, config=SparsityConfig(mask_refresh_interval=3))
    b = SparseLinear(16, 4, bias=False, config=SparsityConfig(mask_refresh_interval=3))
    model = nn.Sequential(a, b)
    with torch.no_grad():
        a.weight.copy_(torch.arange(16.0).reshape(2, 8))
        b.weight.copy_(torch.arange(64.0).reshape(4, 16))
    refresh_masks(model)
    with torch.no_grad():  # flip one group of `a` (2 entries) and two groups of `b` (4 entries)
        a.weight[0, 0] = 100.0
        b.weight[0, 0] = 100.0
        b.weight[3, 15] = -1.0
    old_a, old_b = a.mask.clone(), b.mask.clone()
    assert refresh_masks(model, step=1) is None and refresh_masks(model, step=2) is None
    assert torch.equal(a.mask, old_a) and torch.equal(b.mask, old_b)  # not due: untouched
    rate = refresh_masks(model, step=3)
    assert rate == pytest.approx(6 / (16 + 64))
    assert a.last_flip_rate == 2 / 16 and b.last_flip_rate == 4 / 64
    assert mask_sparsity(model) == 0.5
    set_dense(model, True)
    assert refresh_masks(model, step=3) is None and mask_sparsity(model) == 0.0


def test_sparsify_model_swaps_the_block_linears_keeping_weights():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=16))
    before = {n: model.get_submodule(n).weight for n in sparse_linear_names(model)}
    ids = torch.randint(0, 256, (2, 8))
    names = sparsify_model(model, SparsityConfig())
    assert names == sparse_linear_names(model) and list(sparse_modules(model)) == names
    for n, w in before.items():
        module = model.get_submodule(n)
        assert isinstance(module, SparseLinear) and module.weight is w
        assert module.name == f"{n}.weight"
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, SparseLinear)
    assert f"{names[0]}.mask" in model.state_dict()
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in names)


def test_sparsify_errors_name_the_layer():
    model = DecoderLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    with pytest.raises(FormatError, match=r"blocks\.0\.attn\.q_proj\.weight .*not divisible by the INT4 group size 64"):
        sparsify_model(model, SparsityConfig(qat_group_size=64))
    with pytest.raises(ConfigError, match="no submodule 'blocks.9.attn.q_proj'"):
        sparsify_model(model, SparsityConfig(), names=["blocks.9.attn.q_proj"])
    with pytest.raises(ConfigError, match="'blocks.0.attn_norm' is a RMSNorm, expected nn.Linear"):
        sparsify_model(model, SparsityConfig(), names=["blocks.0.attn_norm"])
    with pytest.raises(ConfigError, match="N:M needs 0 < N < M, got 4:4"):
        SparsityConfig(n=4, m=4)
