// W4A16 2:4 sparse GEMM: INT4 group-quantized kept values, dequantized in registers and fed to the sparse
// tensor cores (mma.sp::ordered_metadata m16n8k32), sm_80 and newer. Idea after Sparse-Marlin (Castro et
// al., "MARLIN: Mixed-precision auto-regressive parallel inference on large language models", 2024, and
// its 2:4 extension): weights shuffled offline into fragment order, one 16-byte load per lane per 4 MMAs,
// lop3 magic-number dequantisation, cp.async pipelines.
//
//   Y[M, N] = act(X[M, K] @ W^T + bias),  W = dequant(codes, scales) [N, K], 2:4 along K
//
// As in sparse24_gemm.cu, W is the MMA's A (sparse operand) and X the MMA's B: D = Y^T tiles.
//
// Global layouts (runtime/sparse_gemm.py prepares them; rows padded to a multiple of 128, K % 128 == 0):
//   x      : u16 [M, K] row-major (bf16 DT=0 / fp16 DT=1).
//   wq     : u32 [Npad/16][K/128][32 lanes][4 words]. Unit (mt, ku) = rows 16mt..+15, columns 128ku..+127
//            (kept values 64ku..+63). Word s (k32 step s, kept values 64ku+16s..+15) of lane l = 4g+t holds
//            8 INT4 codes in offset binary (code + 8) as nibbles n0..n7 (n0 lowest):
//              n0=(g,2t) n4=(g,2t+1) n1=(g+8,2t) n5=(g+8,2t+1) n2=(g,8+2t) n6=(g,9+2t) n3=(g+8,8+2t) n7=(g+8,9+2t)
//            (row within the block, kept column within the step), so the pair (n_r, n_r+4) is A register r.
//   wmeta  : u32 [Npad/16][K/64][32]: runtime/sparse_meta.reorder_meta_for_mma (k32 step s of a 64-column
//            block uses sparsity selector s % 2).
//   wscale : u16 [Npad/16][K/128][8 g][NG][2]: (scale of row g, scale of row g+8) for sub-group q of the
//            unit; NG = 128/G for G in {32, 64}, NG = 1 for G a multiple of 128 (k32 step s uses q = s*NG/4).
//            Scales are stored in the activation dtype.
//   y      : u16 [M, N] row-major.
//
// Two kernels:
//   w4a16_sparse24_prefill : CTA tile 128 features x BT tokens, 128-column k tiles through a STAGES-deep
//                            cp.async ring shared by the CTA (compute-bound, large M).
//   w4a16_sparse24_decode  : M <= 16 (NB = 1 or 2 n8 blocks). Memory-bound: CTA = 128 features x a K range
//                            (split-K over gridDim.y); 8 warps = 2 row halves x 4 K quarters, each warp
//                            streams its own weights through a private cp.async ring (no CTA barrier in the
//                            main loop), the X slice is staged once per CTA; partial sums are reduced in
//                            shared memory, then across the split through a fp32 workspace and a per-tile
//                            counter (the last CTA of a tile adds the splits' partials in split order, so
//                            the result does not depend on arrival order, applies the epilogue and resets
//                            the counter).

#include "sparse24_gemm_common.cuh"

