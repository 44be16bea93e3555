"""GPU tests of the TMA-fed wgmma kernels (``sparse24_gemm_sm90_tma``, ``w4a16_sparse24_sm90_tma``), in their
own file: tools/gpu_session.sh runs every test file in its own process, so a fault here (a kernel traps when
a pipeline barrier never completes) cannot take the other kernels' tests down with it, and a failure here
disables the TMA variants (``SPARSERT_DISABLE_KERNELS=sm90tma``) for the benchmarks that follow. Same cases,
bounds and NaN-poisoned outputs as the cp.async wgmma kernels' tests in test_sparse_gemm.py (the 2-CTA
cluster variants have their own file, test_sparse_gemm_cluster.py, for the same reason). Their CPU checks
(emulation, PTX, tensor-map encoding) live in test_sparse_gemm.py, test_kernel_build.py and
test_fake_driver.py."""

from __future__ import annotations

import pytest
import torch
from test_sparse_gemm import (  # tests/ is on sys.path (pytest's rootdir-relative import of test modules)
    BOUND,
    DTYPES,
    SM90_GPU_SHAPES,
    W4A16_SM90_GPU_SHAPES,
    _run_gpu,
    _skip_unless_sm90,
    run_sm90_case,
    run_w4a16_sm90_case,
)

from sparsert.runtime.sparse_gemm import SM90_CONFIGS, W4A16_SM90_CONFIGS, prepare_sparse24, sparse24_linear


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [c.name for c in SM90_CONFIGS if c.tma and c.cluster == 1])
@pytest.mark.parametrize("m,n,k", SM90_GPU_SHAPES)
def test_gpu_sparse24_sm90_tma(kernel, m, n, k, dtype):
    run_sm90_case(kernel, m, n, k, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [c.name for c in W4A16_SM90_CONFIGS if c.tma and c.cluster == 1])
@pytest.mark.parametrize("m,n,k,group", W4A16_SM90_GPU_SHAPES)
def test_gpu_w4a16_sm90_tma(kernel, m, n, k, group, dtype):
    run_w4a16_sm90_case(kernel, m, n, k, group, dtype)


@pytest.mark.gpu
def test_gpu_tma_map_reused_across_calls_and_buffers():
    """The cached tensor map follows X's address and shape: a second call on the same buffer hits the cache,
    a different buffer (or shape) gets its own map, and both results are right."""
    from sparsert.runtime import tensor_map

    _skip_unless_sm90()
    _, x, w, y = _run_gpu(sparse24_linear, prepare_sparse24, "sm90tma_128", 300, 520, 1024, torch.bfloat16, 5,
                          "none", BOUND[torch.bfloat16])
    before = len(tensor_map._cache)
    again = sparse24_linear(x, w, kernel="sm90tma_128")
    assert len(tensor_map._cache) == before and torch.equal(again, y)
    x2 = x[:200].clone()
    y2 = sparse24_linear(x2, w, kernel="sm90tma_128")
    assert len(tensor_map._cache) == before + 1
    ref = sparse24_linear(x2, w, kernel="sm90_128")
    torch.cuda.synchronize()
    assert torch.equal(y2, ref)  # same tiles, same wgmma order: bit-identical to the cp.async kernel


@pytest.mark.gpu
def test_gpu_tma_kernel_in_a_cuda_graph():
    """TMA launches in CUDA graphs: a warmed-up call's cached map is kept past the LRU for the replays, and a
    call first seen during capture (its X in the graph's memory) gets its map written by a captured copy whose
    pinned source is kept; both graphs' replays follow X's contents."""
    from sparsert.runtime import tensor_map

    _skip_unless_sm90()
    _, x, w, y = _run_gpu(sparse24_linear, prepare_sparse24, "sm90tma_128", 130, 384, 640, torch.bfloat16, 11,
                          "none", BOUND[torch.bfloat16])
    out = torch.empty_like(y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sparse24_linear(x, w, out=out, kernel="sm90tma_128")  # warm-up: caches the map
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse24_linear(x, w, out=out, kernel="sm90tma_128")
    assert any(key[1] == x.data_ptr() for key in tensor_map._captured)
    fresh = x[:100].clone()
    out2 = torch.empty(100, y.shape[1], dtype=y.dtype, device=y.device)
    before = len(tensor_map._captured_sources)
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        sparse24_linear(fresh, w, out=out2, kernel="sm90tma_128")  # a map never seen before the capture
    assert len(tensor_map._captured_sources) == before + 1
    x.copy_(torch.randn_like(x))
    fresh.copy_(torch.randn_like(fresh))
    graph.replay()
    graph2.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sparse24_linear(x, w, kernel="sm90_128"))
    assert torch.equal(out2, sparse24_linear(fresh, w, kernel="sm90_128"))
