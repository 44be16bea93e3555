"""runtime/cusparselt.py: torch's cuSPARSELt binding with searched algorithm configurations, and the
``gemm="cusparselt"`` path of the Hu et al. training linear.

CPU tests check what does not need the library: argument building against this torch's real operator schema,
operand checks, the problem key, and the errors without cuSPARSELt. The orientation of every product and the
search-once-per-problem cache are checked on CPU with torch's documented semantics of its cuSPARSELt ops
standing in for the library (``_cslt_compress``: the 2:4 matrix itself; ``_cslt_sparse_mm(A, B, bias)``:
``A·B + bias`` per row of A, transposed when ``transpose_result``; the search: a configuration id). The GPU
tests run the real library against fp32 references.
"""

from __future__ import annotations

import pytest
import torch

from sparsert.runtime import cusparselt
from sparsert.runtime.cusparselt import (
    CsltConfig,
    CsltMatrix,
    TunedCusparselt,
    check_dense_operand,
    config_kwargs,
    problem_key,
)
from sparsert.runtime.errors import ConfigError, DeviceError, FormatError
from sparsert.runtime.kernels import transposable_mask

gpu = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------------------
# Arguments, operands, keys
# ---------------------------------------------------------------------------------------------------------

def test_config_kwargs_follow_the_operator_schema():
    new = frozenset({"compressed_A", "dense_B", "bias", "alpha", "out_dtype", "transpose_result", "alg_id",
                     "split_k", "split_k_mode"})
    old_flag = frozenset({"compressed_A", "dense_B", "alg_id", "split_k", "split_k_one_kernel"})
    oldest = frozenset({"compressed_A", "dense_B", "bias", "transpose_result"})
    assert config_kwargs(CsltConfig(), new) == {"alg_id": 0}
    assert config_kwargs(CsltConfig(7, 4, 2), new) == {"alg_id": 7, "split_k": 4, "split_k_mode": 2}
    assert config_kwargs(CsltConfig(7, 4, 1), old_flag) == {"alg_id": 7, "split_k": 4, "split_k_one_kernel": True}
    assert config_kwargs(CsltConfig(7, 4, 2), old_flag) == {"alg_id": 7, "split_k": 4, "split_k_one_kernel": False}
    assert config_kwargs(CsltConfig(), oldest) == {}
    with pytest.raises(DeviceError, match="takes no alg_id"):
        config_kwargs(CsltConfig(3), oldest)
    with pytest.raises(DeviceError, match="takes no split_k"):
        config_kwargs(CsltConfig(3, 2), frozenset({"alg_id"}))
    # this torch's real schema accepts what we build for it
    real = cusparselt._mm_arguments()
    assert {"compressed_A", "dense_B", "alg_id"} <= real
    assert set(config_kwargs(CsltConfig(5, 2, 1))) <= real


def test_dense_operand_layouts():
    b = torch.randn(64, 32, dtype=torch.bfloat16)
    assert check_dense_operand(b) is b
    bt = torch.randn(32, 64, dtype=torch.bfloat16).t()  # transposed view of a contiguous tensor
    assert check_dense_operand(bt) is bt
    strided = torch.randn(64, 64, dtype=torch.bfloat16)[:, ::2]
    out = check_dense_operand(strided)
    assert out.is_contiguous() and torch.equal(out, strided)
    with pytest.raises(FormatError, match="dense operand B must be a 2-D bfloat16/float16 tensor.*float32"):
        check_dense_operand(torch.randn(8, 8))
    with pytest.raises(FormatError, match=r"got bfloat16 \(2, 8, 8\)"):
        check_dense_operand(torch.randn(2, 8, 8, dtype=torch.bfloat16))
    with pytest.raises(FormatError, match=r"B has shape \(64, 100\); both dimensions must be positive multiples of 8"):
        check_dense_operand(torch.randn(64, 100, dtype=torch.bfloat16))


def _matrix(rows=64, cols=32, dtype=torch.bfloat16):
    """A CsltMatrix as compress() describes one (the checks below never reach the library's buffer)."""
    return CsltMatrix(torch.empty(0, dtype=dtype), rows, cols, dtype, "W")


def test_products_are_checked_against_a_before_the_library():
    a = _matrix()
    b = torch.zeros(32, 16, dtype=torch.bfloat16)
    for call in (cusparselt.sparse_mm, cusparselt.search_config, TunedCusparselt(persist=False)):
        with pytest.raises(FormatError, match=r"B is float16 but W \(bfloat16 \[64, 32\]\) is bfloat16"):
            call(a, b.half())
        with pytest.raises(FormatError, match=r"B has shape \(40, 16\); its rows must be the columns of W"):
            call(a, torch.zeros(40, 16, dtype=torch.bfloat16))
        with pytest.raises(FormatError, match=r"bias must hold one value per row of W .*got \(32,\)"):
            call(a, b, bias=torch.zeros(32))
        with pytest.raises(FormatError, match="A must be a CsltMatrix made by compress"):
            call(torch.zeros(64, 32, dtype=torch.bfloat16), b)


