"""runtime/sparse_cpu.py: the CPU product of 2:4 and 2:4+INT4 weights computes the GPU kernels' function."""

from __future__ import annotations

import pytest
import torch

from sparsert.runtime import cpu_jit, sparse_gemm
from sparsert.runtime.errors import FormatError
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.packed_linear import PackedLinear, pack_linear
from sparsert.runtime.sparse_cpu import DIRECT_MAX_TOKENS, cpu_linear, dense_weight_cpu, prepare_cpu

DTYPES = [torch.bfloat16, torch.float16]


def _packed(n: int, k: int, group: int | None, scale: float = 1.0, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    b = torch.randn(n, generator=g) if bias else None
    return pack_linear(w * nm_mask(w, 2, 4), int4_group_size=group, bias=b)


def _within_one_ulp(y: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Both are fp32 sums rounded to ``dtype``; only the order of the additions differs."""
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    assert y.dtype == dtype and y.shape == want.shape
    gap = (y.float() - want.float()).abs()
    assert bool((gap <= want.float().abs() * ulp + 1e-5).all()), float(gap.max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 64, 128])
def test_the_weight_is_the_one_the_gpu_kernels_see(dtype: torch.dtype, group: int | None) -> None:
    """Bit for bit the prepared GPU weight's dequantisation (values rounded to dtype; INT4 round(code * scale))."""
    packed = _packed(136, 256, group)
    gpu_weight = (sparse_gemm.prepare_w4a16(packed, dtype=dtype) if group
                  else sparse_gemm.prepare_sparse24(packed, dtype=dtype))
    weight = prepare_cpu(packed, dtype)
    assert torch.equal(dense_weight_cpu(weight), gpu_weight.to_dense())
    assert torch.equal(weight.to_dense(), gpu_weight.to_dense())


@pytest.mark.parametrize("scale", [3e-7, 2e-5, 6e4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_rounding_at_the_ends_of_the_fp16_range(dtype: torch.dtype, scale: float) -> None:
    """Products below fp16's normal range (subnormals) and above its largest value (inf) round as torch does."""
    packed = _packed(128, 256, 64, scale=scale)
    want = sparse_gemm.prepare_w4a16(packed, dtype=dtype).to_dense()
    got = dense_weight_cpu(prepare_cpu(packed, dtype))
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0))
    if dtype == torch.float16 and scale > 1:
        assert bool(want.isinf().any())  # the case is exercised


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 4, 128])
@pytest.mark.parametrize("shape", [(40, 256), (7, 36), (300, 512)])
def test_the_product_for_every_token_count(dtype: torch.dtype, group: int | None, shape: tuple[int, int]) -> None:
    """The sparse loop (M <= DIRECT_MAX_TOKENS) and the decompress-and-matmul path against fp32 math on the same
    weight; odd row counts and a K whose last index byte is half used (K = 36) included."""
    n, k = shape
    if group and k % group:
        pytest.skip("group does not divide K")
    weight = prepare_cpu(_packed(n, k, group), dtype)
    dense = weight.to_dense()
    for m in (1, 2, 3, DIRECT_MAX_TOKENS, DIRECT_MAX_TOKENS + 1, 33):
        x = torch.randn(m, k)
        want = (x.to(dtype).float() @ dense.t() + weight.bias).to(dtype)
        _within_one_ulp(cpu_linear(x, weight), want, dtype)
        _within_one_ulp(cpu_linear(x.to(dtype), weight), want, dtype)  # x already in dtype: same numbers
    assert cpu_linear(torch.randn(0, k), weight).shape == (0, n)


