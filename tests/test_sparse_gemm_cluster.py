"""GPU tests of the 2-CTA cluster wgmma kernels (``sparse24_gemm_sm90_tma_mc``, ``w4a16_sparse24_sm90_tma_mc``:
the two CTAs of a cluster share every X box by TMA multicast), in their own file for the reason
test_sparse_gemm_tma.py has its own: tools/gpu_session.sh runs each test file in its own process, and a failure
here disables only these variants (``SPARSERT_DISABLE_KERNELS=sm90mc``) for the benchmarks that follow. Same
cases, bounds and NaN-poisoned outputs as the other wgmma kernels; the shapes include odd weight-tile counts
(384 and 520 features: the last cluster has a padding CTA). Their CPU checks (emulation of the cluster's X
exchange and rasterisation, PTX) live in test_sparse_gemm.py and test_kernel_build.py."""

from __future__ import annotations

import pytest
import test_sparse_gemm as base  # tests/ is on sys.path (pytest's rootdir-relative import of test modules)
import torch

from sparsert.runtime.sparse_gemm import SM90_CONFIGS, W4A16_SM90_CONFIGS, prepare_sparse24, sparse24_linear


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", base.DTYPES)
@pytest.mark.parametrize("kernel", [c.name for c in SM90_CONFIGS if c.cluster > 1])
@pytest.mark.parametrize("m,n,k", base.SM90_GPU_SHAPES)
def test_gpu_sparse24_sm90_cluster(kernel, m, n, k, dtype):
    base.run_sm90_case(kernel, m, n, k, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", base.DTYPES)
@pytest.mark.parametrize("kernel", [c.name for c in W4A16_SM90_CONFIGS if c.cluster > 1])
@pytest.mark.parametrize("m,n,k,group", base.W4A16_SM90_GPU_SHAPES)
def test_gpu_w4a16_sm90_cluster(kernel, m, n, k, group, dtype):
    base.run_w4a16_sm90_case(kernel, m, n, k, group, dtype)


@pytest.mark.gpu
def test_gpu_cluster_kernel_matches_the_single_cta_kernel_bit_for_bit():
    """Same tiles, same k order, same wgmmas: sharing X through the cluster must not change a bit of Y."""
    base._skip_unless_sm90()
    _, x, w, y = base._run_gpu(sparse24_linear, prepare_sparse24, "sm90mc_128", 300, 520, 1024, torch.bfloat16,
                               7, "none", base.BOUND[torch.bfloat16])
    ref = sparse24_linear(x, w, kernel="sm90_128")
    torch.cuda.synchronize()
    assert torch.equal(y, ref)
