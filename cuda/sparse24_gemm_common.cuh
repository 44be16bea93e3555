// Device building blocks shared by the 2:4 sparse GEMMs (cuda/sparse24_gemm.cu, cuda/w4a16_sparse24_gemm.cu,
// cuda/sparse24_gemm_sm90.cu), included as "sparse24_gemm_common.cuh" (runtime/kernel_build.py puts cuda/ on
// the include path and hashes this file into every including kernel's cache key). Self-contained like the
// kernels: no CUDA headers, 16-bit floats kept as unsigned short bit patterns, conversions in PTX.
//
//   - PTX wrappers: cp.async (global -> shared), ldmatrix, mma.sp::ordered_metadata m16n8k32, and the
//     ldmatrix B fragments of a row-swizzled X tile;
//   - the CTA-level loops of the mma.sp kernels: strided copies, per-16-row-block weight slabs, the
//     STAGES-deep cp.async ring;
//   - INT4 dequantisation in registers (lop3 magic numbers, after Sparse-Marlin) and the scale words;
//   - epilogue: fp32 -> bf16/fp16 rounding, bias + activation, the transposed output tile, grouped
//     rasterisation of the 1-D grid.
//
// Everything is __forceinline__ (the kernels' register allocation sees the code as if written in place).
// Operand layouts are in each kernel file's header and in cuda/README.md.

#ifndef SPARSERT_SPARSE24_GEMM_COMMON_CUH
#define SPARSERT_SPARSE24_GEMM_COMMON_CUH

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DEVI __device__ __forceinline__

namespace sp24 {

// ------------------------------------------------------------------------------------------------------
// cp.async, ldmatrix, mma.sp
// ------------------------------------------------------------------------------------------------------

DEVI u32 smem_u32(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

// 16-byte cp.async, L2 only (.cg); zero-fills the destination when !valid (src-size 0).
DEVI void cp_async16(u32 dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
template <int BYTES>
DEVI void cp_async_small(u32 dst, const void* src) {  // 4, 8 or 16 bytes, through L1 (.ca)
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(src), "n"(BYTES) : "memory");
}
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
DEVI void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
DEVI void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

DEVI void ldsm_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// B fragments of one k16 column group for NB n8 token blocks, from an X tile in shared memory whose rows
// (row_bytes apart) hold 16-byte chunks XOR-swizzled by row: chunk j of row r sits at (j ^ (r & 7)) * 16, so the
// 8 rows an ldmatrix reads hit 8 different bank groups. Block nb = rows row0 + 8nb .. +7; chunk0 = the group's
// first chunk (4 chunks = 32 columns = one k32 step).
template <int NB>
DEVI void ldsm_x_frags(u32 (&b)[NB][4], u32 tile, int row_bytes, int row0, int chunk0, int lane) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int row = row0 + nb * 8 + (lane & 7);
    const int chunk = chunk0 + (lane >> 3);
    ldsm_x4(b[nb], tile + row * row_bytes + ((chunk ^ (row & 7)) << 4));
  }
}

// T: "bf16" or "f16" (a string literal: PTX type of A and B).
#define SP24_MMA_SP_M16N8K32(T)                                                                            \
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." T "." T ".f32 "               \
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"                 \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),   \
                 "r"(e), "n"(SEL))

// D += A(2:4, 16x32) * B(32x8); DT 0 = bf16, 1 = fp16; SEL = sparsity selector (which thread pair of each
// quad supplies the metadata word e).
template <int DT, int SEL>
DEVI void mma_sp(float (&c)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
  if constexpr (DT == 0) {
    SP24_MMA_SP_M16N8K32("bf16");
  } else {
    SP24_MMA_SP_M16N8K32("f16");
  }
}

#undef SP24_MMA_SP_M16N8K32

// mma_sp with a selector known only after loop unrolling (k32 step s of a 64-column block uses s % 2).
template <int DT>
DEVI void mma_sp_step(float (&c)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e, int s) {
  if (s & 1)
    mma_sp<DT, 1>(c, a, b, e);
  else
    mma_sp<DT, 0>(c, a, b, e);
}