@pytest.mark.parametrize("group", [None, 128])
def test_rows_split_across_threads_give_the_same_bits(group: int | None) -> None:
    weight = prepare_cpu(_packed(1024, 512, group), torch.bfloat16)  # large enough to split
    x = torch.randn(4, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_linear(x, weight)
        torch.set_num_threads(3)
        assert torch.equal(cpu_linear(x, weight), one)
    finally:
        torch.set_num_threads(before)


def test_the_loops_are_compiled_and_the_torch_path_agrees(monkeypatch) -> None:
    if cpu_jit.numba is None:
        pytest.skip("numba is not installed")
    from sparsert.runtime import sparse_cpu

    assert hasattr(sparse_cpu._product_rows_24, "py_func") and hasattr(sparse_cpu._dense_rows_int4, "py_func")
    weight = prepare_cpu(_packed(64, 128, 128), torch.float16)
    x = torch.randn(3, 128)
    compiled = cpu_linear(x, weight)
    monkeypatch.setenv("SPARSERT_NO_NUMBA", "1")  # no compiled loops: torch decompresses, same weight
    _within_one_ulp(cpu_linear(x, weight), compiled, torch.float16)


def test_the_prepared_weight_holds_the_stored_sizes() -> None:
    """The packed tensors themselves, not copies: 9 bits per weight for 2:4 with 16-bit kept values (17 with
    float32 ones: the loop rounds them), 3.125 for 2:4 + INT4 g128 (4-bit codes + indices + a 16-bit scale per 128
    columns)."""
    w = torch.randn(128, 256)
    for values_dtype, bits in ((torch.bfloat16, 9.0), (torch.float16, 9.0), (torch.float32, 17.0)):
        packed = pack_linear(w, values_dtype=values_dtype)
        weight = prepare_cpu(packed, torch.bfloat16)
        assert weight.nbytes() * 8 / (128 * 256) == bits
        assert weight.values.data_ptr() == packed.values.data_ptr()
    packed = _packed(128, 256, 128)
    weight = prepare_cpu(packed, torch.bfloat16)  # fp16 scales, rounded to bf16 in the loop
    assert weight.nbytes() * 8 / (128 * 256) == 3.125
    assert weight.qweight.data_ptr() == packed.qweight.data_ptr()
    assert weight.indices.data_ptr() == packed.indices.data_ptr()
    assert weight.scales.data_ptr() == packed.scales.data_ptr()


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_values_are_rounded_to_the_dtype_as_the_gpu_preparation_does(values_dtype, dtype) -> None:
    """Kept values stored in another dtype than the GEMM's (float32, or fp16 for a bf16 GEMM ...) are rounded in
    the loop: bit for bit the prepared GPU weight, fp16's subnormals and overflow to inf included."""
    g = torch.Generator().manual_seed(3)
    top = 3 if values_dtype == torch.float16 else 5  # 1e-9 .. 1e5 (fp16 storage itself ends at 65504)
    w = torch.randn(128, 256, generator=g) * torch.logspace(-9, top, 256)
    packed = pack_linear(w, values_dtype=values_dtype)
    want = sparse_gemm.prepare_sparse24(packed, dtype=dtype).to_dense()
    got = dense_weight_cpu(prepare_cpu(packed, dtype))
    assert torch.equal(got, want)
    if dtype == torch.float16 and values_dtype != torch.float16:
        assert bool(want.isinf().any()) and bool(((want != 0) & (want.abs() < 6.1e-5)).any())  # both ends reached


def test_bad_input_is_named() -> None:
    packed = _packed(64, 128, None)
    with pytest.raises(FormatError,
                       match=r"prepare_cpu: layer\.w: dtype must be bfloat16 or float16, got torch\.float32"):
        prepare_cpu(packed, torch.float32, name="layer.w")
    with pytest.raises(FormatError, match=r"prepare_cpu: weight must be a 2:4 PackedLinear"):
        prepare_cpu(pack_linear(torch.randn(8, 16), sparse=False))
    stored = _packed(8, 16, 4)  # valid on disk with a group of 2 columns (one kept value): not run here
    odd = PackedLinear(out_features=8, in_features=16, indices=stored.indices, qweight=stored.qweight,
                       scales=torch.ones(8, 8, dtype=torch.float16), group_size=2)
    with pytest.raises(FormatError, match=r"INT4 group size must be a multiple of 4.*got 2"):
        prepare_cpu(odd)
    weight = prepare_cpu(packed)
    with pytest.raises(FormatError, match=r"cpu_linear: x must be a floating CPU tensor \[M, 128\], got torch\.float32 "
                                          r"\[2, 64\]"):
        cpu_linear(torch.randn(2, 64), weight)
    with pytest.raises(FormatError, match=r"got torch\.int64 \[2, 128\]"):
        cpu_linear(torch.ones(2, 128, dtype=torch.long), weight)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_threads() -> None:
    """A process forked after the worker threads started (a DataLoader worker, a gloo test) inherits none of
    them: its calls must make their own instead of waiting on the parent's."""
    import multiprocessing

    weight = prepare_cpu(_packed(1024, 512, None), torch.bfloat16)
    x = torch.randn(1, 512)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = cpu_linear(x, weight)  # starts the pool here
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_product_in_child, (x, weight)).get(timeout=60)
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


def _product_in_child(x, weight):  # noqa: ANN001, ANN202
    torch.set_num_threads(2)
    return cpu_linear(x, weight)


@pytest.mark.parametrize("group", [None, 128])
def test_many_tokens_decompress_block_by_block(monkeypatch, group: int | None) -> None:
    """Above DIRECT_MAX_TOKENS the weight is decompressed one block of rows at a time (here 16 rows: 19 blocks,
    the last one partial), never as a whole dense copy."""
    from sparsert.runtime import sparse_cpu

    weight = prepare_cpu(_packed(300, 256, group), torch.bfloat16)
    monkeypatch.setattr(sparse_cpu, "_BLOCK_FLOATS", 16 * 256)
    monkeypatch.setattr(sparse_cpu._BLOCK, "buffer", None, raising=False)  # noqa: SLF001 - this thread's, fresh
    x = torch.randn(DIRECT_MAX_TOKENS + 5, 256)
    want = (x.bfloat16().float() @ weight.to_dense().t() + weight.bias).bfloat16()
    _within_one_ulp(cpu_linear(x, weight), want, torch.bfloat16)
    assert sparse_cpu._BLOCK.buffer.size <= 16 * 256  # noqa: SLF001 - the buffer held is one block


def test_the_output_is_row_major_and_autocast_changes_nothing() -> None:
    """[M, N] row-major for every M (code reshaping the output with .view() works), and a caller's autocast
    region does not turn the float32 product into a bf16 one."""
    weight = prepare_cpu(_packed(64, 128, None), torch.float16)
    for m in (1, 2, DIRECT_MAX_TOKENS, 20):
        x = torch.randn(m, 128)
        y = cpu_linear(x, weight)
        assert y.is_contiguous() and y.view(-1).shape == (m * 64,)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(cpu_linear(x, weight), y)


@pytest.mark.parametrize("group", [None, 128])
def test_a_weight_whose_storage_moved_is_read_where_it_is_now(group: int | None) -> None:
    """torch moves a tensor's storage when it is shared with another process (share_memory_(), what sending the
    weight to a multiprocessing worker does): the next product must read the new storage, not a view of the freed
    one that an earlier call kept."""
    weight = prepare_cpu(_packed(1024, 512, group), torch.bfloat16)
    x = torch.randn(1, 512)
    want = cpu_linear(x, weight)
    for t in (weight.indices, weight.values, weight.qweight, weight.scales):
        if t is not None:
            t.share_memory_()
    scribbled = [torch.full((1024, 256), 7.0) for _ in range(16)]  # reuse the freed memory
    assert torch.equal(cpu_linear(x, weight), want) and len(scribbled) == 16