// ------------------------------------------------------------------------------------------------------
// Prefill: CTA tile 128 output features x BT tokens; WR x WT warps; 128-column k tiles.
// Dynamic shared memory: max(STAGES * stage_bytes, BT * (128 + 8) * 2), stage_bytes =
// 8 * (512 + 256 + 32 * NG) + BT * 256.
// ------------------------------------------------------------------------------------------------------
template <int DT, int BT, int WR, int WT, int STAGES, int NG>
__global__ void __launch_bounds__(WR * WT * 32) w4a16_sparse24_prefill(
    const u16* __restrict__ x, const u32* __restrict__ wq, const u32* __restrict__ wmeta,
    const u16* __restrict__ wscale, const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K,
    int act) {
  using namespace sp24;
  constexpr int BR = 128;
  constexpr int NT = WR * WT * 32;
  constexpr int WM = BR / WR, WN = BT / WT;
  constexpr int MI = WM / 16, NI = WN / 8;
  constexpr int NBLK = BR / 16;
  constexpr int Q_BYTES = NBLK * 512;
  constexpr int E_BYTES = NBLK * 256;
  constexpr int S_UNIT = 32 * NG;
  constexpr int S_BYTES = NBLK * S_UNIT;
  constexpr int B_BYTES = BT * 256;
  constexpr int B_OFF = Q_BYTES + E_BYTES + S_BYTES;
  constexpr int STAGE_BYTES = B_OFF + B_BYTES;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of 16 x 8");
  static_assert(NG == 1 || NG == 2 || NG == 4, "NG");

  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wr = warp / WT, wt = warp % WT;
  int tx, ty;  // 1-D grid of ceil(N/128) x ceil(M/BT) tiles
  tile_coords(blockIdx.x, (N + BR - 1) / BR, (M + BT - 1) / BT, 8, tx, ty);
  const int n0 = tx * BR, m0 = ty * BT;
  const int KU = K >> 7;   // 128-column units
  const int KB = K >> 6;   // 64-column metadata blocks
  const int blk0 = n0 >> 4;
  const u32 sbase = smem_u32(smem);
  const unsigned char* s_bytes = reinterpret_cast<const unsigned char*>(wscale);

  auto load_stage = [&](int slot, int ku) {
    const u32 base = sbase + slot * STAGE_BYTES;
    copy_block_slabs<NBLK, 512, NT>(base, wq, blk0, KU, ku, tid);
    copy_block_slabs<NBLK, 256, NT, 128>(base + Q_BYTES, wmeta, blk0, KB, 2 * ku, tid);  // 2 metadata blocks
    cta_strided<NBLK * 2 * NG, NT>(tid, [&](int c) {
      const int b = c / (2 * NG), j = c % (2 * NG);
      cp_async16(base + Q_BYTES + E_BYTES + b * S_UNIT + j * 16,
                 s_bytes + ((size_t)(blk0 + b) * KU + ku) * S_UNIT + j * 16, true);
    });
    cta_strided<BT * 16, NT>(tid, [&](int c) {
      const int r = c >> 4, j = c & 15;
      const int m = m0 + r;
      const bool ok = m < M;
      const u16* src = x + (size_t)(ok ? m : 0) * K + ku * 128 + j * 8;
      cp_async16(base + B_OFF + r * 256 + ((j ^ (r & 7)) << 4), src, ok);
    });
  };

  float acc[MI][NI][4];
  zero_acc(acc);

  cta_ring_fill<STAGES>(KU, load_stage);
  const int g = lane >> 2;
  for (int ku = 0; ku < KU; ++ku) {
    cta_ring_advance<STAGES>(ku, KU, load_stage);
    const int slot = ku % STAGES;
    const unsigned char* st = smem + slot * STAGE_BYTES;
    const u32 sb = sbase + slot * STAGE_BYTES + B_OFF;
    uint4 q4[MI];
    u32 e[MI][2];
    u32 sc[MI][NG];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int b = wr * MI + mi;
      q4[mi] = *reinterpret_cast<const uint4*>(st + b * 512 + lane * 16);
      e[mi][0] = *reinterpret_cast<const u32*>(st + Q_BYTES + b * 256 + lane * 4);
      e[mi][1] = *reinterpret_cast<const u32*>(st + Q_BYTES + b * 256 + 128 + lane * 4);
      load_scales<NG>(st + Q_BYTES + E_BYTES + b * S_UNIT + g * 4 * NG, sc[mi]);
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      u32 bf[NI][4];
      ldsm_x_frags(bf, sb, 256, wt * WN, s * 4, lane);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const u32 word = s == 0 ? q4[mi].x : s == 1 ? q4[mi].y : s == 2 ? q4[mi].z : q4[mi].w;
        u32 a[4];
        dequant_word_scaled<DT>(word, sc[mi][(s * NG) / 4], a);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_sp_step<DT>(acc[mi][ni], a, bf[ni], e[mi][s >> 1], s);
      }
    }
  }
  cta_ring_drain();

  mma_tile_epilogue<DT, BR, BT, WR, WT>(acc, smem, tid, lane, wr, wt, bias, y, M, N, n0, m0, act);
}