def test_problem_key_buckets_token_counts():
    a = _matrix()
    def key(n, transposed=False, bias=None, tr=True, exact=False):
        b = torch.empty(n, 32, dtype=torch.bfloat16).t() if transposed else torch.empty(32, n, dtype=torch.bfloat16)
        return problem_key(a, b, bias, tr, exact=exact)
    assert key(104) == key(128) != key(136)
    assert key(8) != key(16)
    assert key(104, exact=True) != key(128, exact=True) and key(104, exact=True) != key(104)
    assert key(128) != key(128, transposed=True)
    assert key(128) != key(128, bias=torch.zeros(64))
    assert key(128) != key(128, tr=False)


def test_compress_checks_shapes_before_the_library():
    with pytest.raises(FormatError, match=r"W has shape \(12, 16\); both dimensions must be positive multiples of 8"):
        cusparselt.compress(torch.zeros(12, 16, dtype=torch.bfloat16), name="W")
    with pytest.raises(FormatError, match="W must be a 2-D bfloat16/float16 tensor"):
        cusparselt.compress(torch.zeros(16, 16), name="W")


def test_without_cusparselt_every_call_says_why():
    cusparselt.cusparselt_status.cache_clear()
    why = cusparselt.cusparselt_status()
    if not why:
        pytest.skip("cuSPARSELt is usable here")
    a, b = torch.zeros(16, 16, dtype=torch.bfloat16), torch.zeros(16, 16, dtype=torch.bfloat16)
    for call in (lambda: cusparselt.compress(a), lambda: cusparselt.sparse_mm(_matrix(16, 16), b),
                 lambda: cusparselt.search_config(_matrix(16, 16), b),
                 lambda: TunedCusparselt(persist=False)(_matrix(16, 16), b)):
        with pytest.raises(DeviceError) as err:
            call()
        assert str(err.value) == why


