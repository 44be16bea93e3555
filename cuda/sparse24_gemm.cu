// 2:4 sparse GEMM on the sparse tensor cores (mma.sp::ordered_metadata m16n8k32), sm_80 and newer.
//
//   Y[M, N] = act(X[M, K] @ W^T + bias),   W [N, K] 2:4 along K (N = out_features, K = in_features)
//
// The sparse operand of mma.sp must be the MMA's A, so the kernel computes the transposed product
// Y^T[N, M] = W[N, K] @ X^T[K, M]: W is the MMA's A (rows = output features, "row" layout, 2:4 along K),
// X is the MMA's B ("col" layout = X row-major [M, K], K contiguous), the accumulator tile is D = Y^T and
// the epilogue transposes it through shared memory so that Y [M, N] is written row-major with 16-byte
// stores. Inputs bf16 or fp16 (DT = 0 / 1), fp32 accumulation, bias fp32 [N], activation applied in fp32.
//
// Global layouts (prepared once per weight by runtime/sparse_gemm.py, rows padded to a multiple of 128):
//   x     : u16 [M, K] row-major, 16-byte aligned rows (K % 64 == 0).
//   wvals : u16 [Npad/16][K/64][2][32][8]: block (mt, kb) = rows 16mt..16mt+15, columns 64kb..64kb+63; for
//           k32 step s (columns 64kb+32s..+31, kept values 32kb+16s..+15) lane l = 4g+t holds the mma.sp A
//           fragment {a0..a7} = kept values (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1) (g,8+2t) (g,9+2t)
//           (g+8,8+2t) (g+8,9+2t) of that 16x16 compressed tile (PTX ISA: sparse m16n8k32 A fragment =
//           the dense m16n8k16 A layout applied to the compressed tile). One 16-byte load per lane.
//   wmeta : u32 [Npad/16][K/64][32]: runtime/sparse_meta.reorder_meta_for_mma, lane l's metadata word for
//           the block; k32 step s uses it with sparsity selector s (threads 4g+2s, 4g+2s+1 supply it).
//   y     : u16 [M, N] row-major (N % 8 == 0).
//
// Pipeline: STAGES-deep cp.async ring (global -> shared), one __syncthreads per 64-column k tile.
// Shared stage = [A values BR/16 x 1 KB][metadata BR/16 x 128 B][X tile BT rows x 128 B, 16-byte chunks
// XOR-swizzled by (row & 7) so ldmatrix reads of 8 rows hit 8 different bank groups].
// CTA tile: BR output features x BT tokens; WR x WT warps, warp tile (BR/WR) x (BT/WT).

#include "sparse24_gemm_common.cuh"

// Dynamic shared memory: max(STAGES * stage_bytes, BT * (BR + 8) * 2) bytes (runtime/sparse_gemm.py).
template <int DT, int BR, int BT, int WR, int WT, int STAGES>
__global__ void __launch_bounds__(WR * WT * 32) sparse24_gemm(
    const u16* __restrict__ x, const u16* __restrict__ wvals, const u32* __restrict__ wmeta,
    const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int act) {
  using namespace sp24;
  constexpr int NT = WR * WT * 32;
  constexpr int WM = BR / WR;  // warp tile: output features
  constexpr int WN = BT / WT;  // warp tile: tokens
  constexpr int MI = WM / 16;
  constexpr int NI = WN / 8;
  constexpr int NBLK = BR / 16;             // 16-row weight blocks per CTA tile
  constexpr int A_BYTES = NBLK * 1024;      // 2 k32 steps x 32 lanes x 16 B per block
  constexpr int E_BYTES = NBLK * 128;       // 32 lanes x 4 B per block
  constexpr int B_BYTES = BT * 128;         // BT rows x 64 columns x 2 B
  constexpr int STAGE_BYTES = A_BYTES + E_BYTES + B_BYTES;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of 16 x 8");

  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wr = warp / WT;
  const int wt = warp % WT;
  int tx, ty;  // 1-D grid of ceil(N/BR) x ceil(M/BT) tiles
  tile_coords(blockIdx.x, (N + BR - 1) / BR, (M + BT - 1) / BT, 8, tx, ty);
  const int n0 = tx * BR;  // first output feature (weight row) of this tile
  const int m0 = ty * BT;  // first token
  const int KT = K >> 6;
  const u32 sbase = smem_u32(smem);
  const int blk0 = n0 >> 4;

  auto load_stage = [&](int slot, int kt) {
    const u32 base = sbase + slot * STAGE_BYTES;
    copy_block_slabs<NBLK, 1024, NT>(base, wvals, blk0, KT, kt, tid);
    copy_block_slabs<NBLK, 128, NT>(base + A_BYTES, wmeta, blk0, KT, kt, tid);
    cta_strided<BT * 8, NT>(tid, [&](int c) {
      const int r = c >> 3, j = c & 7;
      const int m = m0 + r;
      const bool ok = m < M;
      const u16* src = x + (size_t)(ok ? m : 0) * K + kt * 64 + j * 8;
      cp_async16(base + A_BYTES + E_BYTES + r * 128 + ((j ^ (r & 7)) << 4), src, ok);
    });
  };

  float acc[MI][NI][4];
  zero_acc(acc);

  cta_ring_fill<STAGES>(KT, load_stage);
  for (int kt = 0; kt < KT; ++kt) {
    cta_ring_advance<STAGES>(kt, KT, load_stage);
    const int slot = kt % STAGES;
    const unsigned char* st = smem + slot * STAGE_BYTES;
    const u32 sb = sbase + slot * STAGE_BYTES + A_BYTES + E_BYTES;
    u32 e[MI];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
      e[mi] = *reinterpret_cast<const u32*>(st + A_BYTES + (wr * MI + mi) * 128 + lane * 4);
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      u32 a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const uint4 v = *reinterpret_cast<const uint4*>(st + (wr * MI + mi) * 1024 + ks * 512 + lane * 16);
        a[mi][0] = v.x;
        a[mi][1] = v.y;
        a[mi][2] = v.z;
        a[mi][3] = v.w;
      }
      u32 b[NI][4];
      ldsm_x_frags(b, sb, 128, wt * WN, ks * 4, lane);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_sp_step<DT>(acc[mi][ni], a[mi], b[ni], e[mi], ks);
    }
  }
  cta_ring_drain();  // the ring's shared memory now holds the transposed output tile

  mma_tile_epilogue<DT, BR, BT, WR, WT>(acc, smem, tid, lane, wr, wt, bias, y, M, N, n0, m0, act);
}
