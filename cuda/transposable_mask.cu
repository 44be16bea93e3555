// Transposable 2:4 mask: for every 4x4 block of W [rows, cols], among the 90 binary 4x4 patterns with exactly
// two ones in every row and every column, pick the one maximising sum |W| over its ones. The mask is 2:4 along
// K for W and for W^T (Hubara et al., "Accelerated Sparse Neural Training: A Provable and Efficient Method to
// Find N:M Transposable Masks", NeurIPS 2021; used by Hu et al.'s 2:4 pre-training recipe).
//
// Pattern order (ties and near-ties keep the first maximum): that of TRANSPOSABLE_PATTERNS_24 in
// runtime/transposable_mask.py (complementary pairs: pattern 2k+1 is the complement of pattern 2k). The CPU loop
// runtime/transposable_mask_cpu.py computes the same sums and the same comparison, so the masks are identical.
// A pattern is four row patterns p0..p3, each an index into the six column pairs (0,1) (0,2) (0,3) (1,2) (1,3)
// (2,3), packed as p0 | p1 << 4 | p2 << 8 | p3 << 12 (tests/test_kernel_build.py checks the table against
// runtime/transposable_mask.py).
//
// Input: W row-major, float32 / bf16 / fp16 (the two 16-bit types as bit patterns), rows % 4 == 0,
// cols % 4 == 0, base aligned to 16 bytes (fp32) or 8 bytes (16-bit). Output: uint8 mask [rows, cols], 1 = keep.
// One thread per 4x4 block; the 90 candidates are unrolled so every score reads registers only.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct bf16_bits { u16 x; };
struct f16_bits { u16 x; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_bits v) { return __uint_as_float(((u32)v.x) << 16); }
__device__ __forceinline__ float to_float(f16_bits v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
  return f;
}

__device__ __forceinline__ constexpr u32 pattern(int i) {
  constexpr u16 kPatterns[90] = {
    0x5500, 0x0055, 0x5410, 0x0145, 0x4510, 0x1045, 0x5320, 0x0235, 0x3520, 0x2035,
    0x5230, 0x0325, 0x2530, 0x3025, 0x5140, 0x0415, 0x1540, 0x4015, 0x5050, 0x0505,
    0x4150, 0x1405, 0x3250, 0x2305, 0x2350, 0x3205, 0x1450, 0x4105, 0x0550, 0x5005,
    0x5401, 0x0154, 0x4501, 0x1054, 0x4411, 0x1144, 0x4321, 0x1234, 0x3421, 0x2134,
    0x4231, 0x1324, 0x2431, 0x3124, 0x5041, 0x0514, 0x4141, 0x1414, 0x3241, 0x2314,
    0x2341, 0x3214, 0x1441, 0x4114, 0x0541, 0x5014, 0x4051, 0x1504, 0x0451, 0x5104,
    0x5302, 0x0253, 0x3502, 0x2053, 0x4312, 0x1243, 0x3412, 0x2143, 0x3322, 0x2233,
    0x5032, 0x0523, 0x4132, 0x1423, 0x3232, 0x2323, 0x2332, 0x3223, 0x1432, 0x4123,
    0x0532, 0x5023, 0x3142, 0x2413, 0x1342, 0x4213, 0x3052, 0x2503, 0x0352, 0x5203,
  };
  return kPatterns[i];
}

// Column bits of row pattern q (0..5): 0b0011 0b0101 0b1001 0b0110 0b1010 0b1100.
__device__ __forceinline__ u32 row_bits(u32 q) { return (0xCA6953u >> (4 * q)) & 0xfu; }

template <typename T>
__device__ __forceinline__ void load_row(const T* p, float a[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) a[c] = fabsf(to_float(p[c]));
}

template <>
__device__ __forceinline__ void load_row<float>(const float* p, float a[4]) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  a[0] = fabsf(q.x); a[1] = fabsf(q.y); a[2] = fabsf(q.z); a[3] = fabsf(q.w);
}

template <typename T>
__global__ void __launch_bounds__(256) transposable_mask24(const T* __restrict__ w, u8* __restrict__ mask,
                                                           int rows, int cols) {
  const int bcols = cols >> 2;
  const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= (long long)(rows >> 2) * bcols) return;
  const long long r0 = (b / bcols) * 4;
  const int c0 = (int)(b % bcols) * 4;
  float s[4][6];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    float a[4];
    load_row<T>(w + (r0 + r) * cols + c0, a);
    s[r][0] = a[0] + a[1]; s[r][1] = a[0] + a[2]; s[r][2] = a[0] + a[3];
    s[r][3] = a[1] + a[2]; s[r][4] = a[1] + a[3]; s[r][5] = a[2] + a[3];
  }
  // Scores are >= 0, so their bits order like them; comparing them with the low 6 mantissa bits cleared sends
  // near-ties (relative 2^-17) to the lower pattern, as runtime/transposable_mask_cpu.py does (the same mask).
  // A NaN score never wins.
  int best_key = -1;
  u32 best = pattern(0);
#pragma unroll
  for (int i = 0; i < 90; ++i) {
    const u32 p = pattern(i);
    const float sc = ((s[0][p & 15] + s[1][(p >> 4) & 15]) + s[2][(p >> 8) & 15]) + s[3][(p >> 12) & 15];
    const int key = (int)(__float_as_uint(sc) & ~63u);
    if (key > best_key && sc == sc) { best_key = key; best = p; }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const u32 bits = row_bits((best >> (4 * r)) & 15u);
    const u32 bytes = (bits & 1u) | ((bits & 2u) << 7) | ((bits & 4u) << 14) | ((bits & 8u) << 21);
    *reinterpret_cast<u32*>(mask + (r0 + r) * cols + c0) = bytes;
  }
}
