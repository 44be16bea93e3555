// 2:4 prune-and-compress by magnitude along K, straight into the sparse GEMM's operand layout, and its inverse.
//
// Layouts (runtime/sparse_meta.py is the contract; runtime/kernels.py launches these):
//   dense  [M, K]        row-major, 16-bit (bf16/fp16 bit patterns: T = unsigned short) or 32-bit floats
//                        (T = unsigned int); M % 16 == 0, K % 64 == 0, 16-byte aligned base.
//   values [M, K/2]      the two kept entries of every 4-column chunk, in increasing column order; or, with
//                        FRAG, the same values in sparse24_gemm.cu's A-fragment order (see prune24_compress).
//   meta   [M/16, K/64, 32] uint32: block (mt, kb) word `lane` (g = lane>>2, s = lane&3) holds the chunks of
//                        columns 64kb+16s .. +15 of row 16mt+g in bits [15:0] and of row 16mt+g+8 in bits
//                        [31:16]; chunk j of the 16 columns at bits 4j..4j+3, first index in the low 2 bits.
//                        Each lane writes exactly the word that lane passes to mma.sp.
//
// Selection: the two largest |w| of each chunk, ties to the lower column (the order of runtime/nm_mask.py).
// |w| is compared on the bit pattern with the sign cleared, which orders IEEE values by magnitude (NaN aside).
//
// One warp per metadata block: 32 lanes x (2 rows x 16 columns). Self-contained: no CUDA headers (NVRTC only).

typedef unsigned int u32;
typedef unsigned short u16;

template <typename T> struct Elem;

template <> struct Elem<u16> {
  static constexpr int WORDS_PER_16 = 8;  // 16 elements = 8 words = 2 x uint4
  __device__ __forceinline__ static u32 get(const u32* w, int i) { return (w[i >> 1] >> ((i & 1) * 16)) & 0xffffu; }
  __device__ __forceinline__ static void put(u32* w, int i, u32 v) {
    w[i >> 1] = (i & 1) ? ((w[i >> 1] & 0x0000ffffu) | (v << 16)) : ((w[i >> 1] & 0xffff0000u) | v);
  }
  __device__ __forceinline__ static u32 mag(u32 bits) { return bits & 0x7fffu; }
};

template <> struct Elem<u32> {
  static constexpr int WORDS_PER_16 = 16;  // 16 elements = 16 words = 4 x uint4
  __device__ __forceinline__ static u32 get(const u32* w, int i) { return w[i]; }
  __device__ __forceinline__ static void put(u32* w, int i, u32 v) { w[i] = v; }
  __device__ __forceinline__ static u32 mag(u32 bits) { return bits & 0x7fffffffu; }
};

// Indices (i0 < i1) of the two largest magnitudes among m[0..3]; ties keep the lower index.
__device__ __forceinline__ void top2_of_4(const u32 m[4], int& i0, int& i1) {
  u32 keep = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int rank = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j != i) rank += (m[j] > m[i]) || (m[j] == m[i] && j < i);
    }
    keep |= (rank < 2 ? 1u : 0u) << i;
  }
  i0 = __ffs(keep) - 1;
  i1 = 31 - __clz(keep);
}

// The metadata block (mt, kb) of this warp (one warp per block, blocks in row-major order over
// [rows/16, cols/64]) and this lane's place in it: rows 16mt+g and 16mt+g+8, columns col0 .. col0+15.
struct MetaBlock {
  long long block, mt;
  int kb, lane, g, s, col0;
};

// False when the warp has no block (the grid is rounded up to whole CTAs).
__device__ __forceinline__ bool meta_block(int rows, int cols, MetaBlock& b) {
  b.lane = threadIdx.x & 31;
  b.block = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int kblocks = cols >> 6;
  if (b.block >= (long long)(rows >> 4) * kblocks) return false;
  b.mt = b.block / kblocks;
  b.kb = (int)(b.block % kblocks);
  b.g = b.lane >> 2;
  b.s = b.lane & 3;
  b.col0 = b.kb * 64 + b.s * 16;
  return true;
}

