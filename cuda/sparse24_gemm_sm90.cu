// 2:4 sparse GEMMs for Hopper (sm_90a): wgmma.mma_async.sp m64nNk32, warp-specialised, bf16/fp16 in, fp32
// accumulate, optional bias + activation. On Hopper the dense baseline (cuBLAS) runs on wgmma, so these are
// the kernels that have to beat it; cuda/sparse24_gemm.cu and cuda/w4a16_sparse24_gemm.cu (mma.sp) remain the
// small-M / pre-Hopper paths. Two kernels: sparse24_gemm_sm90 (bf16/fp16 kept values) and
// w4a16_sparse24_sm90 (2:4 + INT4 kept values dequantised in registers; see the end of the file).
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
// signalled on an mbarrier with cp.async.mbarrier.arrive.noinc), warpgroups 1 and 2 consume: each owns 64 of
// the CTA's 128 output features and all BT tokens (one m64nBTk32 wgmma per k32 step). Stage = [X tile: BT rows
// x 128 B in the 128-byte swizzle (16-byte chunk j of row r at (j ^ (r & 7)) * 16, 1024-byte aligned; the
// shared-memory matrix descriptor: K-major, SBO = 1024 B, swizzle mode 1)][A fragments 8 blocks x 1 KB]
// [metadata 8 x 128 B]. Empty barriers count the 256 consumer threads.
// Epilogue: accumulators -> bias/activation -> transposed tile in shared memory -> 16-byte stores of Y rows.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DEVI __device__ __forceinline__

namespace s90 {

DEVI u32 smem_u32(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

DEVI void cp_async16(u32 dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
DEVI void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

DEVI void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
DEVI void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred P;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n"
      "@!P bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
DEVI void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
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

DEVI float activation(float v, int act) {
  if (act == 1) return fmaxf(v, 0.0f);
  if (act == 2) return v / (1.0f + expf(-v));
  if (act == 3) return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
  return v;
}

// Grouped rasterisation of a 1-D grid (see cuda/sparse24_gemm.cu).
DEVI void tile_coords(int pid, int nx, int ny, int group, int& x, int& y) {
  const int per_group = group * nx;
  const int gid = pid / per_group;
  const int first_y = gid * group;
  const int gsize = min(ny - first_y, group);
  const int r = pid - gid * per_group;
  y = first_y + r % gsize;
  x = r / gsize;
}

// wgmma.mma_async.sp, A from registers, B from a descriptor, scale-d = 1 (accumulate), no negation, B not
// transposed. Operand lists generated (d has N/2 fp32 registers per thread).
template <int SEL>
DEVI void wgmma_sp_n128_bf16(float (&d)[64], const u32 (&a)[4], u64 desc_b, u32 e) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
      "}, {%64,%65,%66,%67}, %68, %69, %71, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "n"(1), "n"(SEL));
}

template <int SEL>
DEVI void wgmma_sp_n128_f16(float (&d)[64], const u32 (&a)[4], u64 desc_b, u32 e) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
      "}, {%64,%65,%66,%67}, %68, %69, %71, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "n"(1), "n"(SEL));
}

template <int SEL>
DEVI void wgmma_sp_n256_bf16(float (&d)[128], const u32 (&a)[4], u64 desc_b, u32 e) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %134, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.bf16.bf16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
      "}, {%128,%129,%130,%131}, %132, %133, %135, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "n"(1), "n"(SEL));
}

template <int SEL>
DEVI void wgmma_sp_n256_f16(float (&d)[128], const u32 (&a)[4], u64 desc_b, u32 e) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %134, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.f16.f16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
      "}, {%128,%129,%130,%131}, %132, %133, %135, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "n"(1), "n"(SEL));
}

template <int DT, int BT, int SEL>
DEVI void wgmma_sp(float (&d)[BT / 2], const u32 (&a)[4], u64 desc_b, u32 e) {
  if constexpr (BT == 128) {
    if constexpr (DT == 0) wgmma_sp_n128_bf16<SEL>(d, a, desc_b, e);
    else wgmma_sp_n128_f16<SEL>(d, a, desc_b, e);
  } else {
    if constexpr (DT == 0) wgmma_sp_n256_bf16<SEL>(d, a, desc_b, e);
    else wgmma_sp_n256_f16<SEL>(d, a, desc_b, e);
  }
}

// ---- INT4 dequantisation (same code and layout as cuda/w4a16_sparse24_gemm.cu; see its header) ----
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
DEVI u32 bfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
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
DEVI u32 lo_pair(u32 s) { return __byte_perm(s, s, 0x1010); }
DEVI u32 hi_pair(u32 s) { return __byte_perm(s, s, 0x3232); }