// ------------------------------------------------------------------------------------------------------
// CTA-level loops of the mma.sp kernels (NT threads)
// ------------------------------------------------------------------------------------------------------

__host__ __device__ constexpr int log2_exact(int v) { return v <= 1 ? 0 : 1 + log2_exact(v >> 1); }

// f(c) for c = tid, tid + NT, ... < COUNT: fully unrolled, no bounds test when NT divides COUNT.
template <int COUNT, int NT, class F>
DEVI void cta_strided(int tid, F&& f) {
#pragma unroll
  for (int i = 0; i < (COUNT + NT - 1) / NT; ++i) {
    const int c = tid + i * NT;
    if (COUNT % NT == 0 || c < COUNT) f(c);
  }
}

// Weight slabs of one k tile for NBLK consecutive 16-row blocks: block b copies SLAB bytes from
// src + ((blk0 + b) * ktiles + kt) * UNIT (UNIT = bytes per k step of a block in global memory) to
// dst + b * SLAB, in 16-byte cp.async chunks spread over NT threads (thread index tid).
template <int NBLK, int SLAB, int NT, int UNIT = SLAB>
DEVI void copy_block_slabs(u32 dst, const void* src, int blk0, int ktiles, int kt, int tid) {
  constexpr int CH = SLAB / 16;  // chunks per slab
  constexpr int LOG_CH = log2_exact(CH);
  static_assert(CH == 1 << LOG_CH, "SLAB must be 16 bytes times a power of two");
  cta_strided<NBLK * CH, NT>(tid, [&](int c) {
    const int b = c >> LOG_CH, j = c & (CH - 1);
    const unsigned char* from =
        static_cast<const unsigned char*>(src) + ((size_t)(blk0 + b) * ktiles + kt) * UNIT + j * 16;
    cp_async16(dst + b * SLAB + j * 16, from, true);
  });
}

// STAGES-deep cp.async ring (global -> shared) shared by the whole CTA, one __syncthreads per k tile.
// load(slot, kt) issues the copies of k tile kt into ring slot `slot`. Use:
//   cta_ring_fill<STAGES>(ktiles, load);
//   for (int kt = 0; kt < ktiles; ++kt) { cta_ring_advance<STAGES>(kt, ktiles, load); ... slot kt % STAGES ... }
//   cta_ring_drain();
template <int STAGES, class Load>
DEVI void cta_ring_fill(int ktiles, Load&& load) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load(s, s);
    cp_async_commit();
  }
}
// Wait for k tile kt, then start loading tile kt + STAGES - 1 into the slot every warp has just finished.
template <int STAGES, class Load>
DEVI void cta_ring_advance(int kt, int ktiles, Load&& load) {
  cp_async_wait<STAGES - 2>();
  __syncthreads();  // stage kt visible to all; every warp is done with stage kt-1's slot
  const int nk = kt + STAGES - 1;
  if (nk < ktiles) load(nk % STAGES, nk);
  cp_async_commit();
}
// Every copy landed and every warp past the ring: its shared memory is free.
DEVI void cta_ring_drain() {
  cp_async_wait<0>();
  __syncthreads();
}

template <int A, int B>
DEVI void zero_acc(float (&acc)[A][B][4]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;
}

// ------------------------------------------------------------------------------------------------------
// INT4 dequantisation (layouts: cuda/w4a16_sparse24_gemm.cu's header)
// ------------------------------------------------------------------------------------------------------