def test_status_names_an_old_gpu(monkeypatch):
    monkeypatch.setattr(torch, "_cslt_compress", lambda d: d, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    cusparselt.cusparselt_status.cache_clear()
    try:
        assert cusparselt.cusparselt_status() == ("cuSPARSELt needs compute capability 8.0 or newer, device 0 "
                                                  "has 7.5")
    finally:
        cusparselt.cusparselt_status.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# Orientation and caching with torch's documented semantics standing in for the library (conftest.CsltStandIn)
# ---------------------------------------------------------------------------------------------------------

def _sparse24(n, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    keep = w.abs().reshape(n, k // 4, 4).argsort(-1, descending=True).argsort(-1) < 2
    return (w * keep.reshape(n, k)).to(dtype)


def test_tuned_searches_once_per_bucket_and_runs_what_it_found(cslt_stand_in):
    tuned = cusparselt.tuned()
    w = _sparse24(64, 32)
    a = cusparselt.compress(w)
    assert (a.rows, a.cols, a.dtype) == (64, 32, torch.bfloat16) and a.nbytes() == 64 * 32 * 2
    bias = torch.randn(64)
    for m in (104, 128, 112):  # one bucket: one search
        x = torch.randn(m, 32).to(torch.bfloat16)
        y = tuned(a, x.t(), bias=bias, transpose_result=True)
        ref = x.float() @ w.float().t() + bias.to(torch.bfloat16).float()
        assert y.shape == (m, 64) and torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert cslt_stand_in.searches == 1
    assert set(cslt_stand_in.runs) == {CsltConfig(3, 1, -1)}
    tuned(a, torch.randn(32, 200).to(torch.bfloat16)[:, :192])  # another bucket and layout: a second search
    assert cslt_stand_in.searches == 2 and len(tuned.configs) == 2


def test_a_bucket_configuration_that_fails_is_searched_again_for_the_exact_count(cslt_stand_in):
    tuned = cusparselt.tuned()
    a = cusparselt.compress(_sparse24(64, 32))
    tuned(a, torch.randn(32, 128).to(torch.bfloat16))  # the bucket's search: configuration 3
    cslt_stand_in.found, cslt_stand_in.fail_if = (4, 1, -1, 10), {(3, 104)}
    y = tuned(a, torch.randn(32, 104).to(torch.bfloat16))
    assert y.shape == (64, 104) and cslt_stand_in.searches == 2 and cslt_stand_in.runs[-1] == CsltConfig(4)
    cslt_stand_in.fail_if = {(3, 104), (4, 104)}  # the exact configuration failing too is an error, not a loop
    with pytest.raises(DeviceError, match="does not run this shape"):
        tuned(a, torch.randn(32, 104).to(torch.bfloat16))


def test_search_maps_the_split_k_flag_of_older_bindings(cslt_stand_in):
    a = cusparselt.compress(_sparse24(16, 16))
    b = torch.randn(16, 8).to(torch.bfloat16)
    for flag, mode in ((True, 1), (False, 2)):  # torch versions whose third field is split_k_one_kernel
        cslt_stand_in.found = (9, 4, flag, 20)
        assert cusparselt.search_config(a, b) == CsltConfig(9, 4, mode)


def test_library_errors_are_named(cslt_stand_in, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: invalid argument\nmore")
    a = cusparselt.compress(_sparse24(16, 16), name="W⊙M")
    monkeypatch.setattr(torch, "_cslt_sparse_mm", broken)
    with pytest.raises(DeviceError, match=r"cuSPARSELt product of W⊙M \(bfloat16 \[16, 16\]\) and B bfloat16 "
                                          r"\(16, 8\) on cpu .* failed: CUDA error: invalid argument$"):
        cusparselt.sparse_mm(a, torch.randn(16, 8).to(torch.bfloat16))
    monkeypatch.setattr(torch, "_cslt_compress", broken)
    with pytest.raises(DeviceError, match=r"could not compress W⊙M \(bfloat16 \(16, 16\) on cpu\)"):
        cusparselt.compress(_sparse24(16, 16), name="W⊙M")


def _train_both(n, k, t, *, seed, device="cpu", retain_graph=False):
    """Outputs and gradients (y, ∇x, ∇W, ∇b) of ``gemm="ours"`` and ``gemm="cusparselt"`` on the same inputs,
    MVUE24 draw and upstream gradient; plus the inputs (x, W, mask, b, ∇y)."""
    from sparsert.train.sparse24_training_linear import sparse24_training_linear

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device)
    mask = transposable_mask(w).bool()
    b = torch.randn(n, generator=g, device=device)
    x = torch.randn(t, k, generator=g, device=device).to(torch.bfloat16)
    gy = torch.randn(t, n, generator=g, device=device).to(torch.bfloat16)
    grads = {}
    for gemm in ("ours", "cusparselt"):
        xs, ws, bs = x.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = sparse24_training_linear(xs, ws, mask, bs, seed=seed, gemm=gemm)
        y.backward(gy, retain_graph=retain_graph)
        if retain_graph:  # a second backward through the same graph accumulates the same gradients again
            y.backward(gy)
            for p in (xs, ws, bs):
                p.grad /= 2
        grads[gemm] = (y.detach().double(), xs.grad.double(), ws.grad.double(), bs.grad.double())
    return grads, (x, w, mask, b, gy)


@pytest.mark.parametrize("retain_graph", [False, True])
def test_training_linear_on_the_stand_in_matches_ours(cslt_stand_in, retain_graph):
    """Forward, ∇X, ∇W (same MVUE24 draw) and ∇b of ``gemm="cusparselt"`` against ``gemm="ours"``'s torch
    fallback on CPU: the products are oriented as the library defines them. T = 100 exercises the padding;
    ``retain_graph`` a second backward through the same graph."""
    grads, (x, w, mask, b, _) = _train_both(128, 64, 100, seed=5, retain_graph=retain_graph)
    for ours, cslt in zip(grads["ours"], grads["cusparselt"], strict=True):
        assert (ours - cslt).norm() <= 1e-2 * ours.norm()
    assert cslt_stand_in.searches == 3  # forward, ∇X and ∇W products: one search each
    from sparsert.train.sparse24_training_linear import sparse24_training_linear

    with torch.no_grad():  # without a recorded graph only the forward product runs
        y = sparse24_training_linear(x, w, mask, b, seed=5, gemm="cusparselt")
    assert (y.double() - grads["ours"][0]).norm() <= 1e-2 * grads["ours"][0].norm()


def test_training_linear_with_no_tokens(cslt_stand_in):
    from sparsert.train.sparse24_training_linear import sparse24_training_linear

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.zeros(0, 64, dtype=torch.bfloat16, requires_grad=True)
    y = sparse24_training_linear(x, w, transposable_mask(w.detach()).bool(), seed=0, gemm="cusparselt")
    assert y.shape == (0, 64)
    y.backward(torch.zeros(0, 64, dtype=torch.bfloat16))
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64, 64))


def test_training_linear_gemm_option_is_checked():
    from sparsert.train.sparse24_training_linear import Sparse24TrainingLinear, sparse24_training_linear

    with pytest.raises(ConfigError, match="fc1: gemm must be one of ours, cusparselt, got 'cublas'"):
        Sparse24TrainingLinear(64, 64, name="fc1", gemm="cublas")
    w = torch.randn(64, 64)
    with pytest.raises(ConfigError, match="sparse24_training_linear: gemm must be one of"):
        sparse24_training_linear(torch.randn(4, 64).to(torch.bfloat16), w, transposable_mask(w).bool(), seed=0,
                                 gemm=None)
    cusparselt.cusparselt_status.cache_clear()
    if cusparselt.cusparselt_status():
        layer = Sparse24TrainingLinear(64, 64, name="fc1", gemm="cusparselt")  # builds (and loads state) anywhere
        layer.load_state_dict(layer.state_dict())
        with pytest.raises(ConfigError, match="fc1: gemm='cusparselt' needs a CUDA build of torch with cuSPARSELt"):
            layer(torch.randn(4, 64).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------
# GPU: the real library
# ---------------------------------------------------------------------------------------------------------

def _need_cslt():
    why = cusparselt.cusparselt_status()
    if why:
        pytest.skip(why)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(256, 512, 64), (4096, 1024, 200), (1024, 4096, 2048)])