// ------------------------------------------------------------------------------------------------------
// Decode: M <= NB * 8. 256 threads; CTA = 128 features (warp row wr = warp & 1 owns 64 of them = 4 blocks)
// x the 128-column units [ks0, ks1) of split blockIdx.y (ks0 = blockIdx.y * ksplit); warp quarter
// wq = warp >> 1 takes a quarter of those units. Dynamic shared memory:
//   max(ksplit * 256 * NB * 8  +  8 warps * STAGES * 4 * (768 + 128 * NG),  4 * NB * 8 * 132 * 4).
// ws: fp32 [gridDim.y][gridDim.x][NB*8][128] (only when gridDim.y > 1); counters: int [gridDim.x], zero
// before the first launch, left zero by every launch.
// ------------------------------------------------------------------------------------------------------
template <int DT, int NB, int NG, int STAGES>
__global__ void __launch_bounds__(256) w4a16_sparse24_decode(
    const u16* __restrict__ x, const u32* __restrict__ wq, const u32* __restrict__ wmeta,
    const u16* __restrict__ wscale, const float* __restrict__ bias, u16* __restrict__ y,
    float* __restrict__ ws, int* __restrict__ counters, int M, int N, int K, int ksplit, int act) {
  using namespace sp24;
  constexpr int RB = 4;                     // 16-row blocks per warp
  constexpr int NTOK = NB * 8;
  constexpr int U_Q = 32 * 16;              // per unit, per-lane-private: codes 16 B
  constexpr int U_E = 32 * 8;               // metadata 2 x 4 B
  constexpr int U_S = 32 * 4 * NG;          // scales 4*NG B
  constexpr int UNIT = U_Q + U_E + U_S;
  constexpr int SLOT = RB * UNIT;
  constexpr int RPAD = 132;                 // fp32 row stride of the reduction tile (128 + 4)

  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wr = warp & 1, wk = warp >> 1;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 128;
  const int KU = K >> 7, KB = K >> 6;
  const int ks0 = blockIdx.y * ksplit;
  const int ks1 = min(ks0 + ksplit, KU);
  const int nks = ks1 - ks0;
  const int w0 = ks0 + (nks * wk) / 4, w1 = ks0 + (nks * (wk + 1)) / 4;  // this warp's units
  const int XROW = ksplit * 256;            // bytes per staged token row
  const u32 sbase = smem_u32(smem);
  const u32 xs = sbase;                                          // X slice [NTOK][ksplit*128] u16, swizzled
  const u32 ring = sbase + NTOK * XROW + warp * STAGES * SLOT;   // this warp's ring
  const unsigned char* ring_p = smem + NTOK * XROW + warp * STAGES * SLOT;
  const unsigned char* q_bytes = reinterpret_cast<const unsigned char*>(wq);
  const unsigned char* e_bytes = reinterpret_cast<const unsigned char*>(wmeta);
  const unsigned char* s_bytes = reinterpret_cast<const unsigned char*>(wscale);
  const int blk0 = (n0 >> 4) + wr * RB;

  // X slice, once per CTA (rows >= M zero-filled).
  for (int c = tid; c < NTOK * nks * 16; c += 256) {
    const int r = c / (nks * 16), j = c % (nks * 16);
    const bool ok = r < M;
    const u16* src = x + (size_t)(ok ? r : 0) * K + ks0 * 128 + j * 8;
    cp_async16(xs + r * XROW + ((j ^ (r & 7)) << 4), src, ok);
  }
  cp_async_commit();

  // Each lane copies exactly the bytes it reads later: no intra-warp synchronisation needed.
  auto load_units = [&](int slot, int ku) {
    const u32 base = ring + slot * SLOT;
#pragma unroll
    for (int b = 0; b < RB; ++b) {
      const size_t blk = (size_t)(blk0 + b);
      const u32 ub = base + b * UNIT;
      cp_async16(ub + lane * 16, q_bytes + (blk * KU + ku) * 512 + lane * 16, true);
      cp_async_small<4>(ub + U_Q + lane * 4, e_bytes + (blk * KB + 2 * ku) * 128 + lane * 4);
      cp_async_small<4>(ub + U_Q + 128 + lane * 4, e_bytes + (blk * KB + 2 * ku + 1) * 128 + lane * 4);
      cp_async_small<4 * NG>(ub + U_Q + U_E + lane * 4 * NG, s_bytes + (blk * KU + ku) * (32 * NG) + g * 4 * NG);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (w0 + s < w1) load_units(s, w0 + s);
    cp_async_commit();
  }
  cp_async_wait<STAGES - 1>();  // the X slice (oldest group) has landed for this thread
  __syncthreads();              // ... and for every thread

  float acc[RB][NB][4];
  zero_acc(acc);

  for (int ku = w0; ku < w1; ++ku) {
    {
      const int nk = ku + STAGES - 1;
      if (nk < w1) load_units((nk - w0) % STAGES, nk);
      cp_async_commit();
    }
    cp_async_wait<STAGES - 1>();
    const unsigned char* st = ring_p + ((ku - w0) % STAGES) * SLOT;
    const int kl = ku - ks0;  // unit index within the staged X slice
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      u32 bf[NB][4];
      ldsm_x_frags(bf, xs, XROW, 0, kl * 16 + s * 4, lane);
#pragma unroll
      for (int b = 0; b < RB; ++b) {
        const unsigned char* ub = st + b * UNIT;
        const u32 word = *reinterpret_cast<const u32*>(ub + lane * 16 + s * 4);
        const u32 e = *reinterpret_cast<const u32*>(ub + U_Q + (s >> 1) * 128 + lane * 4);
        const u32 scw = *reinterpret_cast<const u32*>(ub + U_Q + U_E + lane * 4 * NG + ((s * NG) / 4) * 4);
        u32 a[4];
        dequant_word_scaled<DT>(word, scw, a);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) mma_sp_step<DT>(acc[b][nb], a, bf[nb], e, s);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // rings and X slice are dead: reuse shared memory for the reduction

  float* red = reinterpret_cast<float*>(smem);  // [4 quarters][NTOK][RPAD]
#pragma unroll
  for (int b = 0; b < RB; ++b)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int r = wr * 64 + b * 16 + g + 8 * (v >> 1);
        const int tok = nb * 8 + 2 * t + (v & 1);
        red[(wk * NTOK + tok) * RPAD + r] = acc[b][nb][v];
      }
  __syncthreads();

  constexpr int PER = NTOK * 128 / 256;  // outputs per thread
  float sum[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int o = tid + i * 256;
    const int tok = o >> 7, r = o & 127;
    sum[i] = red[(0 * NTOK + tok) * RPAD + r] + red[(1 * NTOK + tok) * RPAD + r] +
             red[(2 * NTOK + tok) * RPAD + r] + red[(3 * NTOK + tok) * RPAD + r];
  }

  if (gridDim.y > 1) {
    __shared__ int is_last;
    float* mine = ws + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * (NTOK * 128);
#pragma unroll
    for (int i = 0; i < PER; ++i) mine[tid + i * 256] = sum[i];
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(&counters[blockIdx.x], 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // Every split's partial in z order (this CTA's own too, from ws): the fp32 sum is then the same whichever
    // CTA arrives last, so the output is deterministic.
#pragma unroll
    for (int i = 0; i < PER; ++i) sum[i] = 0.0f;
    // Unrolled so that the loads of four splits are in flight together (a warp issues in order: rolled, each
    // split's adds would wait out one L2 round trip before the next split's loads); the adds stay in z order.
#pragma unroll 4
    for (int z = 0; z < (int)gridDim.y; ++z) {
      const float* part = ws + ((size_t)z * gridDim.x + blockIdx.x) * (NTOK * 128);
#pragma unroll
      for (int i = 0; i < PER; ++i) sum[i] += __ldcg(part + tid + i * 256);
    }
    if (tid == 0) counters[blockIdx.x] = 0;
  }

#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int o = tid + i * 256;
    const int tok = o >> 7, r = o & 127;
    const int n = n0 + r;
    if (tok < M && n < N) {
      const float bv = bias != nullptr ? bias[n] : 0.0f;
      y[(size_t)tok * N + n] = to_u16<DT>(activation(sum[i] + bv, act));
    }
  }
}