template <int LUT>
DEVI u32 lop3(u32 a, u32 b, u32 c) {
  u32 r;
  asm volatile("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return r;
}
constexpr int AND_OR = (0xf0 & 0xcc) | 0xaa;  // (a & b) | c

DEVI u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
DEVI u32 hsub2(u32 a, u32 b) {
  u32 r;
  asm("sub.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
DEVI u32 hmul2(u32 a, u32 b) {
  u32 r;
  asm("mul.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
DEVI u32 bfma2(u32 a, u32 b, u32 c) {  // bf16x2 fma exists from sm_80 (add/sub/mul.bf16x2 only from sm_90)
  u32 r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// One word of 8 offset-binary INT4 codes -> the 4 A registers (code - 8) * scale.
// Register r = (n_r, n_r+4): rows g (r = 0, 2) take scale sg, rows g+8 (r = 1, 3) take sg8 (each a
// 16-bit value replicated in both halves).
//   fp16: 0x6400 | n = 1024 + n exactly; (1024 + 16n) / 16 - 72 = n - 8 for the upper nibble of a byte.
//   bf16: 0x4300 | n = 128 + n exactly; (128 + n) - 136 = n - 8 (bf16 has no room for the x16 trick).
template <int DT>
DEVI void dequant_word(u32 q, u32 sg, u32 sg8, u32 (&a)[4]) {
  constexpr u32 LO = 0x000f000fu;
  if constexpr (DT == 1) {
    constexpr u32 HI = 0x00f000f0u, EX = 0x64006400u;
    constexpr u32 SUB = 0x64086408u, MUL = 0x2c002c00u, ADD = 0xd480d480u;
    const u32 lo0 = lop3<AND_OR>(q, LO, EX), hi0 = lop3<AND_OR>(q, HI, EX);
    const u32 q8 = q >> 8;
    const u32 lo1 = lop3<AND_OR>(q8, LO, EX), hi1 = lop3<AND_OR>(q8, HI, EX);
    a[0] = hmul2(hsub2(lo0, SUB), sg);
    a[1] = hmul2(hfma2(hi0, MUL, ADD), sg8);
    a[2] = hmul2(hsub2(lo1, SUB), sg);
    a[3] = hmul2(hfma2(hi1, MUL, ADD), sg8);
  } else {
    constexpr u32 EX = 0x43004300u, ONE = 0x3f803f80u, NEG136 = 0xc308c308u, NEG0 = 0x80008000u;
    a[0] = bfma2(bfma2(lop3<AND_OR>(q, LO, EX), ONE, NEG136), sg, NEG0);
    a[1] = bfma2(bfma2(lop3<AND_OR>(q >> 4, LO, EX), ONE, NEG136), sg8, NEG0);
    a[2] = bfma2(bfma2(lop3<AND_OR>(q >> 8, LO, EX), ONE, NEG136), sg, NEG0);
    a[3] = bfma2(bfma2(lop3<AND_OR>(q >> 12, LO, EX), ONE, NEG136), sg8, NEG0);
  }
}

DEVI u32 lo_pair(u32 s) { return __byte_perm(s, s, 0x1010); }  // (low half, low half)
DEVI u32 hi_pair(u32 s) { return __byte_perm(s, s, 0x3232); }  // (high half, high half)

// dequant_word with the scale word (row g in the low half, row g+8 in the high half) of its sub-group.
template <int DT>
DEVI void dequant_word_scaled(u32 q, u32 scw, u32 (&a)[4]) {
  dequant_word<DT>(q, lo_pair(scw), hi_pair(scw), a);
}

// Scale words (row g, row g+8) of sub-group q as an array of NG u32, read from shared memory.
template <int NG>
DEVI void load_scales(const unsigned char* p, u32 (&sc)[NG]) {
  if constexpr (NG == 1) {
    sc[0] = *reinterpret_cast<const u32*>(p);
  } else if constexpr (NG == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    sc[0] = v.x;
    sc[1] = v.y;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    sc[0] = v.x;
    sc[1] = v.y;
    sc[2] = v.z;
    sc[3] = v.w;
  }
}

// ------------------------------------------------------------------------------------------------------
// Epilogue
// ------------------------------------------------------------------------------------------------------

template <int DT>
DEVI u16 to_u16(float v) {
  u16 r;
  if constexpr (DT == 0) {
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(v));
  } else {
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(v));
  }
  return r;
}

// 0 none, 1 relu, 2 silu, 3 gelu (erf form, as torch.nn.functional.gelu's default).
DEVI float activation(float v, int act) {
  if (act == 1) return fmaxf(v, 0.0f);
  if (act == 2) return v / (1.0f + expf(-v));
  if (act == 3) return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
  return v;
}

// Output feature r, tokens c and c+1 of an accumulator pair (v0, v1) -> act(v + bias) rounded to DT, written
// into the transposed tile out [tokens][LD] (Y rows in shared memory).
template <int DT, int LD>
DEVI void put_transposed_pair(u16* out, int r, int c, float v0, float v1, float bv, int act) {
  out[c * LD + r] = to_u16<DT>(activation(v0 + bv, act));
  out[(c + 1) * LD + r] = to_u16<DT>(activation(v1 + bv, act));
}

// Bias of output feature n (0 when there is no bias or n is a padding row).
DEVI float bias_at(const float* __restrict__ bias, int n, int N) {
  return (bias != nullptr && n < N) ? bias[n] : 0.0f;
}

// 16-byte chunk j of row tl of the transposed tile out [BT][LD] -> Y[m0 + tl, n0 + 8j .. +7] (inside Y only).
template <int LD>
DEVI void store_tile_chunk(u16* __restrict__ y, const u16* out, int tl, int j, int M, int N, int m0, int n0) {
  const int m = m0 + tl, n = n0 + j * 8;
  if (m < M && n < N)
    *reinterpret_cast<uint4*>(y + (size_t)m * N + n) = *reinterpret_cast<const uint4*>(out + tl * LD + j * 8);
}

// Epilogue of the mma.sp kernels: CTA tile BR output features x BT tokens, WR x WT warps (NT threads), warp
// (wr, wt) holding acc[mi][ni] = the m16n8 D fragment of features wr*WM + 16mi.., tokens wt*WN + 8ni...
// bias + activation in fp32, round, write Y^T fragments as Y rows into shared memory (row stride BR + 8 u16),
// then 16-byte stores of Y rows. smem must be free (call after cta_ring_drain).
template <int DT, int BR, int BT, int WR, int WT, int MI, int NI>
DEVI void mma_tile_epilogue(const float (&acc)[MI][NI][4], unsigned char* smem, int tid, int lane, int wr, int wt,
                            const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int n0, int m0,
                            int act) {
  constexpr int NT = WR * WT * 32;
  constexpr int WM = BR / WR, WN = BT / WT;
  constexpr int OUT_LD = BR + 8;
  constexpr int CPR = BR / 8;  // 16-byte chunks per output row
  u16* out = reinterpret_cast<u16*>(smem);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wr * WM + mi * 16 + g + 8 * h;  // output feature within the tile
      const float bv = bias_at(bias, n0 + r, N);
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int c = wt * WN + ni * 8 + 2 * t;  // token within the tile
        put_transposed_pair<DT, OUT_LD>(out, r, c, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], bv, act);
      }
    }
  }
  __syncthreads();
  cta_strided<BT * CPR, NT>(tid, [&](int c) { store_tile_chunk<OUT_LD>(y, out, c / CPR, c % CPR, M, N, m0, n0); });
}

// Grouped rasterisation of a 1-D grid over nx weight tiles x ny token tiles: consecutive CTAs walk the
// weight tiles for a band of `group` token tiles, so the CTAs resident at once share both operands in L2.
// (runtime/sparse_gemm.tile_coords is the Python mirror.)
DEVI void tile_coords(int pid, int nx, int ny, int group, int& x, int& y) {
  const int per_group = group * nx;
  const int gid = pid / per_group;
  const int first_y = gid * group;
  const int gsize = min(ny - first_y, group);
  const int r = pid - gid * per_group;
  y = first_y + r % gsize;
  x = r / gsize;
}

}  // namespace sp24

#endif  // SPARSERT_SPARSE24_GEMM_COMMON_CUH
