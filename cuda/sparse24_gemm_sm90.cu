// 2:4 sparse GEMMs for Hopper (sm_90a): wgmma.mma_async.sp m64nNk32, warp-specialised, bf16/fp16 in, fp32
// accumulate, optional bias + activation. On Hopper the dense baseline (cuBLAS) runs on wgmma, so these are
// the kernels that have to beat it; cuda/sparse24_gemm.cu and cuda/w4a16_sparse24_gemm.cu (mma.sp) remain the
// small-M / pre-Hopper paths. Four kernels: sparse24_gemm_sm90 (bf16/fp16 kept values) and
// w4a16_sparse24_sm90 (2:4 + INT4 kept values dequantised in registers; see the end of the file), each also
// as *_tma, whose producer moves the stages with TMA instead of cp.async (same stages and consumers).
//
//   Y[M, N] = act(X[M, K] @ W^T + bias)     computed as  Y^T = W @ X^T  (W = the sparse A operand)
//
// Operands (same global layouts as cuda/sparse24_gemm.cu, prepared by runtime/sparse_gemm.py):
//   x     : u16 [M, K] row-major = wgmma's B (K x N "column-major" = K-major, no transpose).
//   wvals : u16 [Npad/16][K/64][2][32][8] = per warp the register A fragment of each k32 step (the PTX ISA
//           gives sparse wgmma's register-A layout per warp as that of mma.sp m16n8k32 / dense m16n8k16 on the
//           compressed 16x16 tile; CUTLASS names it ALayout_64x16). A comes from registers ("RS" form).
//   wmeta : u32 [Npad/16][K/64][32] = runtime/sparse_meta.reorder_meta_for_mma; warp w%4 of a warpgroup
//           supplies the metadata of rows 16(w%4)..+15 (PTX ISA, sparse wgmma metadata), k32 step s of a
//           64-column block uses sparsity selector s.
//
// CTA = 3 warpgroups (384 threads): warpgroup 0 is the producer (cp.async global -> shared, each stage
// signalled on an mbarrier with cp.async.mbarrier.arrive.noinc; in the *_tma kernels one thread's TMA and
// bulk copies completing an arrive.expect_tx), warpgroups 1 and 2 consume: each owns 64 of
// the CTA's 128 output features and all BT tokens (one m64nBTk32 wgmma per k32 step). Stage = [X tile: BT rows
// x 128 B in the 128-byte swizzle (16-byte chunk j of row r at (j ^ (r & 7)) * 16, 1024-byte aligned; the
// shared-memory matrix descriptor: K-major, SBO = 1024 B, swizzle mode 1)][A fragments 8 blocks x 1 KB]
// [metadata 8 x 128 B] for a 64-column k tile (SUBS = 2 doubles each part: 128-column k tiles, see the
// kernel). Empty barriers count the 256 consumer threads.
// Epilogue: accumulators -> bias/activation -> transposed tile in shared memory -> 16-byte stores of Y rows.

#include "sparse24_gemm_common.cuh"

// Bottleneck diagnosis (tools/diagnose_sm90.py builds the kernels again with -DSP24_DIAG=N; never set by the
// library, results are wrong on purpose): 1 = the producer loads only the first STAGES k tiles and then just
// signals the barriers (the MMA pipeline on shared-memory-resident operands; cp.async and TMA producers alike);
// 2 = the consumers wait, read their fragments and release the slots but issue no wgmma (the load pipeline
// alone).
#ifndef SP24_DIAG
#define SP24_DIAG 0
#endif