// Consumer epilogue shared by both kernels: accumulators of consumer warpgroup c (rows 64c..+63 of the
// 128-feature tile, warp wi = rows 16wi..+15 of those) -> bias/activation -> transposed tile in shared memory
// -> 16-byte stores of Y rows. Named barrier 1 spans the 256 consumer threads.
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
    const int n = n0 + r;
    const float bv = (bias != nullptr && n < N) ? bias[n] : 0.0f;
#pragma unroll
    for (int j = 0; j < BT / 8; ++j) {
      const int col = 8 * j + 2 * t;
      out[col * OUT_LD + r] = to_u16<DT>(activation(acc[4 * j + 2 * h] + bv, act));
      out[(col + 1) * OUT_LD + r] = to_u16<DT>(activation(acc[4 * j + 2 * h + 1] + bv, act));
    }
  }
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll 4
  for (int i = ct; i < BT * 16; i += 256) {
    const int tl = i >> 4, j = i & 15;
    const int m = m0 + tl, n = n0 + j * 8;
    if (m < M && n < N)
      *reinterpret_cast<uint4*>(y + (size_t)m * N + n) = *reinterpret_cast<const uint4*>(out + tl * OUT_LD + j * 8);
  }
}

}  // namespace s90

// Dynamic shared memory: 1024 (alignment) + STAGES * (BT * 128 + 9216) + STAGES * 16 bytes.
template <int DT, int BT, int STAGES>
__global__ void __launch_bounds__(384, 1) sparse24_gemm_sm90(
    const u16* __restrict__ x, const u16* __restrict__ wvals, const u32* __restrict__ wmeta,
    const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int act) {
  using namespace s90;
  static_assert(BT == 128 || BT == 256, "BT");
  constexpr int BR = 128;
  constexpr int B_BYTES = BT * 128;
  constexpr int A_OFF = B_BYTES;
  constexpr int E_OFF = B_BYTES + 8 * 1024;
  constexpr int STAGE_BYTES = E_OFF + 8 * 128;
  static_assert(STAGE_BYTES % 1024 == 0, "stages must stay 1024-byte aligned for the 128-byte swizzle");

  extern __shared__ unsigned char smem_raw[];
  const u32 raw = smem_u32(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const u32 bar_full = base + STAGES * STAGE_BYTES;
  const u32 bar_empty = bar_full + 8 * STAGES;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int lane = tid & 31;
  int tx, ty;  // 1-D grid of ceil(N/128) x ceil(M/BT) tiles
  tile_coords(blockIdx.x, (N + BR - 1) / BR, (M + BT - 1) / BT, 8, tx, ty);
  const int n0 = tx * BR;
  const int m0 = ty * BT;
  const int KT = K >> 6;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_full + 8 * s, 128);
      mbar_init(bar_empty + 8 * s, 256);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int ptid = tid;
    const unsigned char* wv_bytes = reinterpret_cast<const unsigned char*>(wvals);
    const unsigned char* wm_bytes = reinterpret_cast<const unsigned char*>(wmeta);
    const int blk0 = n0 >> 4;
    for (int kt = 0; kt < KT; ++kt) {
      const int slot = kt % STAGES;
      if (kt >= STAGES) mbar_wait(bar_empty + 8 * slot, ((kt / STAGES) - 1) & 1);
      const u32 st = base + slot * STAGE_BYTES;
#pragma unroll 4
      for (int c = ptid; c < BT * 8; c += 128) {
        const int r = c >> 3, j = c & 7;
        const int m = m0 + r;
        const bool ok = m < M;
        cp_async16(st + r * 128 + ((j ^ (r & 7)) << 4), x + (size_t)(ok ? m : 0) * K + kt * 64 + j * 8, ok);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = ptid + i * 128;  // 512 chunks: 8 blocks x 64
        const int b = c >> 6, j = c & 63;
        cp_async16(st + A_OFF + b * 1024 + j * 16, wv_bytes + ((size_t)(blk0 + b) * KT + kt) * 1024 + j * 16, true);
      }
      if (ptid < 64) {
        const int b = ptid >> 3, j = ptid & 7;
        cp_async16(st + E_OFF + b * 128 + j * 16, wm_bytes + ((size_t)(blk0 + b) * KT + kt) * 128 + j * 16, true);
      }
      cp_async_mbar_arrive(bar_full + 8 * slot);
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int c = wg - 1;              // rows 64c .. 64c+63 of the tile
  const int wi = (tid >> 5) & 3;     // warp in the warpgroup: rows 64c + 16wi .. +15
  const int blk = 4 * c + wi;        // 16-row block within the tile
  float acc[BT / 2];
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] = 0.0f;
  u32 a0[2][4], a1[2][4];

  auto step = [&](int kt, u32 (&a)[2][4], u32 (&other)[2][4]) {
    const int slot = kt % STAGES;
    mbar_wait(bar_full + 8 * slot, (kt / STAGES) & 1);
    fence_proxy_async();
    const unsigned char* st = smem + slot * STAGE_BYTES;
    const uint4 v0 = *reinterpret_cast<const uint4*>(st + A_OFF + blk * 1024 + lane * 16);
    const uint4 v1 = *reinterpret_cast<const uint4*>(st + A_OFF + blk * 1024 + 512 + lane * 16);
    const u32 e = *reinterpret_cast<const u32*>(st + E_OFF + blk * 128 + lane * 4);
    a[0][0] = v0.x; a[0][1] = v0.y; a[0][2] = v0.z; a[0][3] = v0.w;
    a[1][0] = v1.x; a[1][1] = v1.y; a[1][2] = v1.z; a[1][3] = v1.w;
    const u32 sb = base + slot * STAGE_BYTES;
    keep_f(acc);
    wgmma_fence();
    wgmma_sp<DT, BT, 0>(acc, a[0], desc_k_major_sw128(sb), e);
    wgmma_sp<DT, BT, 1>(acc, a[1], desc_k_major_sw128(sb + 64), e);
    wgmma_commit();
    wgmma_wait<1>();  // the previous step's wgmmas are done: its stage and registers are free
    keep_f(acc);
    keep_r(other);
    if (kt > 0) mbar_arrive(bar_empty + 8 * ((kt - 1) % STAGES));
  };

  for (int kt = 0; kt < KT; kt += 2) {
    step(kt, a0, a1);
    if (kt + 1 < KT) step(kt + 1, a1, a0);
  }
  wgmma_wait<0>();
  keep_f(acc);
  keep_r(a0);
  keep_r(a1);

  consumer_epilogue<DT, BT>(acc, smem, c, wi, lane, tid - 128, bias, y, M, N, n0, m0, act);
}

