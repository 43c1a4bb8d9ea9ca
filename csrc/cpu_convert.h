// fp32 <-> 16-bit rows for the C++ CPU kernels. fp16 converts with F16C's vcvtph2ps /
// vcvtps2ph (8 at a time; round to nearest even, as c10::Half does) where the CPU has it, as
// every AVX2 CPU does: c10::Half's own conversion is scalar bit manipulation, which made the
// fp16 GroupNorm+SiLU kernel 3x slower than torch's. Everything else converts elementwise.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTDIFF_F16C 1
#endif

namespace fastdiff {

// FASTDIFF_CPU_KERNELS: unset (the widest x86 intrinsics paths the CPU has: F16C conversions,
// the AVX-512 or AVX2 Philox), "avx2" (no AVX-512 path: what an AVX2-only CPU runs) or
// "portable" (the portable loops that every other CPU, aarch64 or x86 without AVX2, runs), e.g.
// to test those paths on one machine; all give the same bits. Read once: each op's entry calls
// cpu_intrinsics_allowed first, so that a bad value is reported there (an exception must not
// leave an OpenMP region).
inline const std::string& cpu_kernels_choice() {
  static const std::string choice = [] {
    const char* v = std::getenv("FASTDIFF_CPU_KERNELS");
    const std::string c = v ? v : "";
    TORCH_CHECK(c.empty() || c == "avx2" || c == "portable",
                "FASTDIFF_CPU_KERNELS must be unset, \"avx2\" (no AVX-512 paths) or \"portable\" "
                "(the portable loops instead of the F16C and AVX2/AVX-512 paths), got \"", c,
                "\"");
    return c;
  }();
  return choice;
}

// Whether the CPU kernels may take their x86 intrinsics paths where the CPU has them.
inline bool cpu_intrinsics_allowed() { return cpu_kernels_choice() != "portable"; }

// Whether they may take the AVX-512 ones.
inline bool cpu_avx512_allowed() { return cpu_kernels_choice().empty(); }

#ifdef FASTDIFF_F16C
inline bool has_f16c() {
  static const bool yes =
      (__builtin_cpu_init(), __builtin_cpu_supports("f16c")) && cpu_intrinsics_allowed();
  return yes;
}

__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const uint16_t* src,
                                                                     float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + k))));
  for (; k < n; ++k) dst[k] = _cvtsh_ss(src[k]);
}

__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* src,
                                                                     uint16_t* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
  for (; k < n; ++k) dst[k] = _cvtss_sh(src[k], _MM_FROUND_TO_NEAREST_INT);
}

// n <= 8 fp16 values from p in fp32 lanes (a tail goes through a zeroed buffer)
__attribute__((target("avx,f16c"))) inline __m256 load_half8(const c10::Half* p, int64_t n) {
  if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t b[8] = {};
  std::memcpy(b, p, n * sizeof(uint16_t));
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
}

// the first n <= 8 lanes of v rounded to fp16 (to nearest even, as c10::Half) into p
__attribute__((target("avx,f16c"))) inline void store_half8(c10::Half* p, __m256 v, int64_t n) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  if (n == 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  alignas(16) uint16_t b[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(b), h);
  std::memcpy(p, b, n * sizeof(uint16_t));
}
#endif

// dst[0, n) = x[0, n) in fp32
template <typename T>
void to_float(float* dst, const T* x, int64_t n) {
#ifdef FASTDIFF_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return half_to_float_f16c(reinterpret_cast<const uint16_t*>(x), dst, n);
  }
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(x[k]);
}

// y[0, n) = src[0, n) rounded to T
template <typename T>
void from_float(T* y, const float* src, int64_t n) {
#ifdef FASTDIFF_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return float_to_half_f16c(src, reinterpret_cast<uint16_t*>(y), n);
  }
#endif
  for (int64_t k = 0; k < n; ++k) y[k] = static_cast<T>(src[k]);
}

}  // namespace fastdiff