// FRAG = false: values [M, K/2] row-major (K order). FRAG = true (16-bit T only): values in the sparse GEMM's
// mma.sp A-fragment order [M/16, K/64, 2, 32, 8] (runtime/sparse_gemm.values_to_fragments): element
// [mt, kb, s, 4g+t, 4hk+2hr+p] = kept value (row 16mt+g+8hr, kept column 32kb+16s+8hk+2t+p). This lane's chunk
// 4s'+j of the block is kept columns 8s'+2j, +1, i.e. s = s'>>1, hk = s'&1, t = j: one 32-bit store per pair.
template <typename T, bool FRAG>
__global__ void __launch_bounds__(128) prune24_compress(const T* __restrict__ dense, T* __restrict__ values,
                                                        u32* __restrict__ meta, int rows, int cols) {
  static_assert(!FRAG || sizeof(T) == 2, "fragment order is defined for 16-bit values");
  constexpr int W = Elem<T>::WORDS_PER_16;
  MetaBlock mb;
  if (!meta_block(rows, cols, mb)) return;
  const long long block = mb.block, mt = mb.mt;
  const int lane = mb.lane, g = mb.g, s = mb.s, col0 = mb.col0;
  u32 word = 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long long row = mt * 16 + h * 8 + g;
    u32 in[W];
    const uint4* src = reinterpret_cast<const uint4*>(dense + row * cols + col0);
#pragma unroll
    for (int v = 0; v < W / 4; ++v) {
      const uint4 q = __ldg(src + v);
      in[4 * v] = q.x; in[4 * v + 1] = q.y; in[4 * v + 2] = q.z; in[4 * v + 3] = q.w;
    }
    u32 out[W / 2];
#pragma unroll
    for (int v = 0; v < W / 2; ++v) out[v] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      u32 m[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) m[i] = Elem<T>::mag(Elem<T>::get(in, 4 * j + i));
      int i0, i1;
      top2_of_4(m, i0, i1);
      // Select without indexing registers by a run-time value: compare against each candidate column.
      u32 v0 = 0, v1 = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u32 x = Elem<T>::get(in, 4 * j + i);
        v0 = (i == i0) ? x : v0;
        v1 = (i == i1) ? x : v1;
      }
      Elem<T>::put(out, 2 * j, v0);
      Elem<T>::put(out, 2 * j + 1, v1);
      word |= (u32)(i0 | (i1 << 2)) << (16 * h + 4 * j);
    }
    if constexpr (FRAG) {
      // out[j] holds the pair of chunk j (16-bit values, first in the low half).
      u32* frag = reinterpret_cast<u32*>(values) + (block * 2 + (s >> 1)) * 128;  // 32 lanes x 8 values / 2
#pragma unroll
      for (int j = 0; j < 4; ++j) frag[(4 * g + j) * 4 + 2 * (s & 1) + h] = out[j];
    } else {
      uint4* dst = reinterpret_cast<uint4*>(values + row * (cols >> 1) + (col0 >> 1));
#pragma unroll
      for (int v = 0; v < W / 8; ++v) dst[v] = make_uint4(out[4 * v], out[4 * v + 1], out[4 * v + 2], out[4 * v + 3]);
    }
  }
  meta[block * 32 + lane] = word;
}

template <typename T>
__global__ void __launch_bounds__(128) prune24_decompress(const T* __restrict__ values, const u32* __restrict__ meta,
                                                          T* __restrict__ dense, int rows, int cols) {
  constexpr int W = Elem<T>::WORDS_PER_16;
  MetaBlock mb;
  if (!meta_block(rows, cols, mb)) return;
  const long long block = mb.block, mt = mb.mt;
  const int lane = mb.lane, g = mb.g, col0 = mb.col0;
  const u32 word = __ldg(meta + block * 32 + lane);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long long row = mt * 16 + h * 8 + g;
    u32 kept[W / 2];
    const uint4* src = reinterpret_cast<const uint4*>(values + row * (cols >> 1) + (col0 >> 1));
#pragma unroll
    for (int v = 0; v < W / 8; ++v) {
      const uint4 q = __ldg(src + v);
      kept[4 * v] = q.x; kept[4 * v + 1] = q.y; kept[4 * v + 2] = q.z; kept[4 * v + 3] = q.w;
    }
    u32 out[W];
#pragma unroll
    for (int v = 0; v < W; ++v) out[v] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const u32 nib = (word >> (16 * h + 4 * j)) & 0xfu;
      const u32 i0 = nib & 3u, i1 = nib >> 2;
      const u32 v0 = Elem<T>::get(kept, 2 * j), v1 = Elem<T>::get(kept, 2 * j + 1);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u32 x = (i == (int)i0) ? v0 : ((i == (int)i1) ? v1 : 0u);
        Elem<T>::put(out, 4 * j + i, x);
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(dense + row * cols + col0);
#pragma unroll
    for (int v = 0; v < W / 4; ++v) dst[v] = make_uint4(out[4 * v], out[4 * v + 1], out[4 * v + 2], out[4 * v + 3]);
  }
}
