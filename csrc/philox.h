// fastdiff's Gaussian noise (the specification is fastdiff/noise.py), for host and device code:
// Philox4x32-10 words of a counter, and their conversion to normals. The CUDA path uses CUDA's
// logf/sincosf (<= 1 and 2 ulp without fast-math) and __fsqrt_rn. The CPU path has its own
// branch-free float logf/sincosf that the compiler vectorises; over every input the spec can
// produce (2^23 values of u and of theta, checked exhaustively against float64) their errors are
// <= 0.81 ulp (log), 1.34 ulp (sin), 1.48 ulp (cos), and z is within 7.9e-7 of float64 in the
// tails (the spec allows 1e-6).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTDIFF_HD __host__ __device__ __forceinline__
#else
#define FASTDIFF_HD inline
#endif

namespace fastdiff {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // multiplier applied to c0
constexpr uint32_t kM1 = 0xCD9E8D57u;  // multiplier applied to c2
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl increment of k0
constexpr uint32_t kW1 = 0xBB67AE85u;  // Weyl increment of k1
constexpr float kTwoPi = 6.2831855f;   // float32(2 pi) = 6.2831854820251465

struct Words {
  uint32_t w0, w1, w2, w3;
};

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                               uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = __umulhi(c0, kM0), lo0 = c0 * kM0;
    const uint32_t hi1 = __umulhi(c2, kM1), lo1 = c2 * kM1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {c0, c1, c2, c3};
}
#else
// The 32-bit words live in 64-bit lanes: each 32x32 -> 64 product is then one vector multiply
// (vpmuludq) with no widening or narrowing, 2.3x faster than 32-bit lanes when vectorised.
inline Words philox4x32_10(uint64_t c0, uint64_t c1, uint64_t c2, uint64_t c3, uint64_t k0,
                           uint64_t k1) {
  constexpr uint64_t m = 0xFFFFFFFFull;
#if !defined(__CUDACC__)  // (nvcc's host pass, which never calls this, rejects the GCC pragma)
#pragma GCC unroll 10
#endif
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = (c0 & m) * kM0, p1 = (c2 & m) * kM1;
    c0 = ((p1 >> 32) ^ c1 ^ k0) & m;
    c1 = p1 & m;
    c2 = ((p0 >> 32) ^ c3 ^ k1) & m;
    c3 = p0 & m;
    k0 = (k0 + kW0) & m;
    k1 = (k1 + kW1) & m;
  }
  return {static_cast<uint32_t>(c0), static_cast<uint32_t>(c1), static_cast<uint32_t>(c2),
          static_cast<uint32_t>(c3)};
}
#endif

// The words of the block holding logical element 4 * block of global sample n at step s.
FASTDIFF_HD Words block_words(uint64_t seed, uint32_t block, uint32_t n, uint32_t s) {
  return philox4x32_10(block, n, s, 0u, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// u(w) = ((w >> 9) + 0.5) * 2^-23: both operations exact, u in [2^-24, 1 - 2^-24].
FASTDIFF_HD float unit(uint32_t w) { return (static_cast<float>(w >> 9) + 0.5f) * 0x1p-23f; }

#if defined(__CUDACC__)

// theta = (u - 0.5) * 2pi with one rounding; __f*_rn forbids contraction into an FMA.
__device__ __forceinline__ float angle(uint32_t w) {
  return __fmul_rn(__fsub_rn(unit(w), 0.5f), kTwoPi);
}

// The four normals of a block: Box-Muller on (w0, w1) and on (w2, w3).
__device__ __forceinline__ float4 normals(Words w) {
  const float r01 = __fsqrt_rn(-2.0f * logf(unit(w.w0)));
  const float r23 = __fsqrt_rn(-2.0f * logf(unit(w.w2)));
  float s01, c01, s23, c23;
  sincosf(angle(w.w1), &s01, &c01);
  sincosf(angle(w.w3), &s23, &c23);
  return make_float4(__fmul_rn(r01, c01), __fmul_rn(r01, s01), __fmul_rn(r23, c23),
                     __fmul_rn(r23, s23));
}

#else

inline float angle(uint32_t w) { return (unit(w) - 0.5f) * kTwoPi; }

inline uint32_t float_bits(float f) {
  uint32_t b;
  __builtin_memcpy(&b, &f, sizeof b);
  return b;
}

inline float bits_float(uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, sizeof f);
  return f;
}

// c ? a : b and (negate ? -a : a) as bit operations, so loops stay branch-free and vectorise
// whatever -ftrapping-math says about speculating floating-point operations.
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
}

inline float flip_sign(bool negate, float a) {
  return bits_float(float_bits(a) ^ (static_cast<uint32_t>(negate) << 31));
}

// logf(u) for u in (0, 1): u = 2^e m, m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact), log(1 + f)
// = f - f^2/2 + f^3 P(f) with Cephes' minimax P (S. Moshier), e ln 2 in two parts.
inline float log_unit(float u) {
  const uint32_t b = float_bits(u);
  float e = static_cast<float>(static_cast<int32_t>(b >> 23) - 127);
  float m = bits_float((b & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = select(big, 0.5f * m, m);
  e = select(big, e + 1.0f, e);
  const float f = m - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float y = (p * f * z + -2.12194440e-4f * e) - 0.5f * z;
  return (f + y) + 0.693359375f * e;
}

// (sinf(t), cosf(t)) for |t| <= pi: t = q pi/2 + r with |r| <= pi/4 (pi/2 in three parts, the
// first two short enough that q times them is exact), Cephes' minimax polynomials on r, the
// quadrant q mod 4 by selects.
inline void sincos_angle(float t, float& sin_out, float& cos_out) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float q = (t * 0.636619772f + shifter) - shifter;
  const float r =
      ((t - q * 1.5703125f) - q * 4.837512969970703125e-4f) - q * 7.54978995489188216e-8f;
  const float z = r * r;
  float s = -1.9515295891e-4f;
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  s = s * z * r + r;
  float c = 2.443315711809948e-5f;
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = (c * z * z - 0.5f * z) + 1.0f;
  const int32_t n = static_cast<int32_t>(q) & 3;
  const float sv = select(n & 1, c, s), cv = select(n & 1, s, c);
  sin_out = flip_sign(n & 2, sv);
  cos_out = flip_sign((n + 1) & 2, cv);
}

#endif

}  // namespace philox
}  // namespace fastdiff