namespace s90 {

using namespace sp24;

DEVI void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// A barrier phase that never completes is a bug (a byte count that does not match the copies, a lost
// arrival): after 2^24 unsuccessful try_waits the kernel traps, so the launch fails with an error instead of
// hanging the GPU. Each try_wait may suspend the thread up to a system-dependent time limit, so the bound in
// seconds is not known (not measured yet); a legitimate wait here lasts microseconds. Kept inside one asm
// block: a C++ loop with a clock cost the 256-token consumers registers they do not have (spills).
// CLUSTER_SCOPE: acquire at cluster scope, pairing with the .release.cluster arrivals of the peer CTAs'
// consumers on a cluster kernel's empty barriers (the default try_wait acquires at CTA scope).
#define S90_MBAR_WAIT(SEM)                                   \
  asm volatile(                                              \
      "{\n.reg .pred P;\n.reg .u32 n;\nmov.u32 n, 0;\n"     \
      "WAIT:\n"                                              \
      "mbarrier.try_wait.parity" SEM ".shared::cta.b64 P, [%0], %1;\n" \
      "@P bra DONE;\n"                                       \
      "add.u32 n, n, 1;\n"                                   \
      "setp.lt.u32 P, n, 16777216;\n"                        \
      "@P bra WAIT;\n"                                       \
      "trap;\n"                                              \
      "DONE:\n}\n" ::"r"(bar),                               \
      "r"(parity)                                            \
      : "memory")
template <bool CLUSTER_SCOPE = false>
DEVI void mbar_wait(u32 bar, u32 parity) {
  if constexpr (CLUSTER_SCOPE)
    S90_MBAR_WAIT(".acquire.cluster");
  else
    S90_MBAR_WAIT("");
}
#undef S90_MBAR_WAIT
DEVI void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrive on `bar` and add `bytes` to the transaction count its phase waits for (the TMA producer).
DEVI void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// TMA: the box at (c0 = column, c1 = row) of the 2-D tensor map at generic address `tmap` into shared `dst`,
// completing `bytes` of `bar`'s transaction count (the whole box, out-of-bounds rows zero-filled, counts).
DEVI void tma_load_2d(u32 dst, u64 tmap, int c0, int c1, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// tma_load_2d delivered to every CTA of the cluster whose bit is set in `mask`: the box lands at shared offset
// `dst` of each of them and completes its bytes on each one's own barrier at offset `bar`.
DEVI void tma_load_2d_multicast(u32 dst, u64 tmap, int c0, int c1, u32 bar, unsigned short mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n"
      ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
}
DEVI u32 cluster_ctarank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster (barrier.cluster is .aligned: whole warps).
DEVI void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Arrive on the mbarrier at shared offset `bar` of cluster CTA `rank` (this CTA's own included).
DEVI void mbar_arrive_cluster(u32 bar, u32 rank) {
  asm volatile(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
// Bulk copy of `bytes` contiguous bytes (multiple of 16, both addresses 16-byte aligned) global -> shared.
DEVI void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// The tensor map was written to global memory by a host copy (generic proxy); TMA reads it through the
// tensormap proxy (PTX ISA, "Proxies" / fence.proxy.tensormap). System scope: the CUDA programming guide's
// example of a map modified by cudaMemcpy from the host uses .sys.
DEVI void tensormap_acquire(u64 tmap) {
  asm volatile("fence.proxy.tensormap::generic.acquire.sys [%0], 128;\n" ::"l"(tmap) : "memory");
}
// Arrive on `bar` once every cp.async this thread issued so far has landed (pending count not incremented).
DEVI void cp_async_mbar_arrive(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

DEVI void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DEVI void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
DEVI void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
DEVI void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int N>
DEVI void keep_f(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int S>
DEVI void keep_r(u32 (&a)[S][4]) {
#pragma unroll
  for (int i = 0; i < S; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address >> 4 in bits 0-13,
// leading byte offset >> 4 in 16-29 (unused for swizzled K-major layouts; 1 by convention), stride byte
// offset >> 4 in 32-45 (1024 B between 8-row groups), swizzle mode in 62-63 (1 = 128-byte swizzle).
DEVI u64 desc_k_major_sw128(u32 saddr) {
  u64 d = static_cast<u64>((saddr & 0x3FFFFu) >> 4);
  d |= static_cast<u64>(1) << 16;
  d |= static_cast<u64>(1024 >> 4) << 32;
  d |= static_cast<u64>(1) << 62;
  return d;
}

// ---- wgmma.mma_async.sp m64nNk32 (N = BT = 128 or 256), A from registers, B from a descriptor ----
// Operand numbering: the N/2 fp32 accumulators d[0..N/2) are %0..%(N/2-1) ("+f"), then a[0..3], desc_b, e,
// scale-d (1: accumulate) and the sparsity selector SEL. Scale-d goes through a predicate; immA... = 1, 1
// (no negation), tnspB = 0 (B is K-major).
#define S90_D8(I) \
  "+f"(d[I]), "+f"(d[I + 1]), "+f"(d[I + 2]), "+f"(d[I + 3]), "+f"(d[I + 4]), "+f"(d[I + 5]), "+f"(d[I + 6]), \
      "+f"(d[I + 7])
#define S90_D64(I) \
  S90_D8(I), S90_D8(I + 8), S90_D8(I + 16), S90_D8(I + 24), S90_D8(I + 32), S90_D8(I + 40), S90_D8(I + 48), \
      S90_D8(I + 56)
#define S90_D_N128 S90_D64(0)
#define S90_D_N256 S90_D64(0), S90_D64(64)
#define S90_R_N128                                                    \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"            \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"  \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"  \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define S90_R_N256                                                                \
  S90_R_N128 ","                                                                  \
  "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"              \
  "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"              \
  "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"  \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
// N: 128 | 256; T: "bf16" | "f16"; SCALE_D / REST: the operand numbers after the accumulators.
#define S90_WGMMA_SP(N, T, SCALE_D, REST)                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                              \
               "wgmma.mma_async.sp.sync.aligned.m64n" #N "k32.f32." T "." T " "                  \
               "{" S90_R_N##N "}, " REST ", p, 1, 1, 0;\n}\n"                                    \
               : S90_D_N##N                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "n"(1), "n"(SEL))
#define S90_WGMMA_SP_N128(T) S90_WGMMA_SP(128, T, "%70", "{%64,%65,%66,%67}, %68, %69, %71")
#define S90_WGMMA_SP_N256(T) S90_WGMMA_SP(256, T, "%134", "{%128,%129,%130,%131}, %132, %133, %135")

template <int DT, int BT, int SEL>
DEVI void wgmma_sp(float (&d)[BT / 2], const u32 (&a)[4], u64 desc_b, u32 e) {
  static_assert(BT == 128 || BT == 256, "BT");
  if constexpr (BT == 128) {
    if constexpr (DT == 0) S90_WGMMA_SP_N128("bf16");
    else S90_WGMMA_SP_N128("f16");
  } else {
    if constexpr (DT == 0) S90_WGMMA_SP_N256("bf16");
    else S90_WGMMA_SP_N256("f16");
  }
}

#undef S90_WGMMA_SP_N256
#undef S90_WGMMA_SP_N128
#undef S90_WGMMA_SP
#undef S90_R_N256
#undef S90_R_N128
#undef S90_D_N256
#undef S90_D_N128
#undef S90_D64
#undef S90_D8

// ---- the warp-specialised CTA shared by both kernels ----

// One CTA's tile and shared memory: STAGES stages of STAGE_BYTES from the first 1024-byte boundary of the
// dynamic shared memory (the 128-byte swizzle needs it), then STAGES full and STAGES empty mbarriers.
struct CtaTile {
  unsigned char* smem;  // first stage (generic address)
  u32 base;             // first stage (shared address)
  u32 bar_full, bar_empty;
  int n0, m0;           // first output feature and first token of the tile
  int wblk0;            // first 16-row weight block the producer loads (n0 / 16 except for a padding CTA)
  u32 rank;             // rank in the cluster (0 without one)
};

// Carve up shared memory, locate the tile (1-D grid of ceil(N/128) x ceil(M/BT) tiles) and initialise the
// barriers: full ones count the 128 producer threads' cp.async arrivals (FULL_COUNT = 1: the TMA producer's
// single arrive.expect_tx), empty ones the 256 consumer threads (CLUSTER > 1: one arrival per consumer warp
// of every CTA of the cluster, whose producers all write this CTA's stages).
// CLUSTER > 1 (the *_mc kernels): the CLUSTER consecutive CTAs of a cluster take consecutive weight tiles on the
// same tokens (tile_coords over clusters, then tx = CLUSTER * cluster's x + rank), so they can share the X
// boxes. When ceil(N/128) is not a multiple of CLUSTER, the last cluster's surplus CTAs run past the weight
// tiles: they load the last tile's weights (valid memory), take part in the X exchange and store nothing
// (every store checks n < N).
template <int BT, int STAGES, int STAGE_BYTES, int FULL_COUNT = 128, int CLUSTER = 1>
DEVI CtaTile cta_setup(unsigned char* smem_raw, int M, int N) {
  CtaTile t;
  const u32 raw = smem_u32(smem_raw);
  t.base = (raw + 1023u) & ~1023u;
  t.smem = smem_raw + (t.base - raw);
  t.bar_full = t.base + STAGES * STAGE_BYTES;
  t.bar_empty = t.bar_full + 8 * STAGES;
  const int nx = (N + 127) / 128, ny = (M + BT - 1) / BT;
  int tx, ty;
  if constexpr (CLUSTER == 1) {
    t.rank = 0;
    tile_coords(blockIdx.x, nx, ny, 8, tx, ty);
  } else {
    t.rank = cluster_ctarank();  // = blockIdx.x % CLUSTER for a 1-D grid of (CLUSTER, 1, 1) clusters
    tile_coords(blockIdx.x / CLUSTER, (nx + CLUSTER - 1) / CLUSTER, ny, 8, tx, ty);
    tx = tx * CLUSTER + (int)t.rank;
  }
  t.n0 = tx * 128;
  t.m0 = ty * BT;
  t.wblk0 = min(tx, nx - 1) * 8;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(t.bar_full + 8 * s, FULL_COUNT);
      mbar_init(t.bar_empty + 8 * s, CLUSTER == 1 ? 256 : 8 * CLUSTER);
    }
    if constexpr (FULL_COUNT == 1) {  // the initialised barriers must be visible to the TMA (async proxy) unit
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
      fence_proxy_async();
    }
  }
  if constexpr (CLUSTER == 1)
    __syncthreads();
  else
    cluster_sync();  // no peer may multicast into this CTA or arrive on its barriers before they are initialised
  return t;
}

// Producer warpgroup (threads 0..127): for every k tile, wait until the consumers have freed its slot, issue
// its copies with load(stage shared address, kt) and have the slot's full barrier count them when they land.
template <int STAGES, int STAGE_BYTES, class Load>
DEVI void producer(const CtaTile& t, int ktiles, Load&& load) {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
  for (int kt = 0; kt < ktiles; ++kt) {
    const int slot = kt % STAGES;
    if (kt >= STAGES) mbar_wait(t.bar_empty + 8 * slot, ((kt / STAGES) - 1) & 1);
    if (SP24_DIAG != 1 || kt < STAGES) load(t.base + slot * STAGE_BYTES, kt);
    cp_async_mbar_arrive(t.bar_full + 8 * slot);
  }
  cp_async_wait_all();
}

// TMA producer (warpgroup 0; thread 0 issues everything, its 127 companions only hand their registers over):
// for every k tile, wait until the consumers have freed its slot, announce the stage's tx_bytes on the slot's
// full barrier (count 1), then issue(stage shared address, kt, full barrier) starts the copies that deliver
// exactly those bytes.
// CLUSTER > 1: the peers' producers write into this CTA's stages and the peers' consumers arrive on its empty
// barriers, so after the last stage thread 0 waits until every stage has been released by every consumer of the
// cluster: the CTA (its shared memory and barriers) outlives the last access from a peer.
template <int STAGES, int STAGE_BYTES, int CLUSTER = 1, class Issue>
DEVI void tma_producer(const CtaTile& t, int ktiles, u32 tx_bytes, u64 xmap, Issue&& issue) {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
  if (threadIdx.x != 0) return;
  tensormap_acquire(xmap);
  const int loaded = SP24_DIAG == 1 ? min(ktiles, STAGES) : ktiles;  // diagnosis: only the first ring is loaded
  for (int kt = 0; kt < loaded; ++kt) {
    const int slot = kt % STAGES;
    if (kt >= STAGES) mbar_wait<(CLUSTER > 1)>(t.bar_empty + 8 * slot, ((kt / STAGES) - 1) & 1);
    const u32 full = t.bar_full + 8 * slot;
    mbar_arrive_expect_tx(full, tx_bytes);
    issue(t.base + slot * STAGE_BYTES, kt, full);
  }
  for (int kt = loaded; kt < ktiles; ++kt) {  // SP24_DIAG == 1 only: the operands stay those of the first ring
    const int slot = kt % STAGES;
    mbar_wait<(CLUSTER > 1)>(t.bar_empty + 8 * slot, ((kt / STAGES) - 1) & 1);
    mbar_arrive(t.bar_full + 8 * slot);
  }
  if constexpr (CLUSTER > 1) {
    for (int kt = ktiles; kt < ktiles + STAGES; ++kt)
      if (kt >= STAGES) mbar_wait<true>(t.bar_empty + 8 * (kt % STAGES), ((kt / STAGES) - 1) & 1);
  }
}

// TMA producer: the X tile of k tile kt (SUBS 64-column sub-tiles of BT rows x 128 B at st + h * BT * 128, the
// layout load_x_tile below writes, swizzled by the copy engine), completing on `full`. CLUSTER > 1: this CTA
// loads rows rank * BT / CLUSTER .. of each sub-tile and multicasts them to every CTA of the cluster.
template <int BT, int SUBS, int CLUSTER>
DEVI void tma_x_tile(u32 st, u64 xmap, int kt, const CtaTile& t, u32 full) {
  const int xrow = (int)t.rank * (BT / CLUSTER);
#pragma unroll
  for (int h = 0; h < SUBS; ++h) {
    const u32 dst = st + h * (BT * 128) + xrow * 128;
    const int col = (kt * SUBS + h) * 64;
    if constexpr (CLUSTER == 1)
      tma_load_2d(dst, xmap, col, t.m0, full);
    else
      tma_load_2d_multicast(dst, xmap, col, t.m0 + xrow, full, (1u << CLUSTER) - 1);
  }
}

// Producer: the X tile of a k tile (tokens m0.., columns k0 .. k0 + 64*SUBS - 1) as SUBS 64-column sub-tiles of
// BT rows x 128 B at st + h * BT * 128, in the 128-byte swizzle (16-byte chunk j of row r at (j ^ (r & 7)) * 16);
// rows >= M are zero-filled.
template <int BT, int SUBS>
DEVI void load_x_tile(u32 st, const u16* __restrict__ x, int m0, int M, int K, int k0, int ptid) {
  static_assert(SUBS == 1 || SUBS == 2, "SUBS");
#pragma unroll 4
  for (int c = ptid; c < BT * 8 * SUBS; c += 128) {
    const int r = SUBS == 1 ? c >> 3 : c >> 4, j = c & (8 * SUBS - 1);
    const int h = j >> 3, jj = j & 7;
    const int m = m0 + r;
    const bool ok = m < M;
    cp_async16(st + h * (BT * 128) + r * 128 + ((jj ^ (r & 7)) << 4), x + (size_t)(ok ? m : 0) * K + k0 + j * 8, ok);
  }
}

// Consumer epilogue: accumulators of consumer warpgroup c (rows 64c..+63 of the 128-feature tile, warp wi =
// rows 16wi..+15 of those) -> bias/activation -> transposed tile in shared memory -> 16-byte stores of Y rows.
// Named barrier 1 spans the 256 consumer threads.
template <int DT, int BT>
DEVI void consumer_epilogue(const float (&acc)[BT / 2], unsigned char* smem, int c, int wi, int lane, int ct,
                            const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int n0, int m0,
                            int act) {
  constexpr int OUT_LD = 128 + 8;
  asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both warpgroups' wgmmas have finished reading the ring
  u16* out = reinterpret_cast<u16*>(smem);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 64 * c + 16 * wi + g + 8 * h;
    const float bv = bias_at(bias, n0 + r, N);
#pragma unroll
    for (int j = 0; j < BT / 8; ++j)
      put_transposed_pair<DT, OUT_LD>(out, r, 8 * j + 2 * t, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], bv, act);
  }
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll 4
  for (int i = ct; i < BT * 16; i += 256) store_tile_chunk<OUT_LD>(y, out, i >> 4, i & 15, M, N, m0, n0);
}

// Consumer warpgroups 1 and 2 (threads 128..383): warpgroup c computes output features 64c..64c+63 of the
// tile for all BT tokens. Per k tile: wait for the stage, fill(stage, a, e) writes this warp's S k32 A
// fragments and S/2 metadata words, S wgmmas (k32 step s reads X sub-tile s/2 at column offset 32 (s%2),
// sparsity selector s % 2). Two register sets of A fragments alternate so that a tile's wgmmas run while
// the next tile's fragments are built; a stage is released once its wgmmas have completed. Then the epilogue.
// PROXY_FENCE: the stage was written by cp.async (generic proxy) and is read by wgmma (async proxy), which
// needs fence.proxy.async after the wait; TMA writes are already in the async proxy (no fence, as in CUTLASS's
// TMA mainloops).
// CLUSTER > 1: lane 0 of each warp releases a stage on the empty barrier of every CTA of the cluster (their
// producers all write this CTA's stages), the last stage too (the producers' final wait counts it).
template <int DT, int BT, int STAGES, int STAGE_BYTES, int S, bool PROXY_FENCE = true, int CLUSTER = 1,
          class Fill>
DEVI void consumer(const CtaTile& t, int ktiles, const float* __restrict__ bias, u16* __restrict__ y, int M,
                   int N, int act, Fill&& fill) {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x;
  float acc[BT / 2];
#pragma unroll
  // Zeroed through asm: with a plain `acc[i] = 0.0f` ptxas serialises every wgmma of the kernel ("C7515:
  // wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers"),
  // which removes the overlap of consecutive wgmmas; tests/test_kernel_build.py rejects that warning.
  for (int i = 0; i < BT / 2; ++i) asm volatile("mov.b32 %0, 0;\n" : "=f"(acc[i]));
  u32 a0[S][4], a1[S][4];

  auto release = [&](int slot) {
    const u32 bar = t.bar_empty + 8 * slot;
    if constexpr (CLUSTER == 1) {
      mbar_arrive(bar);
    } else {
      __syncwarp();  // every lane's reads of the stage (fragments; their wgmmas retired) precede the release
      if ((tid & 31) == 0) {
        // the peers first, this CTA's own barrier last: a peer's arrival for the slot's next use can then not
        // reach this CTA's barrier before this warp's arrival for the current use has reached the peer's
#pragma unroll
        for (int r = 1; r <= CLUSTER; ++r) mbar_arrive_cluster(bar, (t.rank + r) % CLUSTER);
      }
    }
  };

  auto step = [&](int kt, u32 (&a)[S][4], u32 (&other)[S][4]) {
    const int slot = kt % STAGES;
    mbar_wait(t.bar_full + 8 * slot, (kt / STAGES) & 1);
    if constexpr (PROXY_FENCE) fence_proxy_async();
    u32 e[S / 2];
    fill(t.smem + slot * STAGE_BYTES, a, e);
    const u32 sb = t.base + slot * STAGE_BYTES;
    keep_f(acc);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < (SP24_DIAG == 2 ? 0 : S); ++s) {
      const u64 desc = desc_k_major_sw128(sb + (s >> 1) * (BT * 128) + (s & 1) * 64);
      if (s & 1)
        wgmma_sp<DT, BT, 1>(acc, a[s], desc, e[s >> 1]);
      else
        wgmma_sp<DT, BT, 0>(acc, a[s], desc, e[s >> 1]);
    }
    wgmma_commit();
    wgmma_wait<1>();  // the previous step's wgmmas are done: its stage and registers are free
    keep_f(acc);
    keep_r(other);
    if (kt > 0) release((kt - 1) % STAGES);
  };

  for (int kt = 0; kt < ktiles; kt += 2) {
    step(kt, a0, a1);
    if (kt + 1 < ktiles) step(kt + 1, a1, a0);
  }
  wgmma_wait<0>();
  keep_f(acc);
  keep_r(a0);
  keep_r(a1);
  if constexpr (CLUSTER > 1) {
    if (ktiles > 0) release((ktiles - 1) % STAGES);  // the host guarantees K >= 64 (ktiles >= 1)
  }

  consumer_epilogue<DT, BT>(acc, t.smem, (tid >> 7) - 1, (tid >> 5) & 3, tid & 31, tid - 128, bias, y, M, N, t.n0,
                            t.m0, act);
}

}  // namespace s90

namespace s90 {

// Stage layout of the bf16/fp16 kernels: [X: SUBS sub-tiles of BT rows x 128 B][A fragments: 8 blocks x SUBS KB]
// [metadata: 8 blocks x SUBS * 128 B]; every offset a multiple of 1024 (the 128-byte swizzle's alignment).
template <int BT, int SUBS>
struct Sp24Stage {
  static_assert(BT == 128 || BT == 256, "BT");
  static_assert(SUBS == 1 || SUBS == 2, "SUBS");
  static constexpr int A_OFF = SUBS * BT * 128;
  static constexpr int A_SLAB = SUBS * 1024;  // one 16-row block's A fragments
  static constexpr int E_OFF = A_OFF + 8 * A_SLAB;
  static constexpr int E_SLAB = SUBS * 128;
  static constexpr int BYTES = E_OFF + 8 * E_SLAB;
  static_assert(BYTES % 1024 == 0, "stages must stay 1024-byte aligned for the 128-byte swizzle");
};

// Consumer warp's registers for one stage: A fragments of k32 steps s (64-column block s / 2, half s % 2) and
// the metadata word of each 64-column block, of 16-row block `blk`.
template <int BT, int SUBS>
DEVI void fill_sp24_fragments(const unsigned char* st, int blk, int lane, u32 (&a)[2 * SUBS][4], u32 (&e)[SUBS]) {
  using L = Sp24Stage<BT, SUBS>;
#pragma unroll
  for (int s = 0; s < 2 * SUBS; ++s) {
    const uint4 v = *reinterpret_cast<const uint4*>(st + L::A_OFF + blk * L::A_SLAB + s * 512 + lane * 16);
    a[s][0] = v.x; a[s][1] = v.y; a[s][2] = v.z; a[s][3] = v.w;
  }
#pragma unroll
  for (int h = 0; h < SUBS; ++h) e[h] = *reinterpret_cast<const u32*>(st + L::E_OFF + blk * L::E_SLAB + h * 128 + lane * 4);
}

}  // namespace s90

// A stage holds SUBS 64-column k blocks (SUBS = 1: the original 64-column k tile; 2: 128 columns, four wgmmas
// per stage and half the barrier round trips per FLOP, the stage shape of w4a16_sparse24_sm90 below):
// [X: SUBS sub-tiles of BT rows x 128 B][A fragments 8 blocks x SUBS KB][metadata 8 x SUBS * 128 B].
// Needs K % (64 * SUBS) == 0. Dynamic shared memory: 1024 (alignment) + STAGES * stage + STAGES * 16 bytes,
// stage = SUBS * (BT * 128 + 9216).
template <int DT, int BT, int STAGES, int SUBS = 1>
__global__ void __launch_bounds__(384, 1) sparse24_gemm_sm90(
    const u16* __restrict__ x, const u16* __restrict__ wvals, const u32* __restrict__ wmeta,
    const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int act) {
  using namespace s90;
  using L = Sp24Stage<BT, SUBS>;
  extern __shared__ unsigned char smem_raw[];
  const CtaTile t = cta_setup<BT, STAGES, L::BYTES>(smem_raw, M, N);
  const int tid = threadIdx.x;
  const int KB = K >> 6;        // 64-column blocks (the global A / metadata layouts' unit)
  const int KT = KB / SUBS;     // k tiles (stages' worth of columns)

  if ((tid >> 7) == 0) {
    const int blk0 = t.n0 >> 4;
    producer<STAGES, L::BYTES>(t, KT, [&](u32 st, int kt) {
      load_x_tile<BT, SUBS>(st, x, t.m0, M, K, kt * 64 * SUBS, tid);
      copy_block_slabs<8, L::A_SLAB, 128, 1024>(st + L::A_OFF, wvals, blk0, KB, SUBS * kt, tid);
      copy_block_slabs<8, L::E_SLAB, 128, 128>(st + L::E_OFF, wmeta, blk0, KB, SUBS * kt, tid);
    });
    return;
  }

  const int blk = 4 * ((tid >> 7) - 1) + ((tid >> 5) & 3);  // this warp's 16-row block within the tile
  consumer<DT, BT, STAGES, L::BYTES, 2 * SUBS>(t, KT, bias, y, M, N, act,
                                              [&](const unsigned char* st, u32 (&a)[2 * SUBS][4], u32 (&e)[SUBS]) {
    fill_sp24_fragments<BT, SUBS>(st, blk, tid & 31, a, e);
  });
}

// The same GEMM with a TMA producer: one thread of warpgroup 0 moves each stage with SUBS tensor-map loads of
// the X sub-tiles (cp.async.bulk.tensor, 128-byte swizzle done by the copy engine, rows >= M zero-filled) and
// 16 bulk copies of the A fragment and metadata slabs, all completing one arrive.expect_tx on the stage's full
// barrier. The cp.async producer above spends ~1 warp instruction per 16 bytes plus its address arithmetic
// (at M = 1, where its X copies are mostly zero-fills, sm90_128 still took ~1500 cycles a stage on the
// H200), which caps every stage; TMA issues a stage in ~20 instructions. Consumers, shared memory layout and
// epilogue are the cp.async kernel's (same stage bytes, so the same emulation covers both).
//   xmap: generic address of a 64-byte-aligned CUtensorMap in global memory for X [M, K] (runtime/tensor_map.py:
//         dims {K, M}, row stride 2K bytes, box {64, BT / CLUSTER}, 128-byte swizzle, zero out-of-bounds fill).
// CLUSTER = 2 (sparse24_gemm_sm90_tma_mc): the two CTAs of a cluster compute neighbouring weight tiles on the
// same tokens; each loads half of every X box (BT / 2 rows) and multicasts it to both, halving the X traffic
// from L2, the larger part of a stage (BT x 128 B per 64 columns against 9 KB of weights).
namespace s90 {

template <int DT, int BT, int STAGES, int SUBS, int CLUSTER>
DEVI void sparse24_tma_cta(const u64 xmap, const u16* __restrict__ wvals, const u32* __restrict__ wmeta,
                           const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int act) {
  using L = Sp24Stage<BT, SUBS>;  // L::BYTES is also what every stage's copies deliver to each CTA
  extern __shared__ unsigned char smem_raw[];
  const CtaTile t = cta_setup<BT, STAGES, L::BYTES, 1, CLUSTER>(smem_raw, M, N);
  const int tid = threadIdx.x;
  const int KB = K >> 6;
  const int KT = KB / SUBS;

  if ((tid >> 7) == 0) {
    const unsigned char* wv = reinterpret_cast<const unsigned char*>(wvals);
    const unsigned char* wm = reinterpret_cast<const unsigned char*>(wmeta);
    tma_producer<STAGES, L::BYTES, CLUSTER>(t, KT, L::BYTES, xmap, [&](u32 st, int kt, u32 full) {
      tma_x_tile<BT, SUBS, CLUSTER>(st, xmap, kt, t, full);
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const size_t unit = (size_t)(t.wblk0 + b) * KB + SUBS * kt;  // the stage's first 64-column block
        bulk_load(st + L::A_OFF + b * L::A_SLAB, wv + unit * 1024, L::A_SLAB, full);
        bulk_load(st + L::E_OFF + b * L::E_SLAB, wm + unit * 128, L::E_SLAB, full);
      }
    });
    return;
  }

  const int blk = 4 * ((tid >> 7) - 1) + ((tid >> 5) & 3);
  consumer<DT, BT, STAGES, L::BYTES, 2 * SUBS, false, CLUSTER>(
      t, KT, bias, y, M, N, act, [&](const unsigned char* st, u32 (&a)[2 * SUBS][4], u32 (&e)[SUBS]) {
        fill_sp24_fragments<BT, SUBS>(st, blk, tid & 31, a, e);
      });
}

}  // namespace s90

template <int DT, int BT, int STAGES, int SUBS>
__global__ void __launch_bounds__(384, 1) sparse24_gemm_sm90_tma(
    const u64 xmap, const u16* __restrict__ wvals, const u32* __restrict__ wmeta,
    const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int act) {
  s90::sparse24_tma_cta<DT, BT, STAGES, SUBS, 1>(xmap, wvals, wmeta, bias, y, M, N, K, act);
}

// Grid: 2 * ceil(ceil(N/128) / 2) * ceil(M/BT) CTAs (whole clusters).
template <int DT, int BT, int STAGES, int SUBS>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(384, 1) sparse24_gemm_sm90_tma_mc(
    const u64 xmap, const u16* __restrict__ wvals, const u32* __restrict__ wmeta,
    const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int act) {
  s90::sparse24_tma_cta<DT, BT, STAGES, SUBS, 2>(xmap, wvals, wmeta, bias, y, M, N, K, act);
}

// ------------------------------------------------------------------------------------------------------
// W4A16 2:4 on wgmma.mma_async.sp (sm_90a): the prefill path of cuda/w4a16_sparse24_gemm.cu moved onto the
// Hopper tensor cores. Same global layouts (wq / wmeta / wscale, see that file's header); A is dequantised
// in registers by the consumers straight into the register-A operand (per warp the same 16x16 compressed
// fragment as mma.sp), B = X from 128-byte-swizzled shared memory. A stage holds a 128-column k tile:
// [X: two 64-column sub-tiles of BT rows x 128 B][codes 8 x 512 B][metadata 8 x 256 B][scales 8 x 32*NG B],
// padded to a multiple of 1024 bytes. Dynamic shared memory: 1024 + STAGES * stage + STAGES * 16.
// ------------------------------------------------------------------------------------------------------
namespace s90 {

// W4A16 stage: [X: two 64-column sub-tiles of BT rows x 128 B][codes 8 x 512 B][metadata 8 x 256 B]
// [scales 8 x 32*NG B]; BYTES pads it to a multiple of 1024, COPIED is what its copies deliver.
template <int BT, int NG>
struct W4Stage {
  static_assert(BT == 128 || BT == 256, "BT");
  static_assert(NG == 1 || NG == 2, "NG");
  static constexpr int SUB = BT * 128;  // one 64-column X sub-tile
  static constexpr int Q_OFF = 2 * SUB;
  static constexpr int E_OFF = Q_OFF + 8 * 512;
  static constexpr int S_OFF = E_OFF + 8 * 256;
  static constexpr int S_UNIT = 32 * NG;
  static constexpr int COPIED = S_OFF + 8 * S_UNIT;
  static constexpr int BYTES = (COPIED + 1023) / 1024 * 1024;
};

// Consumer warp's registers for one W4A16 stage: the four k32 A fragments of 16-row block `blk` dequantised
// from its codes and scales, and its two metadata words.
template <int DT, int BT, int NG>
DEVI void fill_w4a16_fragments(const unsigned char* st, int blk, int lane, u32 (&a)[4][4], u32 (&e)[2]) {
  using L = W4Stage<BT, NG>;
  const uint4 q4 = *reinterpret_cast<const uint4*>(st + L::Q_OFF + blk * 512 + lane * 16);
  e[0] = *reinterpret_cast<const u32*>(st + L::E_OFF + blk * 256 + lane * 4);
  e[1] = *reinterpret_cast<const u32*>(st + L::E_OFF + blk * 256 + 128 + lane * 4);
  u32 sc[NG];
  load_scales<NG>(st + L::S_OFF + blk * L::S_UNIT + (lane >> 2) * 4 * NG, sc);
  dequant_word_scaled<DT>(q4.x, sc[0], a[0]);
  dequant_word_scaled<DT>(q4.y, sc[0], a[1]);
  dequant_word_scaled<DT>(q4.z, sc[NG - 1], a[2]);
  dequant_word_scaled<DT>(q4.w, sc[NG - 1], a[3]);
}

}  // namespace s90

template <int DT, int BT, int STAGES, int NG>
__global__ void __launch_bounds__(384, 1) w4a16_sparse24_sm90(
    const u16* __restrict__ x, const u32* __restrict__ wq, const u32* __restrict__ wmeta,
    const u16* __restrict__ wscale, const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K,
    int act) {
  using namespace s90;
  using L = W4Stage<BT, NG>;
  extern __shared__ unsigned char smem_raw[];
  const CtaTile t = cta_setup<BT, STAGES, L::BYTES>(smem_raw, M, N);
  const int tid = threadIdx.x;
  const int KU = K >> 7, KB = K >> 6;

  if ((tid >> 7) == 0) {
    const int blk0 = t.n0 >> 4;
    producer<STAGES, L::BYTES>(t, KU, [&](u32 st, int ku) {
      load_x_tile<BT, 2>(st, x, t.m0, M, K, ku * 128, tid);
      copy_block_slabs<8, 512, 128>(st + L::Q_OFF, wq, blk0, KU, ku, tid);
      copy_block_slabs<8, 256, 128, 128>(st + L::E_OFF, wmeta, blk0, KB, 2 * ku, tid);  // 2 metadata blocks
      copy_block_slabs<8, L::S_UNIT, 128>(st + L::S_OFF, wscale, blk0, KU, ku, tid);
    });
    return;
  }

  const int blk = 4 * ((tid >> 7) - 1) + ((tid >> 5) & 3);  // this warp's 16-row block within the tile
  consumer<DT, BT, STAGES, L::BYTES, 4>(t, KU, bias, y, M, N, act,
                                       [&](const unsigned char* st, u32 (&a)[4][4], u32 (&e)[2]) {
    fill_w4a16_fragments<DT, BT, NG>(st, blk, tid & 31, a, e);
  });
}

// The W4A16 kernel with the TMA producer of sparse24_gemm_sm90_tma: per 128-column stage two tensor-map boxes
// of X and per 16-row block bulk copies of its codes (512 B), metadata (256 B) and scales (32*NG B).
// CLUSTER = 2 (w4a16_sparse24_sm90_tma_mc): X boxes shared by the cluster's two CTAs as in
// sparse24_gemm_sm90_tma_mc (here X is 32 KB of a 38 KB stage at BT = 128).
namespace s90 {

template <int DT, int BT, int STAGES, int NG, int CLUSTER>
DEVI void w4a16_tma_cta(const u64 xmap, const u32* __restrict__ wq, const u32* __restrict__ wmeta,
                        const u16* __restrict__ wscale, const float* __restrict__ bias, u16* __restrict__ y, int M,
                        int N, int K, int act) {
  using L = W4Stage<BT, NG>;  // two 64-column X sub-tiles of L::SUB = BT * 128 bytes, as tma_x_tile writes them
  extern __shared__ unsigned char smem_raw[];
  const CtaTile t = cta_setup<BT, STAGES, L::BYTES, 1, CLUSTER>(smem_raw, M, N);
  const int tid = threadIdx.x;
  const int KU = K >> 7, KB = K >> 6;

  if ((tid >> 7) == 0) {
    const unsigned char* q = reinterpret_cast<const unsigned char*>(wq);
    const unsigned char* e = reinterpret_cast<const unsigned char*>(wmeta);
    const unsigned char* sc = reinterpret_cast<const unsigned char*>(wscale);
    tma_producer<STAGES, L::BYTES, CLUSTER>(t, KU, L::COPIED, xmap, [&](u32 st, int ku, u32 full) {
      tma_x_tile<BT, 2, CLUSTER>(st, xmap, ku, t, full);
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const size_t blk = (size_t)(t.wblk0 + b);
        bulk_load(st + L::Q_OFF + b * 512, q + (blk * KU + ku) * 512, 512, full);
        bulk_load(st + L::E_OFF + b * 256, e + (blk * KB + 2 * ku) * 128, 256, full);
        bulk_load(st + L::S_OFF + b * L::S_UNIT, sc + (blk * KU + ku) * L::S_UNIT, L::S_UNIT, full);
      }
    });
    return;
  }

  const int blk = 4 * ((tid >> 7) - 1) + ((tid >> 5) & 3);
  consumer<DT, BT, STAGES, L::BYTES, 4, false, CLUSTER>(t, KU, bias, y, M, N, act,
                                                        [&](const unsigned char* st, u32 (&a)[4][4], u32 (&e)[2]) {
    fill_w4a16_fragments<DT, BT, NG>(st, blk, tid & 31, a, e);
  });
}

}  // namespace s90

template <int DT, int BT, int STAGES, int NG>
__global__ void __launch_bounds__(384, 1) w4a16_sparse24_sm90_tma(
    const u64 xmap, const u32* __restrict__ wq, const u32* __restrict__ wmeta,
    const u16* __restrict__ wscale, const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K,
    int act) {
  s90::w4a16_tma_cta<DT, BT, STAGES, NG, 1>(xmap, wq, wmeta, wscale, bias, y, M, N, K, act);
}

// Grid: 2 * ceil(ceil(N/128) / 2) * ceil(M/BT) CTAs (whole clusters).
template <int DT, int BT, int STAGES, int NG>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(384, 1) w4a16_sparse24_sm90_tma_mc(
    const u64 xmap, const u32* __restrict__ wq, const u32* __restrict__ wmeta,
    const u16* __restrict__ wscale, const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K,
    int act) {
  s90::w4a16_tma_cta<DT, BT, STAGES, NG, 2>(xmap, wq, wmeta, wscale, bias, y, M, N, K, act);
}
