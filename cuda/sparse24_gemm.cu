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

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DEVI __device__ __forceinline__

namespace s24 {

DEVI u32 smem_u32(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

// 16-byte cp.async, L2 only (.cg); zero-fills the destination when !valid (src-size 0).
DEVI void cp_async16(u32 dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
DEVI void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

DEVI void ldsm_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D += A(2:4, 16x32) * B(32x8); SEL = sparsity selector (which thread pair of each quad holds metadata).
template <int DT, int SEL>
DEVI void mma_sp(float (&c)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
  if constexpr (DT == 0) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
          "n"(SEL));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
          "n"(SEL));
  }
}

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

// Grouped rasterisation of a 1-D grid over nx weight tiles x ny token tiles: consecutive CTAs walk the
// weight tiles for a band of `group` token tiles, so the CTAs resident at once share both operands in L2.
DEVI void tile_coords(int pid, int nx, int ny, int group, int& x, int& y) {
  const int per_group = group * nx;
  const int gid = pid / per_group;
  const int first_y = gid * group;
  const int gsize = min(ny - first_y, group);
  const int r = pid - gid * per_group;
  y = first_y + r % gsize;
  x = r / gsize;
}

}  // namespace s24

// Dynamic shared memory: max(STAGES * stage_bytes, BT * (BR + 8) * 2) bytes (runtime/sparse_gemm.py).
template <int DT, int BR, int BT, int WR, int WT, int STAGES>
__global__ void __launch_bounds__(WR * WT * 32) sparse24_gemm(
    const u16* __restrict__ x, const u16* __restrict__ wvals, const u32* __restrict__ wmeta,
    const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int act) {
  using namespace s24;
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
  constexpr int OUT_LD = BR + 8;            // padded row (in u16) of the epilogue's transposed tile
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
  const unsigned char* wv_bytes = reinterpret_cast<const unsigned char*>(wvals);
  const unsigned char* wm_bytes = reinterpret_cast<const unsigned char*>(wmeta);
  const int blk0 = n0 >> 4;

  auto load_stage = [&](int slot, int kt) {
    const u32 base = sbase + slot * STAGE_BYTES;
#pragma unroll
    for (int i = 0; i < (NBLK * 64 + NT - 1) / NT; ++i) {
      const int c = tid + i * NT;
      if ((NBLK * 64) % NT == 0 || c < NBLK * 64) {
        const int b = c >> 6, j = c & 63;
        const unsigned char* src = wv_bytes + ((size_t)(blk0 + b) * KT + kt) * 1024 + j * 16;
        cp_async16(base + b * 1024 + j * 16, src, true);
      }
    }
#pragma unroll
    for (int i = 0; i < (NBLK * 8 + NT - 1) / NT; ++i) {
      const int c = tid + i * NT;
      if ((NBLK * 8) % NT == 0 || c < NBLK * 8) {
        const int b = c >> 3, j = c & 7;
        const unsigned char* src = wm_bytes + ((size_t)(blk0 + b) * KT + kt) * 128 + j * 16;
        cp_async16(base + A_BYTES + b * 128 + j * 16, src, true);
      }
    }
#pragma unroll
    for (int i = 0; i < (BT * 8 + NT - 1) / NT; ++i) {
      const int c = tid + i * NT;
      if ((BT * 8) % NT == 0 || c < BT * 8) {
        const int r = c >> 3, j = c & 7;
        const int m = m0 + r;
        const bool ok = m < M;
        const u16* src = x + (size_t)(ok ? m : 0) * K + kt * 64 + j * 8;
        cp_async16(base + A_BYTES + E_BYTES + r * 128 + ((j ^ (r & 7)) << 4), src, ok);
      }
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt visible to all; every warp is done with stage kt-1's slot
    {
      const int nk = kt + STAGES - 1;
      if (nk < KT) load_stage(nk % STAGES, nk);
      cp_async_commit();
    }
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
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int row = wt * WN + ni * 8 + (lane & 7);
        const int chunk = ks * 4 + (lane >> 3);
        ldsm_x4(b[ni], sb + row * 128 + ((chunk ^ (row & 7)) << 4));
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          if (ks == 0)
            mma_sp<DT, 0>(acc[mi][ni], a[mi], b[ni], e[mi]);
          else
            mma_sp<DT, 1>(acc[mi][ni], a[mi], b[ni], e[mi]);
        }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // all warps done with the ring: reuse it for the transposed output tile

  // Epilogue: bias + activation in fp32, round, write Y^T fragments as Y rows into shared memory.
  u16* out = reinterpret_cast<u16*>(smem);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wr * WM + mi * 16 + g + 8 * h;  // output feature within the tile
      const int n = n0 + r;
      const float bv = (bias != nullptr && n < N) ? bias[n] : 0.0f;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int c = wt * WN + ni * 8 + 2 * t;  // token within the tile
        out[c * OUT_LD + r] = to_u16<DT>(activation(acc[mi][ni][2 * h] + bv, act));
        out[(c + 1) * OUT_LD + r] = to_u16<DT>(activation(acc[mi][ni][2 * h + 1] + bv, act));
      }
    }
  }
  __syncthreads();
  constexpr int CPR = BR / 8;  // 16-byte chunks per output row
#pragma unroll
  for (int i = 0; i < (BT * CPR + NT - 1) / NT; ++i) {
    const int c = tid + i * NT;
    if ((BT * CPR) % NT == 0 || c < BT * CPR) {
      const int tl = c / CPR, j = c % CPR;
      const int m = m0 + tl, n = n0 + j * 8;
      if (m < M && n < N)
        *reinterpret_cast<uint4*>(y + (size_t)m * N + n) = *reinterpret_cast<const uint4*>(out + tl * OUT_LD + j * 8);
    }
  }
}
