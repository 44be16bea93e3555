"""Property tests of the tensor formats against plain numpy references written from the format docs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsert.runtime.errors import FormatError
from sparsert.runtime.int4 import dequantize_int4, fake_quantize_int4, pack_int4, quantize_int4, unpack_int4
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.runtime.packed_linear import pack_linear
from sparsert.runtime.sparse24 import (
    compress_24,
    decompress_24,
    pack_indices_24,
    unpack_indices_24,
    validate_indices_24,
)

SETTINGS = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- numpy references
def np_nm_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    mask = np.zeros(w.shape, dtype=bool)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // m):
            block = np.abs(w[r, g * m : (g + 1) * m])
            keep = sorted(range(m), key=lambda i: (-block[i], i))[:n]
            mask[r, [g * m + i for i in keep]] = True
    return mask


def np_compress_24(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out, k = w.shape
    values = np.zeros((out, k // 2), dtype=w.dtype)
    idx = np.zeros((out, k // 2), dtype=np.uint8)
    for r in range(out):
        for g in range(k // 4):
            nz = [i for i in range(4) if w[r, 4 * g + i] != 0]
            free = [i for i in range(4) if i not in nz]
            keep = sorted((nz + free)[:2])
            for j, i in enumerate(keep):
                values[r, 2 * g + j] = w[r, 4 * g + i]
                idx[r, 2 * g + j] = i
    packed = np.zeros((out, (k // 2 + 3) // 4), dtype=np.uint8)
    for r in range(out):
        for j in range(k // 2):
            packed[r, j // 4] |= idx[r, j] << (2 * (j % 4))
    return values, packed


def np_quantize_int4(w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    out, k = w.shape
    scales = np.abs(w.reshape(out, k // g, g)).max(-1).astype(np.float32) / 7
    scales = scales.astype(np.float16)
    s = np.repeat(scales.astype(np.float32), g, axis=1)
    codes = np.where(s > 0, np.clip(np.round(w / np.where(s > 0, s, 1)), -8, 7), 0)
    return codes.astype(np.int8), scales


def np_pack_int4(codes: np.ndarray) -> np.ndarray:
    flat = codes.reshape(codes.shape[0], -1)
    if flat.shape[1] % 2:
        flat = np.pad(flat, ((0, 0), (0, 1)))
    lo = flat[:, 0::2].astype(np.int16) & 0xF
    hi = flat[:, 1::2].astype(np.int16) & 0xF
    return (lo | (hi << 4)).astype(np.uint8)


shapes = st.tuples(st.integers(1, 9), st.integers(1, 12).map(lambda g: 4 * g))


def random_weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------- N:M masks
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), nm=st.sampled_from([(1, 4), (2, 4), (2, 8), (4, 8), (1, 2)]))
def test_nm_mask_matches_numpy(shape, seed, nm):
    n, m = nm
    k = shape[1] - shape[1] % m or m
    w = random_weight((shape[0], k), seed)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), np_nm_mask(w.numpy(), n, m))
    assert is_nm_sparse(w * mask, n, m)


def test_nm_mask_by_score_and_ties():
    w = torch.ones(1, 4)
    assert nm_mask(w).tolist() == [[True, True, False, False]]  # ties keep the lower index
    score = torch.tensor([[0.0, 1.0, 0.5, 2.0]])
    assert nm_mask(w, score=score).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compiled_24_mask_equals_the_torch_mask(monkeypatch, dtype):
    from sparsert.runtime import nm_mask_cpu

    if not nm_mask_cpu.available():
        pytest.skip("numba is not installed: the torch mask runs on CPU")
    g = torch.Generator().manual_seed(7)
    w = torch.randn(37, 64, generator=g)
    w[0] = 1.0  # all ties
    w[1, :8] = torch.tensor([0.0, -0.0, 0.0, 0.0, 2.0, -2.0, 2.0, 1.0])  # ±0 and ±2 ties
    w[2, :4] = float("nan")
    w[3, 1] = float("nan")
    w[4, 2] = float("inf")
    w = w.to(dtype)
    score = torch.randn(37, 64, generator=g)  # signed: used as given
    compiled = (nm_mask(w), nm_mask(w, score=score), nm_mask(w.t().contiguous().t()))
    monkeypatch.setattr(nm_mask_cpu, "available", lambda: False)
    reference = (nm_mask(w), nm_mask(w, score=score), nm_mask(w.t().contiguous().t()))
    for a, b in zip(compiled, reference, strict=True):
        assert a.dtype == torch.bool and torch.equal(a, b)
    with pytest.raises(ValueError, match="K % 4 == 0 expected"):
        nm_mask_cpu.mask_24_cpu(torch.randn(4, 6))


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(FormatError, match=r"q_proj of shape \(3, 6\): K=6 is not divisible by M=4"):
        nm_mask(torch.randn(3, 6), name="q_proj")
    with pytest.raises(FormatError, match="0 < N < M"):
        nm_mask(torch.randn(3, 8), 4, 4)


# ---------------------------------------------------------------- 2:4 compression
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_compress_24_matches_numpy_and_round_trips(shape, seed, dtype):
    w = random_weight(shape, seed)
    w = (w * nm_mask(w)).to(dtype)
    # Some groups with fewer than two non-zeros.
    w[:, :4] = 0
    values, indices = compress_24(w)
    ref_values, ref_indices = np_compress_24(w.float().numpy())
    np.testing.assert_array_equal(values.float().numpy(), ref_values)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    assert values.dtype == dtype and indices.dtype == torch.uint8
    assert torch.equal(decompress_24(values, indices, shape[1]), w)
    validate_indices_24(indices, shape[1])


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_index_packing_round_trip(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 4, (shape[0], shape[1] // 2), generator=gen, dtype=torch.uint8)
    packed = pack_indices_24(idx)
    assert packed.shape == (shape[0], (shape[1] // 2 + 3) // 4)
    assert torch.equal(unpack_indices_24(packed, shape[1]), idx)


def test_compress_24_rejects_dense_and_bad_k():
    w = torch.ones(2, 8)
    with pytest.raises(FormatError, match=r"up_proj of shape \(2, 8\) is not 2:4 along K: row 0, columns 0..3"):
        compress_24(w, name="up_proj")
    with pytest.raises(FormatError, match="K=6 is not divisible by M=4"):
        compress_24(torch.zeros(2, 6))


def test_validate_indices_24_names_the_bad_group():
    good = pack_indices_24(torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8))
    validate_indices_24(good, 8)
    bad = pack_indices_24(torch.tensor([[0, 1, 3, 3]], dtype=torch.uint8))
    with pytest.raises(FormatError, match=r"w.indices does not decode to a valid 2:4 pattern: row 0, group 1"):
        validate_indices_24(bad, 8, name="w.indices")
    with pytest.raises(FormatError, match="expected"):
        validate_indices_24(good, 16)


# ---------------------------------------------------------------- INT4
@SETTINGS
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    g=st.sampled_from([4, 8, 32, 128]),
    seed=st.integers(0, 2**16),
)
def test_quantize_int4_matches_numpy(rows, groups, g, seed):
    w = random_weight((rows, groups * g), seed)
    w[0, :g] = 0  # an all-zero group
    codes, scales = quantize_int4(w, g)
    ref_codes, ref_scales = np_quantize_int4(w.numpy(), g)
    np.testing.assert_array_equal(scales.numpy(), ref_scales)
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    deq = dequantize_int4(codes, scales, g)
    # Error at most half a step (scale rounding to fp16 can stretch the step by ~1e-3).
    step = scales.float().repeat_interleave(g, 1)
    assert bool(((deq - w).abs() <= 0.5 * step * 1.002 + 1e-8).all())
    assert torch.equal(fake_quantize_int4(w, g), deq)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 17)), seed=st.integers(0, 2**16))
def test_int4_packing_matches_numpy(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    packed = pack_int4(codes)
    np.testing.assert_array_equal(packed.numpy(), np_pack_int4(codes.numpy()))
    assert torch.equal(unpack_int4(packed, shape[1]), codes)


def test_int4_low_nibble_first():
    assert pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).tolist() == [[0xF1]]


def test_int4_rejects_bad_group():
    with pytest.raises(FormatError, match=r"down_proj of shape \(2, 96\): K=96 is not divisible by the INT4 group"):
        quantize_int4(torch.randn(2, 96), 128, name="down_proj")


def test_int4_rejects_scales_its_dtype_cannot_hold():
    with pytest.raises(FormatError, match="beyond the range of float16"):
        quantize_int4(torch.randn(2, 16) * 1e6, 8, name="w")
    with pytest.raises(FormatError, match="scale dtype must be a floating dtype"):
        quantize_int4(torch.randn(2, 16), 8, torch.int8)
    with pytest.raises(FormatError, match="values_dtype must be float32, float16 or bfloat16"):
        pack_linear(torch.randn(4, 16), values_dtype=torch.int8)
    with pytest.raises(FormatError, match="must be 2-D"):
        dequantize_int4(torch.zeros(8, dtype=torch.int8), torch.ones(1), 8)
    with pytest.raises(FormatError, match="mask for w is not 2:4"):
        pack_linear(torch.randn(4, 16), mask=torch.ones(4, 16, dtype=torch.bool), name="w")
    with pytest.raises(FormatError, match="w holds non-finite values"):
        pack_linear(torch.full((4, 16), float("nan")), name="w")


def test_packed_linear_validate_names_the_inconsistent_tensor():
    """A PackedLinear whose tensors disagree with out_features x in_features (rows cut, wrong widths, bad
    indices, NaN or negative scales, a short bias) is refused by name instead of being padded into wrong
    output by the GPU preparation."""
    from dataclasses import replace

    from sparsert.runtime.sparse_gemm import prepare_sparse24, prepare_w4a16

    pq = pack_linear(torch.randn(64, 256), int4_group_size=128, bias=torch.randn(64))
    pv = pack_linear(torch.randn(64, 256))
    pq.validate("q")
    pv.validate("v")
    cases = [
        (replace(pq, scales=pq.scales[:32]), r"q.scales is float16 \[32, 2\], expected"),
        (replace(pq, qweight=pq.qweight[:32]), r"q.qweight is uint8 \[32, 64\], expected uint8 \[64, 64\]"),
        (replace(pq, indices=pq.indices[:32]), r"q.indices is uint8 \[32, 32\]"),
        (replace(pq, out_features=72), r"q.indices is uint8 \[64, 32\], expected uint8 \[72, 32\]"),
        (replace(pq, scales=pq.scales * float("nan")), "q.scales holds non-finite values"),
        (replace(pq, scales=-pq.scales), "q.scales holds negative scales"),
        (replace(pq, bias=pq.bias[:10]), r"q.bias is float32 \[10\], expected"),
        (replace(pq, group_size=None), "group size must be a positive int dividing in_features=256"),
        (replace(pq, indices=torch.zeros_like(pq.indices)), "q.indices does not decode to a valid 2:4 pattern"),
    ]
    for bad, why in cases:
        with pytest.raises(FormatError, match=why):
            bad.validate("q")
        with pytest.raises(FormatError, match=why):
            prepare_w4a16(bad, name="q")
    with pytest.raises(FormatError, match=r"v.indices is uint8 \[32, 32\]"):
        prepare_sparse24(replace(pv, indices=pv.indices[:32]), name="v")
    with pytest.raises(FormatError, match="must be a PackedLinear"):
        prepare_sparse24(torch.randn(8, 64))


def test_decompress_24_refuses_indices_that_drop_values():
    values, indices = compress_24(pack_linear(torch.randn(4, 16), values_dtype=torch.float32).to_dense())
    with pytest.raises(FormatError, match="does not decode to a valid 2:4 pattern"):
        decompress_24(values, torch.zeros_like(indices), 16)
    with pytest.raises(FormatError, match="indices has 2 rows but values has 4"):
        decompress_24(values, indices[:2], 16)


# ---------------------------------------------------------------- composition
@SETTINGS
@given(rows=st.integers(1, 6), groups=st.integers(1, 3), g=st.sampled_from([8, 16, 128]), seed=st.integers(0, 2**16))
def test_pack_linear_24_int4_equals_quantized_masked_weight(rows, groups, g, seed):
    w = random_weight((rows, groups * g), seed)
    packed = pack_linear(w, sparse=True, int4_group_size=g)
    expected = fake_quantize_int4(w * nm_mask(w), g)
    assert torch.equal(packed.to_dense(), expected)
    assert packed.qweight.shape == (rows, groups * g // 4)
    assert packed.scales.shape == (rows, groups)
    assert packed.values is None and packed.indices.shape == (rows, (groups * g // 2 + 3) // 4)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float16])
def test_pack_linear_24_and_dense(values_dtype):
    w = random_weight((8, 64), 0)
    packed = pack_linear(w, values_dtype=values_dtype, bias=torch.ones(8))
    assert torch.equal(packed.to_dense(), (w * nm_mask(w)).to(values_dtype).float())
    names = set(packed.tensors("blocks.0.attn.q_proj"))
    assert names == {"blocks.0.attn.q_proj." + f for f in ("values", "indices", "bias")}
    dense = pack_linear(w, sparse=False, int4_group_size=32)
    assert torch.equal(dense.to_dense(), fake_quantize_int4(w, 32))


def test_pack_linear_24_int4_bits_per_weight():
    w = random_weight((256, 1024), 1)
    packed = pack_linear(w, int4_group_size=128)
    bits = 8 * packed.nbytes() / w.numel()
    assert bits == pytest.approx(3.125)  # 2 (4-bit code per kept value) + 1 (2-bit index) + 16/128