// ------------------------------------------------------------------------------------------------------
// W4A16 2:4 on wgmma.mma_async.sp (sm_90a): the prefill path of cuda/w4a16_sparse24_gemm.cu moved onto the
// Hopper tensor cores. Same global layouts (wq / wmeta / wscale, see that file's header); A is dequantised
// in registers by the consumers straight into the register-A operand (per warp the same 16x16 compressed
// fragment as mma.sp), B = X from 128-byte-swizzled shared memory. A stage holds a 128-column k tile:
// [X: two 64-column sub-tiles of BT rows x 128 B][codes 8 x 512 B][metadata 8 x 256 B][scales 8 x 32*NG B],
// padded to a multiple of 1024 bytes. Dynamic shared memory: 1024 + STAGES * stage + STAGES * 16.
// ------------------------------------------------------------------------------------------------------
template <int DT, int BT, int STAGES, int NG>
__global__ void __launch_bounds__(384, 1) w4a16_sparse24_sm90(
    const u16* __restrict__ x, const u32* __restrict__ wq, const u32* __restrict__ wmeta,
    const u16* __restrict__ wscale, const float* __restrict__ bias, u16* __restrict__ y, int M, int N, int K,
    int act) {
  using namespace s90;
  static_assert(BT == 128 || BT == 256, "BT");
  static_assert(NG == 1 || NG == 2, "NG");
  constexpr int BR = 128;
  constexpr int SUB = BT * 128;  // one 64-column X sub-tile
  constexpr int Q_OFF = 2 * SUB;
  constexpr int E_OFF = Q_OFF + 8 * 512;
  constexpr int S_OFF = E_OFF + 8 * 256;
  constexpr int S_UNIT = 32 * NG;
  constexpr int STAGE_BYTES = (S_OFF + 8 * S_UNIT + 1023) / 1024 * 1024;

  extern __shared__ unsigned char smem_raw[];
  const u32 raw = smem_u32(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const u32 bar_full = base + STAGES * STAGE_BYTES;
  const u32 bar_empty = bar_full + 8 * STAGES;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int lane = tid & 31;
  int tx, ty;  // 1-D grid of ceil(N/128) x ceil(M/BT) tiles
  tile_coords(blockIdx.x, (N + BR - 1) / BR, (M + BT - 1) / BT, 8, tx, ty);
  const int n0 = tx * BR;
  const int m0 = ty * BT;
  const int KU = K >> 7, KB = K >> 6;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_full + 8 * s, 128);
      mbar_init(bar_empty + 8 * s, 256);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int ptid = tid;
    const unsigned char* q_bytes = reinterpret_cast<const unsigned char*>(wq);
    const unsigned char* e_bytes = reinterpret_cast<const unsigned char*>(wmeta);
    const unsigned char* s_bytes = reinterpret_cast<const unsigned char*>(wscale);
    const int blk0 = n0 >> 4;
    for (int ku = 0; ku < KU; ++ku) {
      const int slot = ku % STAGES;
      if (ku >= STAGES) mbar_wait(bar_empty + 8 * slot, ((ku / STAGES) - 1) & 1);
      const u32 st = base + slot * STAGE_BYTES;
#pragma unroll 4
      for (int c = ptid; c < BT * 16; c += 128) {
        const int r = c >> 4, j = c & 15;
        const int h = j >> 3, jj = j & 7;
        const int m = m0 + r;
        const bool ok = m < M;
        cp_async16(st + h * SUB + r * 128 + ((jj ^ (r & 7)) << 4), x + (size_t)(ok ? m : 0) * K + ku * 128 + j * 8,
                   ok);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int c = ptid + i * 128;  // 256 chunks: 8 blocks x 32
        const int b = c >> 5, j = c & 31;
        cp_async16(st + Q_OFF + b * 512 + j * 16, q_bytes + ((size_t)(blk0 + b) * KU + ku) * 512 + j * 16, true);
      }
      {
        const int b = ptid >> 4, j = ptid & 15;  // 128 chunks: 8 blocks x 16
        cp_async16(st + E_OFF + b * 256 + j * 16, e_bytes + ((size_t)(blk0 + b) * KB + 2 * ku) * 128 + j * 16, true);
      }
      if (ptid < 16 * NG) {
        const int b = ptid / (2 * NG), j = ptid % (2 * NG);
        cp_async16(st + S_OFF + b * S_UNIT + j * 16, s_bytes + ((size_t)(blk0 + b) * KU + ku) * S_UNIT + j * 16, true);
      }
      cp_async_mbar_arrive(bar_full + 8 * slot);
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int c = wg - 1;
  const int wi = (tid >> 5) & 3;
  const int blk = 4 * c + wi;
  const int g = lane >> 2;
  float acc[BT / 2];
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] = 0.0f;
  u32 a0[4][4], a1[4][4];

  auto step = [&](int ku, u32 (&a)[4][4], u32 (&other)[4][4]) {
    const int slot = ku % STAGES;
    mbar_wait(bar_full + 8 * slot, (ku / STAGES) & 1);
    fence_proxy_async();
    const unsigned char* st = smem + slot * STAGE_BYTES;
    const uint4 q4 = *reinterpret_cast<const uint4*>(st + Q_OFF + blk * 512 + lane * 16);
    const u32 e0 = *reinterpret_cast<const u32*>(st + E_OFF + blk * 256 + lane * 4);
    const u32 e1 = *reinterpret_cast<const u32*>(st + E_OFF + blk * 256 + 128 + lane * 4);
    u32 sc[NG];
    if constexpr (NG == 1) {
      sc[0] = *reinterpret_cast<const u32*>(st + S_OFF + blk * S_UNIT + g * 4);
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(st + S_OFF + blk * S_UNIT + g * 8);
      sc[0] = v.x;
      sc[1] = v.y;
    }
    dequant_word<DT>(q4.x, lo_pair(sc[0]), hi_pair(sc[0]), a[0]);
    dequant_word<DT>(q4.y, lo_pair(sc[0]), hi_pair(sc[0]), a[1]);
    dequant_word<DT>(q4.z, lo_pair(sc[NG - 1]), hi_pair(sc[NG - 1]), a[2]);
    dequant_word<DT>(q4.w, lo_pair(sc[NG - 1]), hi_pair(sc[NG - 1]), a[3]);
    const u32 sb = base + slot * STAGE_BYTES;
    keep_f(acc);
    wgmma_fence();
    wgmma_sp<DT, BT, 0>(acc, a[0], desc_k_major_sw128(sb), e0);
    wgmma_sp<DT, BT, 1>(acc, a[1], desc_k_major_sw128(sb + 64), e0);
    wgmma_sp<DT, BT, 0>(acc, a[2], desc_k_major_sw128(sb + SUB), e1);
    wgmma_sp<DT, BT, 1>(acc, a[3], desc_k_major_sw128(sb + SUB + 64), e1);
    wgmma_commit();
    wgmma_wait<1>();
    keep_f(acc);
    keep_r(other);
    if (ku > 0) mbar_arrive(bar_empty + 8 * ((ku - 1) % STAGES));
  };

  for (int ku = 0; ku < KU; ku += 2) {
    step(ku, a0, a1);
    if (ku + 1 < KU) step(ku + 1, a1, a0);
  }
  wgmma_wait<0>();
  keep_f(acc);
  keep_r(a0);
  keep_r(a1);
  consumer_epilogue<DT, BT>(acc, smem, c, wi, lane, tid - 128, bias, y, M, N, n0, m0, act);
}
