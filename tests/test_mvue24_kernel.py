"""MVUE24 fused into the 2:4 GEMM operand: runtime/mvue24_kernel.py and cuda/mvue24_compress.cu.

CPU (always): Philox-4x32-10 against the Random123 known answers and a plain-integer implementation; the
uniforms; the torch reference against train/mvue24.py draw for draw (same uniforms), its statistics (mean over
many seeds, inclusion and pair frequencies against the closed form), its special groups and padding; a
register-level emulation of the kernel (its thread mapping, Philox counters, group arithmetic, shared-memory
swizzle and write-out, mirrored from the .cu in numpy) against the reference, bit for bit; argument checks; the
NVRTC build for every architecture. GPU (``@pytest.mark.gpu``): the kernel against the reference on fresh
random inputs with poisoned outputs, and its output feeding the sparse GEMM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.kernel_build import KERNEL_ARCHS, compile_kernel
from sparsert.runtime.mvue24_kernel import (
    MVUE24_SPEC,
    mvue24_compress_t,
    mvue24_compress_t_reference,
    mvue24_sample_t,
    mvue24_sample_t_reference,
    mvue24_uniforms,
    philox4x32_10,
)
from sparsert.runtime.sparse_gemm import ROW_PAD, fragments_to_values
from sparsert.runtime.sparse_meta import decode_meta_isa

gpu = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Philox and the uniforms
# ---------------------------------------------------------------------------------------------------------

# Random123 tests/kat_vectors, the three "philox4x32 10" lines (Salmon et al., SC 2011).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", PHILOX_KAT)
def test_philox_known_answers(ctr, key, want):
    assert tuple(philox4x32_10(torch.tensor(ctr), key).tolist()) == want


def _philox_int(ctr, key):
    """Philox-4x32-10 on Python ints (full-width products), independent of the 16-bit-split torch version."""
    c, (k0, k1) = list(ctr), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK32]
    return tuple(c)


def test_philox_matches_integer_implementation():
    gen = torch.Generator().manual_seed(1)
    ctrs = torch.randint(0, 2**32, (64, 4), generator=gen, dtype=torch.int64)
    ctrs[0] = torch.tensor([MASK32, MASK32, 0, 0])
    key = (0xDEADBEEF, 0x01234567)
    got = philox4x32_10(ctrs, key)
    assert [tuple(r) for r in got.tolist()] == [_philox_int(c, key) for c in ctrs.tolist()]


def test_uniforms_are_24_bit_in_unit_interval_and_reproducible():
    u = mvue24_uniforms(4096, 64, seed=7, offset=12)
    assert u.dtype == torch.float32 and u.shape == (1024, 64)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).round())
    assert torch.equal(u, mvue24_uniforms(4096, 64, seed=7, offset=12))
    assert not torch.equal(u, mvue24_uniforms(4096, 64, seed=8, offset=12))
    assert not torch.equal(u, mvue24_uniforms(4096, 64, seed=7, offset=16))
    # group (q, n) is index q*N + n past the offset: later token groups equal a call that starts there
    assert torch.equal(u[100:], mvue24_uniforms(4096 - 400, 64, seed=7, offset=12 + 100 * 64))
    # uniform: 16 equal bins of 65536 draws, chi-square far below its 1e-6 tail (about 50 for 15 dof)
    counts = torch.bincount((u * 16).long().flatten(), minlength=16).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 50, chi2
    # word g % 4 of block offset/4 + g/4, with seed >= 2**32 and a counter past 2**32 * 4
    seed, offset = 2**64 - 3, 4 * 2**33 + 8
    got = mvue24_uniforms(4, 8, seed=seed, offset=offset)
    for g in range(8):
        word = _philox_int(((offset // 4 + g // 4) & MASK32, (offset // 4 + g // 4) >> 32, 0, 0),
                           (seed & MASK32, seed >> 32))[g % 4]
        assert float(got[0, g]) == (word >> 8) * 2.0**-24


# ---------------------------------------------------------------------------------------------------------
# The reference: law, statistics, special groups
# ---------------------------------------------------------------------------------------------------------

def _train_sample(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """train/mvue24.py's block sampler on ``x [T, N]`` with the given uniforms ``[T/4, N]`` -> float32 [T, N]."""
    from sparsert.train import mvue24 as train_mvue24

    t, n = x.shape
    views = train_mvue24._block_views(torch.empty(22 * (t // 4) * n), t // 4, n, None)
    views.u.copy_(u)
    out = torch.empty(t // 4, 4, n)
    train_mvue24._sample_block(x.float().reshape(t // 4, 4, n), out, views)
    return out.reshape(t, n)


def _hard_gradient(t: int, n: int, dtype, gen: torch.Generator, *, non_finite: bool = False) -> torch.Tensor:
    """Random magnitudes over many decades, ~30% zeros, lone non-zeros, exact ties, a subnormal band, and
    optionally inf/NaN groups."""
    x = torch.randn(t, n, generator=gen) * torch.exp(2 * torch.randn(t, n, generator=gen))
    x[torch.rand(t, n, generator=gen) < 0.3] = 0
    x[4:8, : n // 2] = 0
    x[5, : n // 2] = -1.5  # lone non-zeros
    x[8:12] = torch.randint(-2, 3, (4, n), generator=gen).float()  # ties
    tiny = 1e-39 if dtype == torch.bfloat16 else 6e-8  # bf16 and fp16 subnormals
    x[12:16] = tiny * torch.randint(-3, 4, (4, n), generator=gen)
    x = x.to(dtype)
    if non_finite:
        x[16, 0], x[21, 1], x[26, 2] = float("inf"), float("nan"), float("-inf")
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_draws_what_train_mvue24_draws(dtype):
    """Given the same uniforms, the reference's sampled operand equals train/mvue24.py's block sampler (the
    training-side MVUE24) rounded to the GEMM dtype, value for value, on finite inputs."""
    gen = torch.Generator().manual_seed(2)
    x = _hard_gradient(1024, 64, dtype, gen)
    u = mvue24_uniforms(1024, 64, seed=11)
    u[0], u[1] = 1 - 2**-24, 0.0  # the extreme uniforms
    from sparsert.runtime.mvue24_kernel import _sample

    got = _sample(x, u)
    want = _train_sample(x, u).to(dtype)
    assert torch.equal(got, want)
    # and the public path uses exactly these uniforms
    u = mvue24_uniforms(1024, 64, seed=11, offset=40)
    assert torch.equal(mvue24_sample_t_reference(x, seed=11, offset=40), _train_sample(x, u).to(dtype).t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [24, 128])
def test_result_is_2_of_4_with_the_padding_convention(dtype, n):
    gen = torch.Generator().manual_seed(3)
    x = _hard_gradient(192, n, dtype, gen, non_finite=True)
    w = mvue24_compress_t(x, seed=5, offset=8)
    n_pad = -(-n // ROW_PAD) * ROW_PAD
    assert (w.out_features, w.in_features, w.n_pad, w.dtype, w.bias) == (n, 192, n_pad, dtype, None)
    assert w.values.shape == (n_pad // 16, 3, 2, 32, 8) and w.meta.shape == (n_pad // 16, 3, 32)
    dense = mvue24_sample_t_reference(x, seed=5, offset=8)
    got = w.to_dense().to(dtype)
    assert torch.equal(got.isnan(), dense.isnan()) and torch.equal(got.nan_to_num(0), dense.nan_to_num(0))
    groups = dense.reshape(n, 48, 4)
    assert int((groups != 0).sum(-1).max()) <= 2
    # stored columns: the non-zeros, then the lowest free columns; padding rows are zeros at (0, 1)
    idx = decode_meta_isa(w.meta, n_pad, 192).reshape(n_pad, 48, 2).long()
    assert bool((idx[..., 0] < idx[..., 1]).all())
    kept = fragments_to_values(w.values)
    assert torch.equal(kept[n:], torch.zeros_like(kept[n:])) and bool((idx[n:] == torch.tensor([0, 1])).all())
    nz = groups != 0
    first_free = torch.where(nz[..., 0], 1, 0)  # lone non-zero at p > 0 pairs with column 0, at 0 with 1
    lone = nz.sum(-1) == 1
    lone_col = nz.float().argmax(-1)
    assert bool((idx[:n][lone][:, 0] == 0).all())
    assert bool((idx[:n][lone][:, 1] == torch.maximum(lone_col[lone], first_free[lone])).all())
    assert bool((idx[:n][nz.sum(-1) == 0] == torch.tensor([0, 1])).all())
    # zero groups stay zero, lone non-zeros are kept unscaled, two non-zeros are kept as they are (pi = 1);
    # groups of subnormals are left out (their pair sums are floored at the smallest normal float, as in
    # train/mvue24.py, so their probabilities are approximate)
    xt = x.t().reshape(n, 48, 4)
    nz_x = (xt != 0).sum(-1)
    normal = ((xt.float().abs() >= torch.finfo(torch.float32).tiny) | (xt == 0)).all(-1)
    for count in (0, 1, 2):
        sel = (nz_x == count) & torch.isfinite(xt.float()).all(-1) & normal
        assert sel.any() and torch.equal(groups[sel], xt[sel])
    # non-finite groups: NaN in columns 0 and 1
    for col, tok in ((0, 16), (1, 21), (2, 26)):
        g = dense[col, tok // 4 * 4: tok // 4 * 4 + 4]
        assert bool(g[:2].isnan().all()) and not bool(g[2:].any())


def _patterns(dtype) -> torch.Tensor:
    """16 groups [16, 4]: generic, dominant, ties, two/one/zero non-zeros, three non-zeros, extreme ranges."""
    gen = torch.Generator().manual_seed(4)
    rows = [[1, 2, 3, 4], [-1, 0.5, 0.25, 2], [100, 1, 1, 1], [1, 1, 1, 1], [0, 3, 0, -1], [0, 0, 5, 0],
            [0, 0, 0, 0], [1, 2, 0, 3], [0.001, 1000, 0.5, -0.5], [-3, -3, 1, 0.125], [0.3, 0.7, 0.2, 0.9]]
    p = torch.tensor(rows, dtype=torch.float32)
    return torch.cat([p, torch.randn(5, 4, generator=gen)]).to(dtype)


def _replicated(patterns: torch.Tensor, draws: int) -> torch.Tensor:
    """``∇Z [4·draws, P]`` whose column c repeats group ``patterns[c]`` along the tokens: one call draws each
    pattern ``draws`` times, each with its own Philox counter."""
    return patterns.t().repeat(draws, 1).contiguous()


def _sample_patterns(dtype, seeds: int, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patterns [P, 4], sampled groups [seeds·draws, P, 4] float32) through the public API."""
    pats = _patterns(dtype)
    x = _replicated(pats, draws)
    out = []
    for seed in range(seeds):
        w = mvue24_compress_t(x, seed=1000 + seed)
        out.append(w.to_dense().reshape(len(pats), draws, 4).transpose(0, 1))
    return pats, torch.cat(out)


def test_mean_over_seeds_converges_to_the_gradient():
    """Unbiased: the mean of 16 seeds x 1024 draws per group is within 5 standard errors of x (per entry,
    Var = x²(1/π − 1)), plus the fp16 rounding of the stored values (at most 2⁻¹¹|x| of bias)."""
    from sparsert.train.mvue24 import inclusion_probabilities_24

    pats, s = _sample_patterns(torch.float16, seeds=16, draws=1024)
    x = pats.float()
    pi = inclusion_probabilities_24(x.abs())
    r = s.shape[0]
    mean = s.double().mean(0)
    var = torch.where(pi > 0, x.double() ** 2 * (1 / pi.double().clamp(min=1e-30) - 1), 0)
    tol = 5 * (var / r).sqrt() + 2.0**-10 * x.double().abs() + 1e-12
    assert bool(((mean - x.double()).abs() <= tol).all()), (mean - x.double()).abs() / tol


def test_law_matches_inclusion_probabilities_and_pair_law():
    """Kept frequencies match train/mvue24.inclusion_probabilities_24, and pair frequencies the law of the two
    draws P({i, j}) = p_i·a_j/(S − a_i) + p_j·a_i/(S − a_j), within 5 binomial standard errors."""
    from sparsert.train.mvue24 import inclusion_probabilities_24

    pats, s = _sample_patterns(torch.bfloat16, seeds=8, draws=2048)
    a = pats.float().abs()
    kept = s != 0  # [R, P, 4]
    r = kept.shape[0]
    pi = inclusion_probabilities_24(a)
    freq = kept.double().mean(0)
    se = (pi.double() * (1 - pi.double()) / r).sqrt()
    assert bool(((freq - pi.double()).abs() <= 5 * se + 1e-12).all())
    total = a.sum(-1, keepdim=True)
    for c in range(a.shape[0]):
        if int((a[c] > 0).sum()) < 2:
            continue
        p = a[c] / total[c]
        for i in range(4):
            for j in range(i + 1, 4):
                want = 0.0
                if a[c, i] > 0 and a[c, j] > 0:
                    want = float(p[i] * a[c, j] / (total[c] - a[c, i]) + p[j] * a[c, i] / (total[c] - a[c, j]))
                got = float((kept[:, c, i] & kept[:, c, j]).double().mean())
                assert abs(got - want) <= 5 * (want * (1 - want) / r) ** 0.5 + 1e-12, (c, i, j, got, want)


def test_offset_chains_along_the_tokens():
    """Token rows T0..T1 sampled alone with offset + T0·N/4 draw what they draw inside the whole gradient."""
    x = torch.randn(256, 40, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    whole = mvue24_sample_t_reference(x, seed=9, offset=20)
    head = mvue24_sample_t_reference(x[:64].clone(), seed=9, offset=20)
    tail = mvue24_sample_t_reference(x[64:].clone(), seed=9, offset=20 + 64 * 40 // 4)
    assert torch.equal(whole, torch.cat([head, tail], dim=1))
    assert not torch.equal(whole, mvue24_sample_t_reference(x, seed=10, offset=20))


# ---------------------------------------------------------------------------------------------------------
# Register-level emulation of cuda/mvue24_compress.cu
# ---------------------------------------------------------------------------------------------------------

_F32 = np.float32
_TINY = _F32(np.finfo(np.float32).tiny)
_BELOW_ONE = _F32(1 - 2.0**-24)


def _to_f32(h: np.ndarray, bf16: bool) -> np.ndarray:
    if bf16:
        return (h.astype(np.uint32) << 16).view(np.float32)
    return h.astype(np.uint16).view(np.float16).astype(np.float32)


def _from_f32(f: np.ndarray, bf16: bool) -> np.ndarray:
    """cvt.rn.bf16.f32 / cvt.rn.f16.f32 of finite non-negative floats, as uint32 bit patterns."""
    if bf16:
        bits = f.view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)
    return f.astype(np.float16).view(np.uint16).astype(np.uint32)


def _emulate_group(h, rnd: np.ndarray, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    """``mvue24_group``: h = four uint32 arrays of 16-bit patterns, rnd uint32 -> (pair, nib) uint32."""
    with np.errstate(all="ignore"):
        a0, a1, a2, a3 = (np.abs(_to_f32(x, bf16)) for x in h)
        c1 = a0 + a1
        c2 = c1 + a2
        s = c2 + a3
        t = ((rnd >> 8).astype(np.float32) * _F32(2.0**-24)) * s
        l0, l1, l2 = t < a0, t < c1, t < c2
        i1 = 3 - l0.astype(np.int64) - l1 - l2
        zero = _F32(0)
        d0 = np.where(l0, zero, a0)
        d1 = np.where(l0, a1, np.where(l1, a0, c1))
        d2 = np.where(l0, a1 + a2, np.where(l1, a0 + a2, np.where(l2, c1, c2)))
        s2 = np.where(l2, d2 + a3, c2)
        lo = np.where(l0, zero, np.where(l1, a0, np.where(l2, c1, c2)))
        w = np.maximum(s - s2, _TINY)
        v = np.minimum(np.maximum((t - lo) / w, zero), _BELOW_ONE)
        t2 = v * s2
        m0, m1, m2, has2 = t2 < d0, t2 < d1, t2 < d2, t2 < s2
        i2 = 3 - m0.astype(np.int64) - m1 - m2
        p01, p23 = np.maximum(c1, _TINY), np.maximum(a2 + a3, _TINY)
        r0, r1, r2, r3 = a0 / (a1 + p23), a1 / (a0 + p23), a2 / (a3 + p01), a3 / (a2 + p01)
        n01, n23 = (r0 + r1) + _F32(1), (r2 + r3) + _F32(1)
        dd = [r1 + n23, r0 + n23, r3 + n01, r2 + n01]
        x1, x2 = np.choose(i1, h), np.choose(i2, h)
        v1 = _from_f32((_F32(1) / np.choose(i1, dd)) * s, bf16)
        v2 = np.where(has2, _from_f32((_F32(1) / np.choose(i2, dd)) * s, bf16), 0)
    v1 = np.where((v1 != 0) & ((x1 & 0x7FFF) != 0), v1 | (x1 & 0x8000), 0).astype(np.uint32)
    v2 = np.where((v2 != 0) & ((x2 & 0x7FFF) != 0), v2 | (x2 & 0x8000), 0).astype(np.uint32)
    z = np.where(v1 != 0, 1 << i1, 0) | np.where(v2 != 0, 1 << i2, 0)
    nib = ((0x444E4DCC49884444 >> (4 * z.astype(np.uint64))) & 0xF).astype(np.int64)
    p, q = nib & 3, nib >> 2
    vp = np.where(p == i1, v1, np.where(p == i2, v2, 0))
    vq = np.where(q == i1, v1, np.where(q == i2, v2, 0))
    pair = (vp | (vq << 16)).astype(np.uint32)
    nan = 0x7FC0 if bf16 else 0x7E00
    pair = np.where(s == 0, 0, np.where(s <= _F32(np.finfo(np.float32).max), pair, nan | (nan << 16)))
    nib = np.where((s == 0) | ~(s <= _F32(np.finfo(np.float32).max)), 4, nib)
    return pair.astype(np.uint32), nib.astype(np.uint32)


def _swizzle(idx: np.ndarray) -> np.ndarray:
    return idx ^ ((((idx >> 6) & 1) | ((idx >> 7) & 6)) << 2)


def _emulate_thread_tiles(bits: np.ndarray, n: int, n_pad: int, cta: int, seed: int, offset: int, bf16: bool):
    """``thread_tile`` and ``sample_thread`` of one CTA, its 128 threads at once: (tile fields, pair[e][j],
    nib[e][j]), each an array over the threads (the .cu index formulas and arithmetic mirrored)."""
    tid = np.arange(128)
    warp, lane = tid >> 5, tid & 31
    row_tiles = n_pad >> 7
    rt, kb = cta % row_tiles, cta // row_tiles
    ts = (warp & 2) | (lane >> 4)
    row0 = ((warp & 1) << 6) | ((lane & 15) << 2)
    n0 = (rt << 7) + row0
    tok0 = (kb << 6) + (ts << 4)
    live = n0 < n
    col = np.where(live, n0, 0)
    ins = []  # uint2 loads: .x = columns n0, n0+1; .y = n0+2, n0+3 (low half first)
    for i in range(16):
        w = [bits[tok0 + i, col + c].astype(np.uint32) for c in range(4)]
        ins.append((np.where(live, w[0] | (w[1] << 16), 0), np.where(live, w[2] | (w[3] << 16), 0)))
    pair = [[None] * 4 for _ in range(4)]
    nib = [[None] * 4 for _ in range(4)]
    for j in range(4):
        group = ((tok0 >> 2) + j).astype(np.int64) * n + n0  # q*N + n0
        ctr = torch.from_numpy((offset >> 2) + (group >> 2))
        zeros = torch.zeros_like(ctr)
        words = philox4x32_10(torch.stack([ctr & MASK32, ctr >> 32, zeros, zeros], -1),
                              (seed & MASK32, seed >> 32)).numpy().astype(np.uint32)
        words = np.where(live[:, None], words, 0).astype(np.uint32)
        for e in range(4):
            h = [((ins[4 * j + i][0] if e < 2 else ins[4 * j + i][1]) >> ((e & 1) * 16)) & 0xFFFF
                 for i in range(4)]
            pair[e][j], nib[e][j] = _emulate_group(h, words[:, e], bf16)
    tile = {"rt": rt, "kb": kb, "ts": ts, "row0": row0, "n0": n0, "tok0": tok0, "live": live}
    return tile, pair, nib


def emulate_mvue24_compress(grad: torch.Tensor, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel, CTA by CTA, all 128 threads at once: the .cu index formulas and arithmetic mirrored.
    Returns (values [Npad/16, T/64, 2, 32, 8] in grad's dtype, meta int32 [Npad/16, T/64, 32])."""
    tokens, n = grad.shape
    bf16 = grad.dtype == torch.bfloat16
    bits = grad.view(torch.int16).numpy().view(np.uint16)
    n_pad = -(-n // ROW_PAD) * ROW_PAD
    row_tiles, kblocks = n_pad >> 7, tokens >> 6
    poison = np.uint32(0xDEADBEEF)
    values4 = np.full((n_pad // 16 * kblocks * 64, 4), poison, dtype=np.uint32)
    meta4 = np.full((n_pad // 16 * kblocks * 8, 4), poison, dtype=np.uint32)
    tid = np.arange(128)
    for cta in range(row_tiles * kblocks):
        tt, pair, nib = _emulate_thread_tiles(bits, n, n_pad, cta, seed, offset, bf16)
        row0, ts = tt["row0"], tt["ts"]
        sval = np.zeros(2048, dtype=np.uint32)
        written = np.zeros(2048, dtype=np.int64)
        smeta16 = np.zeros(512, dtype=np.uint16)
        mhalf = [np.zeros(128, dtype=np.uint32) for _ in range(4)]
        for j in range(4):
            for e in range(4):
                r = row0 + e
                b, g, hr = r >> 4, r & 7, (r >> 3) & 1
                idx = (b << 8) | ((ts >> 1) << 7) | (g << 4) | (j << 2) | ((ts & 1) << 1) | hr
                sval[_swizzle(idx)] = pair[e][j]
                np.add.at(written, _swizzle(idx), 1)
                mhalf[e] |= nib[e][j] << (4 * j)
        assert (written == 1).all(), "every staged value word is written by exactly one thread"
        for e in range(4):
            r = row0 + e
            b, g, hr = r >> 4, r & 7, (r >> 3) & 1
            smeta16[2 * ((b << 5) | (g << 2) | ts) + hr] = mhalf[e].astype(np.uint16)
        block0 = tt["rt"] * 8 * kblocks + tt["kb"]
        sv4 = sval.reshape(512, 4)
        for i in range(4):
            k = tid + 128 * i
            values4[(block0 + (k >> 6) * kblocks) * 64 + (k & 63)] = sv4[_swizzle(k << 2) >> 2]
        t64 = tid[:64]
        meta4[(block0 + (t64 >> 3) * kblocks) * 8 + (t64 & 7)] = smeta16.view(np.uint32).reshape(64, 4)[t64]
    values = torch.from_numpy(values4.view(np.int16).copy()).view(grad.dtype)
    meta = torch.from_numpy(meta4.view(np.int32).copy())
    return values.reshape(n_pad // 16, kblocks, 2, 32, 8), meta.reshape(n_pad // 16, kblocks, 32)


def emulate_mvue24_sample_dense(grad: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """``mvue24_sample_dense``, CTA by CTA: the same samples, each live thread's two 16-byte stores per row at
    uint4 index ((n0 + e)·T + tok0) / 8 of a poisoned [N, T] output. Returns [N, T] in grad's dtype."""
    tokens, n = grad.shape
    bf16 = grad.dtype == torch.bfloat16
    bits = grad.view(torch.int16).numpy().view(np.uint16)
    n_pad = -(-n // 128) * 128  # the Python side's grid: whole row tiles
    out4 = np.full((n * tokens // 8, 4), np.uint32(0xDEADBEEF), dtype=np.uint32)
    written = np.zeros(n * tokens // 8, dtype=np.int64)
    for cta in range(n_pad // 128 * (tokens // 64)):
        tt, pair, nib = _emulate_thread_tiles(bits, n, n_pad, cta, seed, offset, bf16)
        live = tt["live"]
        for e in range(4):
            w = []
            for j in range(4):
                p, q, lo, hi = nib[e][j] & 3, nib[e][j] >> 2, pair[e][j] & 0xFFFF, pair[e][j] >> 16
                v = [np.where(p == c, lo, 0) | np.where(q == c, hi, 0) for c in range(4)]
                w += [v[0] | (v[1] << 16), v[2] | (v[3] << 16)]
            dst = ((tt["n0"] + e) * tokens + tt["tok0"]) >> 3
            for half in range(2):
                idx = dst[live] + half
                out4[idx] = np.stack(w[4 * half:4 * half + 4], axis=1)[live]
                np.add.at(written, idx, 1)
    assert (written == 1).all(), "every 16-byte unit of the output is written by exactly one thread"
    return torch.from_numpy(out4.view(np.int16).copy()).view(grad.dtype).reshape(n, tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n,seed,offset", [
    (64, 128, 1, 0),  # one row tile, exactly ROW_PAD rows
    (192, 200, 2**64 - 1, 4 * 2**33),  # padding rows; seed and counter with high words
    (128, 8, 3, 4),  # nearly all padding
])
def test_kernel_emulation_matches_reference(dtype, tokens, n, seed, offset):
    gen = torch.Generator().manual_seed(tokens + n)
    x = _hard_gradient(tokens, n, dtype, gen, non_finite=n > 8)
    values, meta = emulate_mvue24_compress(x, seed, offset)
    ref = mvue24_compress_t_reference(x, seed=seed, offset=offset)
    assert torch.equal(meta, ref.meta)
    assert torch.equal(values.view(torch.int16), ref.values.view(torch.int16))
    dense = emulate_mvue24_sample_dense(x, seed, offset)  # the dense kernel: the same draw, expanded
    want = mvue24_sample_t_reference(x, seed=seed, offset=offset)
    assert torch.equal(dense.view(torch.int16), want.view(torch.int16))
    assert torch.equal(mvue24_sample_t(x, seed=seed, offset=offset).view(torch.int16), want.view(torch.int16))


# ---------------------------------------------------------------------------------------------------------
# Argument checks, outputs, build
# ---------------------------------------------------------------------------------------------------------

def _misaligned(t: int, n: int) -> torch.Tensor:
    return torch.zeros(t * n + 1, dtype=torch.bfloat16)[1:].view(t, n)


@pytest.mark.parametrize("make,kwargs,error,match", [
    (lambda: torch.zeros(64, 16), {}, FormatError, "grad has dtype float32, expected one of bfloat16, float16"),
    (lambda: torch.zeros(16, 64, dtype=torch.bfloat16).t(), {}, FormatError, "grad must be contiguous"),
    (lambda: _misaligned(64, 16), {}, FormatError, "8-byte boundary"),
    (lambda: torch.zeros(64, 16, 1, dtype=torch.float16), {}, FormatError, "grad must be 2-D"),
    (lambda: torch.zeros(96, 16, dtype=torch.bfloat16), {}, FormatError,
     "T=96 tokens; T must be a positive multiple of 64"),
    (lambda: torch.zeros(64, 12, dtype=torch.bfloat16), {}, FormatError, "N=12 columns; N must be a positive"),
    (lambda: [[0.0] * 16] * 64, {}, FormatError, "grad must be a torch.Tensor"),
    (lambda: torch.zeros(64, 16, dtype=torch.bfloat16), {"seed": -1}, ConfigError,
     r"seed=-1 must be in \[0, 2\*\*64\)"),
    (lambda: torch.zeros(64, 16, dtype=torch.bfloat16), {"seed": 2**64}, ConfigError, "seed=.* must be in"),
    (lambda: torch.zeros(64, 16, dtype=torch.bfloat16), {"seed": 1.5}, ConfigError, "seed must be an int, got float"),
    (lambda: torch.zeros(64, 16, dtype=torch.bfloat16), {"seed": True}, ConfigError, "seed must be an int, got bool"),
    (lambda: torch.zeros(64, 16, dtype=torch.bfloat16), {"offset": 6}, ConfigError,
     "offset=6 must be a multiple of 4"),
    (lambda: torch.zeros(64, 16, dtype=torch.bfloat16), {"offset": 2**64 - 4}, ConfigError,
     "runs past the 2\\*\\*64 Philox counters"),
])
def test_bad_input_errors(make, kwargs, error, match):
    args = {"seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        mvue24_compress_t(make(), **args)


def test_bad_outputs_and_filled_outputs():
    x = torch.randn(64, 16).to(torch.float16)
    with pytest.raises(FormatError, match=r"out_values has shape \(8, 1, 2, 32, 4\), expected \(8, 1, 2, 32, 8\)"):
        mvue24_compress_t(x, seed=0, out_values=torch.zeros(8, 1, 2, 32, 4, dtype=torch.float16))
    with pytest.raises(FormatError, match="out_values has dtype bfloat16, expected one of float16"):
        mvue24_compress_t(x, seed=0, out_values=torch.zeros(8, 1, 2, 32, 8, dtype=torch.bfloat16))
    with pytest.raises(FormatError, match=r"out_meta has shape \(8, 2, 32\), expected \(8, 1, 32\)"):
        mvue24_compress_t(x, seed=0, out_meta=torch.zeros(8, 2, 32, dtype=torch.int32))
    out_v = torch.full((8, 1, 2, 32, 8), float("nan"), dtype=torch.float16)
    out_m = torch.full((8, 1, 32), -1, dtype=torch.int32)
    w = mvue24_compress_t(x, seed=4, out_values=out_v, out_meta=out_m)
    assert w.values is out_v and w.meta is out_m
    ref = mvue24_compress_t_reference(x, seed=4)
    assert torch.equal(out_v, ref.values) and torch.equal(out_m, ref.meta)
    with pytest.raises(FormatError, match="philox4x32_10: counter must be an int64 tensor"):
        philox4x32_10(torch.zeros(3, dtype=torch.int64), (0, 0))


def test_dense_sample_checks_its_output():
    x = torch.randn(64, 16).to(torch.float16)
    with pytest.raises(FormatError, match=r"mvue24_sample_t: out has shape \(64, 16\), expected \(16, 64\)"):
        mvue24_sample_t(x, seed=0, out=torch.zeros(64, 16, dtype=torch.float16))
    with pytest.raises(FormatError, match="mvue24_sample_t: out has dtype bfloat16, expected one of float16"):
        mvue24_sample_t(x, seed=0, out=torch.zeros(16, 64, dtype=torch.bfloat16))
    with pytest.raises(FormatError, match="mvue24_sample_t: grad \\[T, N\\] has T=60 tokens"):
        mvue24_sample_t(torch.zeros(60, 16, dtype=torch.float16), seed=0)
    with pytest.raises(FormatError, match="mvue24_sample_t: out overlaps grad in memory"):
        mvue24_sample_t(x, seed=0, out=x.view(16, 64))
    out = torch.full((16, 64), float("nan"), dtype=torch.float16)
    assert mvue24_sample_t(x, seed=3, out=out) is out
    assert torch.equal(out.view(torch.int16), mvue24_sample_t_reference(x, seed=3).view(torch.int16))


def test_kernel_compiles_for_every_arch_without_spills(tmp_path_factory):
    """kernel_build.SPEC_MODULES does not list this module yet, so tests/test_kernel_build.py does not see
    MVUE24_SPEC: build it here for every target (no GPU needed), from the shared on-disk cache when warm."""
    assert MVUE24_SPEC.archs == KERNEL_ARCHS
    for arch in KERNEL_ARCHS:
        ck = compile_kernel(MVUE24_SPEC, arch)
        assert ck.cubin and f".target {arch}" in ck.ptx
        assert set(ck.lowered_names) == set(MVUE24_SPEC.name_expressions)
        for expr in MVUE24_SPEC.name_expressions:
            assert 0 < ck.registers[expr] <= 128, f"{expr} on {arch}:\n{ck.log}"
            assert ck.stack_frame.get(expr, 0) == 0, f"{expr} on {arch} uses local memory:\n{ck.log}"
        assert (ck.spill_stores, ck.spill_loads) == (0, 0), f"mvue24_compress spills on {arch}:\n{ck.log}"
        # exact IEEE arithmetic: no contracted multiply-add, division and reciprocal correctly rounded
        assert "fma.rn.f32" not in ck.ptx and "div.rn.f32" in ck.ptx and "rcp.rn.f32" in ck.ptx
        assert "div.approx" not in ck.ptx and "rcp.approx" not in ck.ptx


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------

GPU_SHAPES = [(64, 8), (64, 128), (192, 200), (1024, 384), (512, 1000)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_kernel_matches_reference(dtype, shape):
    tokens, n = shape
    n_pad = -(-n // ROW_PAD) * ROW_PAD
    for trial in range(2):  # fresh inputs, seeds and offsets per run
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
        x = _hard_gradient(tokens, n, dtype, gen, non_finite=n > 8).cuda()
        seed = int(torch.randint(0, 2**62, ())) * (3 if trial else 1)
        offset = 4 * int(torch.randint(0, 2**40, ()))
        out_v = torch.full((n_pad // 16, tokens // 64, 2, 32, 8), float("nan"), dtype=dtype, device="cuda")
        out_m = torch.full((n_pad // 16, tokens // 64, 32), -1, dtype=torch.int32, device="cuda")
        w = mvue24_compress_t(x, seed=seed, offset=offset, out_values=out_v, out_meta=out_m)
        torch.cuda.synchronize()
        assert w.values is out_v and w.meta is out_m
        ref = mvue24_compress_t_reference(x.cpu(), seed=seed, offset=offset)
        assert torch.equal(out_m.cpu(), ref.meta), f"metadata differs (trial {trial}, seed {seed}, offset {offset})"
        assert torch.equal(out_v.cpu().view(torch.int16), ref.values.view(torch.int16)), \
            f"values differ (trial {trial}, seed {seed}, offset {offset})"
        fresh = mvue24_compress_t(x, seed=seed, offset=offset)  # allocated outputs, same bits
        torch.cuda.synchronize()
        assert torch.equal(fresh.values.view(torch.int16), out_v.view(torch.int16))
        assert torch.equal(fresh.meta, out_m)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_dense_sample_kernel_matches_reference_and_compressed_draw(dtype, shape):
    """``mvue24_sample_dense`` == the torch reference, bit for bit, and == the compress kernel's operand expanded
    (the same draw); a poisoned output is overwritten everywhere."""
    from sparsert.runtime.kernels import prune24_decompress

    tokens, n = shape
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = _hard_gradient(tokens, n, dtype, gen, non_finite=n > 8).cuda()
    seed, offset = int(torch.randint(0, 2**62, ())), 4 * int(torch.randint(0, 2**40, ()))
    out = torch.full((n, tokens), float("nan"), dtype=dtype, device="cuda")
    got = mvue24_sample_t(x, seed=seed, offset=offset, out=out)
    torch.cuda.synchronize()
    assert got is out
    ref = mvue24_sample_t_reference(x.cpu(), seed=seed, offset=offset)
    assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16)), f"seed {seed}, offset {offset}"
    w = mvue24_compress_t(x, seed=seed, offset=offset)
    expanded = prune24_decompress(fragments_to_values(w.values), w.meta, tokens)[:n]
    assert torch.equal(expanded.view(torch.int16), out.view(torch.int16))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_gradient_feeds_the_sparse_gemm(dtype):
    """∇Wᵀ = sparse24_linear(Xᵀ, MVUE24(∇Zᵀ)) on the GPU == Xᵀ · sampledᵀ in fp64."""
    from sparsert.runtime.sparse_gemm import sparse24_linear

    tokens, n, k = 512, 384, 256
    grad = torch.randn(tokens, n, device="cuda").to(dtype)
    x = torch.randn(tokens, k, device="cuda").to(dtype)
    op = mvue24_compress_t(grad, seed=123)
    grad_w_t = sparse24_linear(x.t().contiguous(), op)  # [K, N]
    torch.cuda.synchronize()
    sampled = mvue24_sample_t_reference(grad.cpu(), seed=123).double()  # [N, T]
    ref = x.cpu().double().t() @ sampled.t()
    err = float((grad_w_t.cpu().double() - ref).norm() / ref.norm())
    assert err < {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype], err  # the bounds per dtype
