// MVUE24 of the output gradient, written straight into the 2:4 sparse GEMM's operand layout.
//
// Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024 (after Chmiel et
// al., ICLR 2023): in the weight gradient dW = dZ^T X the output gradient dZ^T [N, T] is sampled 2:4 along the
// token dimension T with MVUE24, so dW is one sparse GEMM. This kernel reads dZ [T, N] once (token-major, as
// autograd hands it over) and writes MVUE24(dZ^T) once, as kept values + mma.sp metadata.
//
// Law and arithmetic: exactly runtime/mvue24_kernel.mvue24_sample_t_reference (the torch reference this kernel is
// tested against, bit for bit), which is train/mvue24.py's law: per group of 4 tokens of one column n, the first
// survivor i1 with probability |x_i|/S, the second i2 among the rest with probability |x_j|/(S - |x_i1|), both
// from ONE uniform u (inverse CDF of the ordered pair: the first draw's residual drives the second); survivors
// are divided by their inclusion probability pi_j = (|x_j|/S) * D_j, D_j = 1 + sum_{i!=j} r_i, r_i =
// |x_i| / sum_{k!=i} |x_k|, i.e. written as sign(x_j) * S * (1/D_j). Every float operation is an explicit
// round-to-nearest intrinsic (no FMA contraction, IEEE division and reciprocal), in the reference's order.
// Zero groups stay zero; a lone non-zero is kept unscaled (pi = 1). A group whose magnitude sum is not finite
// (an inf/NaN entry) is written as NaN in columns 0 and 1, so a non-finite gradient stays visible to loss scaling.
//
// Random numbers: Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, SC 2011; the generator of cuRAND and PyTorch's
// CUDA RNG), stateless. Group (q, n) (tokens 4q..4q+3 of column n) has index g = q*N + n and uses word g % 4 of
// Philox(counter = (c_lo, c_hi, 0, 0) with c = offset/4 + g/4, key = (seed_lo, seed_hi)), as the uniform
// u = (word >> 8) * 2^-24 in [0, 1). offset % 4 == 0 (checked in Python), so the four columns 4k..4k+3 of a
// token group share one Philox block: one call per four groups.
//
// Layouts (runtime/sparse_meta.py and runtime/sparse_gemm.values_to_fragments are the contract):
//   grad   [T, N]  bf16/fp16 bit patterns, row-major; T % 64 == 0, N % 8 == 0, 8-byte aligned base.
//   values [Npad/16, T/64, 2, 32, 8] (16-bit): element [mt, kb, s, 4g+t, 4hk+2hr+p] = kept value p of row
//          16mt+g+8hr, token group 16kb+8s+4hk+t; as u32 words, block (mt, kb) word (32s + 4g + t)*4 + 2hk + hr
//          holds both kept values of that group (the lower column in the low half).
//   meta   [Npad/16, T/64, 32] uint32: block (mt, kb) word 4g+s' holds token groups 16kb+4s'..+3 of row 16mt+g
//          (bits [15:0], group j at bits 4j..4j+3) and of row 16mt+g+8 (bits [31:16]); nibble = i0 | i1 << 2.
//   Rows N..Npad-1 (Npad % 128 == 0) are zero with columns (0, 1), prepare_sparse24's padding. A group with fewer
//   than two non-zeros fills its lowest free columns (runtime/sparse24.compress_24's rule).
//
// CTA: 128 threads, rows 128*rt .. +127 (8 metadata blocks) x tokens 64*kb .. +63 (one block column). Thread:
// 4 consecutive rows (one 8-byte load per token: a half-warp reads 128 contiguous bytes of a token row) x 16
// tokens (4 groups = one metadata nibble row). Kept values and nibbles are staged in shared memory in the exact
// global order (values XOR-swizzled in 16-byte units against bank conflicts), then the CTA writes 8 x 1 KB of
// values and 8 x 128 B of metadata with 16-byte stores. One read of dZ, one write of the operand.
// mvue24_sample_dense draws the same samples and writes them as a dense [N, T] tensor instead.
//
// Self-contained: no CUDA headers (NVRTC only); 16-bit floats as bit patterns, converted with PTX cvt.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct bf16_bits { u16 x; };
struct f16_bits { u16 x; };

template <typename T> struct Half;

template <> struct Half<bf16_bits> {
  enum : u32 { kNaN = 0x7fc0u };  // torch's bfloat16 NaN
  __device__ __forceinline__ static float to_float(u32 h) { return __uint_as_float(h << 16); }
  __device__ __forceinline__ static u32 from_float(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};

template <> struct Half<f16_bits> {
  enum : u32 { kNaN = 0x7e00u };  // torch's float16 NaN
  __device__ __forceinline__ static float to_float(u32 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h));
    return f;
  }
  __device__ __forceinline__ static u32 from_float(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};