def test_gpu_tuned_products_match_fp32(dtype, m, k, n):
    _need_cslt()
    w = _sparse24(m, k, dtype, seed=m + n).cuda()
    a = cusparselt.compress(w)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    g = torch.Generator(device="cuda").manual_seed(n)
    bias = torch.randn(m, generator=g, device="cuda")
    x = torch.randn(n + (-n) % 8, k, generator=g, device="cuda").to(dtype)  # tokens [n, k]
    y = cusparselt.tuned()(a, x.t(), bias=bias, transpose_result=True)  # x·Wᵀ + b
    ref = x.double() @ w.double().t() + bias.to(dtype).double()
    assert y.dtype == dtype and y.shape == ref.shape
    assert float((y.double() - ref).norm() / ref.norm()) <= tol
    b = torch.randn(k, n + (-n) % 8, generator=g, device="cuda").to(dtype)  # contiguous B: W·B
    y2 = cusparselt.tuned()(a, b)
    ref2 = w.double() @ b.double()
    assert float((y2.double() - ref2).norm() / ref2.norm()) <= tol


@gpu
def test_gpu_training_linear_cusparselt_matches_ours():
    _need_cslt()
    grads, (x, w, mask, b, gy) = _train_both(1024, 512, 1000, seed=11, device="cuda")
    wm = (w * mask).double()
    ref_y = x.double() @ wm.t() + b.to(torch.bfloat16).double()
    assert float((grads["cusparselt"][0] - ref_y).norm() / ref_y.norm()) <= 1e-2
    ref_dx = gy.double() @ wm
    assert float((grads["cusparselt"][1] - ref_dx).norm() / ref_dx.norm()) <= 1e-2
    for name, ours, cslt in zip(("y", "dx", "dw", "db"), grads["ours"], grads["cusparselt"], strict=True):
        assert float((ours - cslt).norm() / ours.norm()) <= 1e-2, name


def test_searched_configurations_persist_per_device(cslt_stand_in, tmp_path):
    """A new process (a new TunedCusparselt on the same file) runs the saved configuration without searching;
    a file for another torch, or a corrupt one, is ignored; a saved bucket configuration that fails on another
    token count of the bucket is searched again for that count."""
    import json

    path = tmp_path / "cslt" / "dev.json"
    a = cusparselt.compress(_sparse24(64, 32))
    b = torch.randn(32, 128).to(torch.bfloat16)
    TunedCusparselt(path)(a, b)
    saved = json.loads(path.read_text())
    assert saved["torch"] == torch.__version__ and saved["device"] == "cpu" and len(saved["configs"]) == 1
    assert list(saved["configs"].values()) == [[3, 1, -1]] and cslt_stand_in.searches == 1
    cslt_stand_in.found = (7, 1, -1, 10)
    TunedCusparselt(path)(a, b)  # loaded: no search, configuration 3 runs
    assert cslt_stand_in.searches == 1 and cslt_stand_in.runs[-1] == CsltConfig(3)
    cslt_stand_in.fail_if = {(3, 104)}  # the saved bucket configuration does not run 104 tokens
    y = TunedCusparselt(path)(a, torch.randn(32, 104).to(torch.bfloat16))
    assert y.shape == (64, 104) and cslt_stand_in.searches == 2 and cslt_stand_in.runs[-1] == CsltConfig(7)
    for bad in ({**saved, "torch": "0.0"}, "not json"):
        path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        before = cslt_stand_in.searches
        TunedCusparselt(path)(a, b)
        assert cslt_stand_in.searches == before + 1
    assert TunedCusparselt(path, persist=False)._file(b.device) is None