// Philox-4x32-10 of the counter (c0, c1, 0, 0) under key (k0, k1) (Random123's philox4x32_R(10, ...)).
__device__ __forceinline__ uint4 philox4x32_10(u32 c0, u32 c1, u32 k0, u32 k1) {
  u32 c2 = 0u, c3 = 0u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ float pick4(int i, float v0, float v1, float v2, float v3) {
  return i == 0 ? v0 : (i == 1 ? v1 : (i == 2 ? v2 : v3));
}

// MVUE24 of one group (16-bit bit patterns h0..h3 in token order, rnd = its Philox word). Returns the two stored
// values (lower column in the low half) and the metadata nibble (first column in bits [1:0], second in [3:2]).
template <typename T>
__device__ __forceinline__ void mvue24_group(u32 h0, u32 h1, u32 h2, u32 h3, u32 rnd, u32& pair, u32& nib) {
  constexpr float kTiny = 1.17549435e-38f;       // smallest normal float
  constexpr float kBelowOne = 0.99999994f;       // 1 - 2^-24, the largest float below 1
  constexpr float kTwoM24 = 5.9604644775390625e-8f;  // 2^-24
  constexpr float kMax = 3.40282347e38f;
  const float a0 = fabsf(Half<T>::to_float(h0)), a1 = fabsf(Half<T>::to_float(h1));
  const float a2 = fabsf(Half<T>::to_float(h2)), a3 = fabsf(Half<T>::to_float(h3));
  // Running sums: entry j owns [c_{j-1}, c_j) (empty for a zero).
  const float c1 = __fadd_rn(a0, a1), c2 = __fadd_rn(c1, a2), s = __fadd_rn(c2, a3);
  nib = 0x4u;  // columns (0, 1)
  if (s == 0.0f) {
    pair = 0u;
    return;
  }
  if (!(s <= kMax)) {  // inf or NaN
    pair = Half<T>::kNaN | (Half<T>::kNaN << 16);
    return;
  }
  // First draw: i1 = the first j with t < c_j, t = u*S < S.
  const float t = __fmul_rn(__fmul_rn(__uint2float_rn(rnd >> 8), kTwoM24), s);
  const bool l0 = t < a0, l1 = t < c1, l2 = t < c2;
  const int i1 = 3 - (int)l0 - (int)l1 - (int)l2;
  // Running sums d_j of the group without entry i1 (its interval empty), summed as the reference does.
  const float d0 = l0 ? 0.0f : a0;
  const float d1 = l0 ? a1 : (l1 ? a0 : c1);
  const float d2 = l0 ? __fadd_rn(a1, a2) : (l1 ? __fadd_rn(a0, a2) : (l2 ? c1 : c2));
  const float s2 = l2 ? __fadd_rn(d2, a3) : c2;
  // Second draw from the first one's residual v = (t - L1) / a_i1, uniform on [0, 1) given i1.
  const float lo = l0 ? 0.0f : (l1 ? a0 : (l2 ? c1 : c2));  // L1 = c_{i1-1}
  const float w = fmaxf(__fsub_rn(s, s2), kTiny);            // a_i1
  const float v = fminf(fmaxf(__fdiv_rn(__fsub_rn(t, lo), w), 0.0f), kBelowOne);
  const float t2 = __fmul_rn(v, s2);
  const bool m0 = t2 < d0, m1 = t2 < d1, m2 = t2 < d2, has2 = t2 < s2;
  const int i2 = 3 - (int)m0 - (int)m1 - (int)m2;
  // D_j = 1 + sum_{i!=j} r_i, r_i = a_i / (sum of the other three), every "other" sum from pair sums.
  const float p01 = fmaxf(c1, kTiny), p23 = fmaxf(__fadd_rn(a2, a3), kTiny);
  const float r0 = __fdiv_rn(a0, __fadd_rn(a1, p23)), r1 = __fdiv_rn(a1, __fadd_rn(a0, p23));
  const float r2 = __fdiv_rn(a2, __fadd_rn(a3, p01)), r3 = __fdiv_rn(a3, __fadd_rn(a2, p01));
  const float n01 = __fadd_rn(__fadd_rn(r0, r1), 1.0f), n23 = __fadd_rn(__fadd_rn(r2, r3), 1.0f);
  const float dd0 = __fadd_rn(r1, n23), dd1 = __fadd_rn(r0, n23), dd2 = __fadd_rn(r3, n01), dd3 = __fadd_rn(r2, n01);
  // Survivor values sign(x_j) * (S * (1/D_j)) in the GEMM dtype (rounding is sign-symmetric); +0 where x_j or the
  // rounded value is zero (x_i1 = 0 happens only when S is subnormal and t rounds up to S).
  const u32 x1 = i1 == 0 ? h0 : (i1 == 1 ? h1 : (i1 == 2 ? h2 : h3));
  const u32 x2 = i2 == 0 ? h0 : (i2 == 1 ? h1 : (i2 == 2 ? h2 : h3));
  u32 v1 = Half<T>::from_float(__fmul_rn(__frcp_rn(pick4(i1, dd0, dd1, dd2, dd3)), s));
  u32 v2 = has2 ? Half<T>::from_float(__fmul_rn(__frcp_rn(pick4(i2, dd0, dd1, dd2, dd3)), s)) : 0u;
  v1 = (v1 != 0u && (x1 & 0x7fffu) != 0u) ? (v1 | (x1 & 0x8000u)) : 0u;
  v2 = (v2 != 0u && (x2 & 0x7fffu) != 0u) ? (v2 | (x2 & 0x8000u)) : 0u;
  // Stored columns: the non-zeros, filled up to two with the lowest free columns (compress_24's rule), looked
  // up by the non-zero mask z (at most two bits): nibble z of kNibbles = p | q << 2, p < q.
  constexpr u64 kNibbles = 0x444E4DCC49884444ull;
  const u32 z = (v1 ? 1u << i1 : 0u) | (v2 ? 1u << i2 : 0u);
  nib = (u32)(kNibbles >> (4 * z)) & 0xfu;
  const int p = (int)(nib & 3u), q = (int)(nib >> 2);
  const u32 vp = p == i1 ? v1 : (p == i2 ? v2 : 0u);
  const u32 vq = q == i1 ? v1 : (q == i2 ? v2 : 0u);
  pair = vp | (vq << 16);
}

// Shared-memory position of value word idx = b*256 + s*128 + g*16 + t*4 + hk*2 + hr (b: metadata block of the
// CTA, see the kernel): bits 2..4 XORed with (g bit 2, b bits 0..1). A warp's store then hits 32 distinct banks;
// whole 16-byte units move, so the write-out still reads one aligned uint4 per logical unit.
__device__ __forceinline__ u32 swizzle(u32 idx) { return idx ^ ((((idx >> 6) & 1u) | ((idx >> 7) & 6u)) << 2); }

// This thread's place in a CTA tile (both kernels): rows 128*rt .. +127 x tokens 64*kb .. +63. The thread takes 4
// consecutive rows n0 .. n0+3 (one 8-byte load per token: a half-warp reads 128 contiguous bytes of a token row)
// x 16 tokens tok0 .. tok0+15 (4 groups = one metadata nibble row): k32 step ts >> 1, half ts & 1 of the value
// fragments, metadata word column ts.
struct ThreadTile {
  int rt, kb, ts, row0, n0;
  long long tok0;
  bool live;  // N % 8 == 0: the four rows are all real or all padding
};

__device__ __forceinline__ ThreadTile thread_tile(int n, int n_pad) {
  ThreadTile tt;
  const int row_tiles = n_pad >> 7;
  tt.rt = (int)(blockIdx.x % (u32)row_tiles);
  tt.kb = (int)(blockIdx.x / (u32)row_tiles);
  const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
  tt.ts = (warp & 2) | (lane >> 4);
  tt.row0 = ((warp & 1) << 6) | ((lane & 15) << 2);
  tt.n0 = (tt.rt << 7) + tt.row0;
  tt.tok0 = ((long long)tt.kb << 6) + (tt.ts << 4);
  tt.live = tt.n0 < n;
  return tt;
}

// MVUE24 of the thread's 16 groups: pair[e][j], nib[e][j] for row n0+e, token group j (tokens tok0+4j .. +3).
// Padding rows (not live) give zero groups: pair 0, columns (0, 1).
template <typename T>
__device__ __forceinline__ void sample_thread(const u16* __restrict__ grad, int n, const ThreadTile& tt, u64 seed,
                                              u64 offset, u32 (&pair)[4][4], u32 (&nib)[4][4]) {
  uint2 in[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) in[i] = make_uint2(0u, 0u);
  if (tt.live) {
    const u16* src = grad + tt.tok0 * n + tt.n0;
#pragma unroll
    for (int i = 0; i < 16; ++i) in[i] = __ldg(reinterpret_cast<const uint2*>(src + (long long)i * n));
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint4 rnd = make_uint4(0u, 0u, 0u, 0u);
    if (tt.live) {
      const u64 group = (u64)((tt.tok0 >> 2) + j) * (u64)n + (u64)tt.n0;  // q*N + n0, a multiple of 4
      const u64 ctr = (offset >> 2) + (group >> 2);
      rnd = philox4x32_10((u32)ctr, (u32)(ctr >> 32), (u32)seed, (u32)(seed >> 32));
    }
    const u32 word[4] = {rnd.x, rnd.y, rnd.z, rnd.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      u32 h[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u32 w2 = (e < 2) ? in[4 * j + i].x : in[4 * j + i].y;
        h[i] = (w2 >> ((e & 1) * 16)) & 0xffffu;
      }
      mvue24_group<T>(h[0], h[1], h[2], h[3], word[e], pair[e][j], nib[e][j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(128) mvue24_compress(const u16* __restrict__ grad, uint4* __restrict__ values,
                                                       uint4* __restrict__ meta, int n, int n_pad, int tokens,
                                                       u64 seed, u64 offset) {
  __shared__ __align__(16) u32 sval[8 * 256];  // 8 blocks x 1 KB of values, in global order (swizzled)
  __shared__ __align__(16) u32 smeta[8 * 32];  // 8 blocks x 32 metadata words
  const int kblocks = tokens >> 6;
  const int tid = threadIdx.x;
  const ThreadTile tt = thread_tile(n, n_pad);
  u32 pair[4][4], nib[4][4];
  sample_thread<T>(grad, n, tt, seed, offset, pair, nib);

  u32 mhalf[4] = {0u, 0u, 0u, 0u};  // metadata half-words of rows row0+e
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const u32 r = (u32)(tt.row0 + e), b = r >> 4, g = r & 7u, hr = (r >> 3) & 1u;
      const u32 idx = (b << 8) | ((u32)(tt.ts >> 1) << 7) | (g << 4) | ((u32)j << 2) | ((u32)(tt.ts & 1) << 1) | hr;
      sval[swizzle(idx)] = pair[e][j];
      mhalf[e] |= nib[e][j] << (4 * j);
    }
  }
  u16* smeta16 = reinterpret_cast<u16*>(smeta);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const u32 r = (u32)(tt.row0 + e), b = r >> 4, g = r & 7u, hr = (r >> 3) & 1u;
    smeta16[2 * ((b << 5) | (g << 2) | (u32)tt.ts) + hr] = (u16)mhalf[e];
  }
  __syncthreads();

  const uint4* sv4 = reinterpret_cast<const uint4*>(sval);
  const long long block0 = (long long)tt.rt * 8 * kblocks + tt.kb;  // global block (8rt, kb); (8rt+b, kb) is b*kblocks on
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 k = (u32)tid + 128u * i, b = k >> 6;
    values[(block0 + (long long)b * kblocks) * 64 + (k & 63u)] = sv4[swizzle(k << 2) >> 2];
  }
  if (tid < 64) {
    const u32 b = (u32)tid >> 3;
    meta[(block0 + (long long)b * kblocks) * 8 + (tid & 7)] = reinterpret_cast<const uint4*>(smeta)[tid];
  }
}

// The same draw written as the dense sample S = MVUE24(dZ^T) [N, T] (16-bit, row-major, 16-byte aligned base),
// for GEMM libraries that compress their own operand (cuSPARSELt): each thread writes its 4 rows x 16 tokens as
// two 16-byte stores per row (the two half-warps of a warp fill 64 contiguous bytes of each of 16 rows). A group
// puts its two stored values at its metadata columns p < q, zeros elsewhere: exactly the compressed operand
// expanded. Padding rows (>= N) are not written.
template <typename T>
__global__ void __launch_bounds__(128) mvue24_sample_dense(const u16* __restrict__ grad, uint4* __restrict__ out,
                                                           int n, int n_pad, int tokens, u64 seed, u64 offset) {
  const ThreadTile tt = thread_tile(n, n_pad);
  u32 pair[4][4], nib[4][4];
  sample_thread<T>(grad, n, tt, seed, offset, pair, nib);
  if (!tt.live) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    u32 w[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const u32 p = nib[e][j] & 3u, q = nib[e][j] >> 2, lo = pair[e][j] & 0xffffu, hi = pair[e][j] >> 16;
      u32 v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = (p == (u32)c ? lo : 0u) | (q == (u32)c ? hi : 0u);
      w[2 * j] = v[0] | (v[1] << 16);
      w[2 * j + 1] = v[2] | (v[3] << 16);
    }
    uint4* dst = out + (((long long)(tt.n0 + e) * tokens + tt.tok0) >> 3);
    dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
    dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}
