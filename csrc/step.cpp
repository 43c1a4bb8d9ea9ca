// fastdiff::step on the CPU (OpenMP); the input checks are in step_checks.cpp.
//
// Work is split into tiles of one sample's positions [p0, p1) (all channels): a contiguous
// range of memory. Per tile, the noise is drawn into a buffer in memory order (for channels_last
// each channel's run of logical elements c * P + [p0, p1) is drawn, then interleaved), then one
// branch-free loop reads x, y (, y_u, h0, h1) and the noise and writes x_next (, h).
// Traffic per element: (2 + guided + histories) reads and (1 + written histories) writes of the
// state's dtype; the noise costs one Philox4x32-10 and one Box-Muller pair per 4 elements.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTDIFF_PHILOX_AVX2 1
#endif

#include "common.h"
#include "cpu_convert.h"
#include "philox.h"
#include "step.h"

namespace fastdiff {
namespace step {

namespace {

// The hot loops are cloned per ISA (AVX-512, AVX2, baseline x86-64), picked when the library
// loads: one binary runs on any x86-64 CPU and still uses the widest vectors it has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDIFF_CLONES
#endif

constexpr int kChunk = 64;  // Philox blocks per stage of fill_normals

#ifdef FASTDIFF_PHILOX_AVX2
// The key of each Philox round (the same for every block).
void round_keys(uint64_t seed, uint32_t (&k0)[10], uint32_t (&k1)[10]) {
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int i = 1; i < 10; ++i) {
    k0[i] = k0[i - 1] + philox::kW0;
    k1[i] = k1[i - 1] + philox::kW1;
  }
}

// The Philox words of blocks block0 .. block0 + kChunk - 1 (mod 2^32) into w[k][j], with AVX2
// intrinsics: each 32-bit word in a 64-bit lane, so a round's two 32x32 -> 64 products are one
// vpmuludq each, and two vectors of 4 blocks in flight. Vectorised from philox4x32_10, GCC
// multiplies the 64-bit lanes by the constants with shift-and-add chains instead: 2.5x slower.
__attribute__((target("avx2"))) void chunk_words_avx2(uint32_t (*w)[kChunk], uint32_t block0,
                                                       uint32_t n, uint32_t s, uint64_t seed) {
  uint32_t k0[10], k1[10];
  round_keys(seed, k0, k1);
  const __m256i m0 = _mm256_set1_epi64x(philox::kM0), m1 = _mm256_set1_epi64x(philox::kM1);
  const __m256i low = _mm256_set1_epi64x(0xFFFFFFFFll);
  const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // the lanes' low words
  const __m256i first =
      _mm256_add_epi64(_mm256_set1_epi64x(block0), _mm256_setr_epi64x(0, 1, 2, 3));
  for (int j = 0; j < kChunk; j += 8) {
    __m256i c[2][4];
    for (int u = 0; u < 2; ++u) {
      c[u][0] = _mm256_and_si256(_mm256_add_epi64(first, _mm256_set1_epi64x(j + 4 * u)), low);
      c[u][1] = _mm256_set1_epi64x(n);
      c[u][2] = _mm256_set1_epi64x(s);
      c[u][3] = _mm256_setzero_si256();
    }
    for (int i = 0; i < 10; ++i) {
      const __m256i key0 = _mm256_set1_epi64x(k0[i]), key1 = _mm256_set1_epi64x(k1[i]);
      for (int u = 0; u < 2; ++u) {  // the high lane halves are never read: no masking
        const __m256i p0 = _mm256_mul_epu32(c[u][0], m0), p1 = _mm256_mul_epu32(c[u][2], m1);
        c[u][0] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c[u][1]), key0);
        c[u][1] = p1;
        c[u][2] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c[u][3]), key1);
        c[u][3] = p0;
      }
    }
    for (int u = 0; u < 2; ++u)
      for (int k = 0; k < 4; ++k)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(&w[k][j + 4 * u]),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c[u][k], evens)));
  }
}

// The same words with AVX-512: 8 blocks per vector, two vectors in flight; vpmovqd keeps the
// lanes' low words (gaussian_ ~20% faster than with the AVX2 words on the AMD EPYC).
__attribute__((target("avx512f"))) void chunk_words_avx512(uint32_t (*w)[kChunk],
                                                           uint32_t block0, uint32_t n,
                                                           uint32_t s, uint64_t seed) {
  uint32_t k0[10], k1[10];
  round_keys(seed, k0, k1);
  const __m512i m0 = _mm512_set1_epi64(philox::kM0), m1 = _mm512_set1_epi64(philox::kM1);
  const __m512i low = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i first =
      _mm512_add_epi64(_mm512_set1_epi64(block0), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  for (int j = 0; j < kChunk; j += 16) {
    __m512i c[2][4];
    for (int u = 0; u < 2; ++u) {
      c[u][0] = _mm512_and_si512(_mm512_add_epi64(first, _mm512_set1_epi64(j + 8 * u)), low);
      c[u][1] = _mm512_set1_epi64(n);
      c[u][2] = _mm512_set1_epi64(s);
      c[u][3] = _mm512_setzero_si512();
    }
    for (int i = 0; i < 10; ++i) {
      const __m512i key0 = _mm512_set1_epi64(k0[i]), key1 = _mm512_set1_epi64(k1[i]);
      for (int u = 0; u < 2; ++u) {
        const __m512i p0 = _mm512_mul_epu32(c[u][0], m0), p1 = _mm512_mul_epu32(c[u][2], m1);
        c[u][0] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), c[u][1]), key0);
        c[u][1] = p1;
        c[u][2] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), c[u][3]), key1);
        c[u][3] = p0;
      }
    }
    for (int u = 0; u < 2; ++u)
      for (int k = 0; k < 4; ++k)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w[k][j + 8 * u]),
                            _mm512_cvtepi64_epi32(c[u][k]));
  }
}

enum class PhiloxPath { kPortable, kAvx2, kAvx512 };

// The widest Philox path the CPU has and FASTDIFF_CPU_KERNELS allows (cpu_convert.h). Decided
// once.
PhiloxPath philox_path() {
  static const PhiloxPath path = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && cpu_avx512_allowed()) return PhiloxPath::kAvx512;
    if (__builtin_cpu_supports("avx2") && cpu_intrinsics_allowed()) return PhiloxPath::kAvx2;
    return PhiloxPath::kPortable;
  }();
  return path;
}
#endif

// Normals of the Philox blocks block0 .. block0 + nblk - 1 into out[0 .. 4 nblk), kChunk blocks
// at a time, each stage a loop over contiguous arrays that vectorises across blocks: the Philox
// words; r = sqrt(-2 log u) of (w0, w2); sin and cos of theta of (w1, w3); then z interleaved.
FASTDIFF_CLONES
void fill_normals(float* out, uint32_t block0, int64_t nblk, uint32_t n, uint32_t s,
                  uint64_t seed) {
  alignas(64) uint32_t w[4][kChunk];
  alignas(64) float r[2][kChunk], sn[2][kChunk], cs[2][kChunk];
#ifdef FASTDIFF_PHILOX_AVX2
  const PhiloxPath path = philox_path();
  const bool portable = path == PhiloxPath::kPortable;
#else
  const bool portable = true;
#endif
  for (int64_t j0 = 0; j0 < nblk; j0 += kChunk) {
    // past nblk: words of later blocks, never stored
    const uint32_t b0 = block0 + static_cast<uint32_t>(j0);
#ifdef FASTDIFF_PHILOX_AVX2
    if (path == PhiloxPath::kAvx512) chunk_words_avx512(w, b0, n, s, seed);
    if (path == PhiloxPath::kAvx2) chunk_words_avx2(w, b0, n, s, seed);
#endif
    if (portable) {
#pragma omp simd
      for (int j = 0; j < kChunk; ++j) {
        const philox::Words v = philox::block_words(seed, b0 + static_cast<uint32_t>(j), n, s);
        w[0][j] = v.w0;
        w[1][j] = v.w1;
        w[2][j] = v.w2;
        w[3][j] = v.w3;
      }
    }
#pragma omp simd
    for (int j = 0; j < kChunk; ++j) {
      r[0][j] = std::sqrt(-2.0f * philox::log_unit(philox::unit(w[0][j])));
      r[1][j] = std::sqrt(-2.0f * philox::log_unit(philox::unit(w[2][j])));
    }
#pragma omp simd
    for (int j = 0; j < kChunk; ++j) {
      philox::sincos_angle(philox::angle(w[1][j]), sn[0][j], cs[0][j]);
      philox::sincos_angle(philox::angle(w[3][j]), sn[1][j], cs[1][j]);
    }
    float* o = out + 4 * j0;
    const int64_t m = std::min<int64_t>(kChunk, nblk - j0);
    for (int64_t j = 0; j < m; ++j) {
      o[4 * j] = r[0][j] * cs[0][j];
      o[4 * j + 1] = r[0][j] * sn[0][j];
      o[4 * j + 2] = r[1][j] * cs[1][j];
      o[4 * j + 3] = r[1][j] * sn[1][j];
    }
  }
}

struct Tile {
  int64_t b, p0, p1;
};

constexpr int kMaxInterleave = 16;  // channels interleaved per pass (a tile's run buffers)

// z[k * C + c] = src[c][k] for k < len, c < kG: with the group size a compile-time constant,
// the compiler vectorises the loop as register transposes (one channel at a time, strided
// scalar stores, made channels_last noise ~20% dearer than NCHW's; this, ~7%).
template <int kG>
void interleave_group(float* __restrict__ z, int64_t C, const float* const* src, int64_t len) {
  const float* s[kG];
  for (int c = 0; c < kG; ++c) s[c] = src[c];
  if (C == kG) {
    for (int64_t k = 0; k < len; ++k)
      for (int c = 0; c < kG; ++c) z[k * kG + c] = s[c][k];
    return;
  }
  for (int64_t k = 0; k < len; ++k)
    for (int c = 0; c < kG; ++c) z[k * C + c] = s[c][k];
}

// The runs src[0 .. group) into channels c0 .. c0 + group of z (z points at channel c0).
void interleave(float* z, int64_t C, const float* const* src, int64_t group, int64_t len) {
  switch (group) {
    case 2: return interleave_group<2>(z, C, src, len);
    case 4: return interleave_group<4>(z, C, src, len);
    case 8: return interleave_group<8>(z, C, src, len);
    case 16: return interleave_group<16>(z, C, src, len);
    default:
      for (int64_t c = 0; c < group; ++c)
        for (int64_t k = 0; k < len; ++k) z[k * C + c] = src[c][k];
  }
}

// The noise of a tile in memory order: z[(p - p0) * C + c] = z(e = c * P + p).
void tile_noise(const Problem& pr, const Tile& t, uint64_t seed, uint32_t s, int64_t offset,
                float* z, float* run) {
  const auto n = static_cast<uint32_t>(offset + t.b);
  const int64_t P = pr.positions, C = pr.channels, len = t.p1 - t.p0;
  if (C == 1) {  // tiles start at multiples of 4: draw straight into z
    fill_normals(z, static_cast<uint32_t>(t.p0 / 4), (len + 3) / 4, n, s, seed);
    return;
  }
  // each channel's run of logical elements c * P + [p0, p1) (from the Philox block holding its
  // first), then the runs interleaved into memory order
  const int64_t stride = len + 8;
  const float* src[kMaxInterleave];
  for (int64_t c0 = 0; c0 < C; c0 += kMaxInterleave) {
    const int64_t group = std::min<int64_t>(C - c0, kMaxInterleave);
    for (int64_t c = 0; c < group; ++c) {
      const int64_t e0 = (c0 + c) * P + t.p0, block0 = e0 / 4;
      float* r = run + c * stride;
      fill_normals(r, static_cast<uint32_t>(block0), (e0 + len + 3) / 4 - block0, n, s, seed);
      src[c] = r + (e0 - 4 * block0);
    }
    interleave(z + c0, C, src, group, len);
  }
}

template <typename T>
struct Pointers {
  const T* x;
  const T* y;
  const T* yu;
  T* h0;
  T* h1;
  T* out;
};

// The update over memory [i0, i0 + n). kS0/kS1: history slot absent (0), read (1), read and
// written (2). Everything that varies between calls is a template parameter, so the loop is
// branch-free.
template <typename T, bool kGuided, int kS0, int kS1>
FASTDIFF_CLONES void update_span(const Pointers<T>& p, const Row& r, int64_t i0, int64_t n,
                                 const float* z) {
  const T* __restrict__ x = p.x + i0;
  const T* __restrict__ y = p.y + i0;
  const T* __restrict__ yu = kGuided ? p.yu + i0 : nullptr;
  T* __restrict__ h0 = kS0 ? p.h0 + i0 : nullptr;
  T* __restrict__ h1 = kS1 ? p.h1 + i0 : nullptr;
  T* __restrict__ out = p.out + i0;
  for (int64_t k = 0; k < n; ++k) {
    const float h0v = kS0 ? static_cast<float>(h0[k]) : 0.0f;
    const float h1v = kS1 ? static_cast<float>(h1[k]) : 0.0f;
    const float yuv = kGuided ? static_cast<float>(yu[k]) : 0.0f;
    float nh0, nh1;
    const float xn = update(r, static_cast<float>(x[k]), static_cast<float>(y[k]), yuv, h0v, h1v,
                            z[k], nh0, nh1, kGuided, kS0 > 0, kS1 > 0);
    out[k] = static_cast<T>(xn);
    if (kS0 == 2) h0[k] = static_cast<T>(nh0);
    if (kS1 == 2) h1[k] = static_cast<T>(nh1);
  }
}

#ifdef FASTDIFF_F16C
// update_span of an fp16 state on a CPU with F16C, 8 elements at a time converted in registers
// (vcvtph2ps / vcvtps2ph) around the fp32 update. c10::Half's scalar conversions are bit
// manipulation that does not vectorise; converting a whole tile into fp32 rows first spills the
// rows out of L1 (that ran the fp16 DPM-Solver++ 2M step at half the fp32 speed).
template <bool kGuided, int kS0, int kS1>
__attribute__((target("avx,f16c"))) void update_span_f16c(const Pointers<c10::Half>& p,
                                                           const Row& r, int64_t i0, int64_t n,
                                                           const float* z) {
  const Row rr = r;  // a local copy: the stores below cannot alias it, so it stays in registers
  for (int64_t k = i0; k < i0 + n; k += 8) {
    const int64_t m = std::min<int64_t>(8, i0 + n - k);
    alignas(32) float x[8], y[8], yu[8], h0[8], h1[8], out[8], nh0[8], nh1[8];
    _mm256_store_ps(x, load_half8(p.x + k, m));
    _mm256_store_ps(y, load_half8(p.y + k, m));
    if (kGuided) _mm256_store_ps(yu, load_half8(p.yu + k, m));
    if (kS0) _mm256_store_ps(h0, load_half8(p.h0 + k, m));
    if (kS1) _mm256_store_ps(h1, load_half8(p.h1 + k, m));
    const float* zk = z + (k - i0);
    alignas(32) float zt[8] = {};
    if (m < 8) zk = static_cast<const float*>(std::memcpy(zt, zk, m * sizeof(float)));
    for (int j = 0; j < 8; ++j)
      out[j] = update(rr, x[j], y[j], kGuided ? yu[j] : 0.0f, kS0 ? h0[j] : 0.0f,
                      kS1 ? h1[j] : 0.0f, zk[j], nh0[j], nh1[j], kGuided, kS0 > 0, kS1 > 0);
    store_half8(p.out + k, _mm256_load_ps(out), m);
    if (kS0 == 2) store_half8(p.h0 + k, _mm256_load_ps(nh0), m);
    if (kS1 == 2) store_half8(p.h1 + k, _mm256_load_ps(nh1), m);
  }
}
#endif

// update_span over one tile; fp16 on a CPU with F16C takes update_span_f16c.
template <typename T, bool kGuided, int kS0, int kS1>
void update_tile(const Pointers<T>& p, const Row& r, int64_t i0, int64_t n, const float* z) {
#ifdef FASTDIFF_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return update_span_f16c<kGuided, kS0, kS1>(p, r, i0, n, z);
  }
#endif
  update_span<T, kGuided, kS0, kS1>(p, r, i0, n, z);
}

template <typename F>
void dispatch_bool(bool v, F&& f) {
  if (v) {
    f(std::integral_constant<bool, true>{});
  } else {
    f(std::integral_constant<bool, false>{});
  }
}

template <typename F>
void dispatch_slot(bool present, bool written, F&& f) {
  if (!present) {
    f(std::integral_constant<int, 0>{});
  } else if (!written) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 2>{});
  }
}

// Whether out[0 .. n) holds a NaN or an infinity: whether the largest magnitude's bits reach
// kExponentBits (the exponent field sits above the mantissa). An unsigned max vectorises, where
// or-ing per-element bools ran one element per cycle.
template <typename T>
FASTDIFF_CLONES bool any_nonfinite(const T* __restrict__ out, int64_t n) {
  constexpr Bits<T> kMagnitude = sizeof(T) == 4 ? 0x7fffffffu : 0x7fffu;
  Bits<T> top = 0;
  for (int64_t k = 0; k < n; ++k) {
    Bits<T> b;
    std::memcpy(&b, out + k, sizeof b);
    top = std::max<Bits<T>>(top, b & kMagnitude);
  }
  return top >= kExponentBits<T>;
}

// Calls body(i0, n, z) for every tile of the call (memory [i0, i0 + n)), the tiles split
// statically over the OpenMP threads; z holds the tile's noise when `noise` (else zeros), in
// memory order. Returns whether any call of body returned true.
template <typename Body>
bool for_each_tile(const Problem& pr, bool noise, uint64_t seed, uint32_t s,
                   int64_t sample_offset, Body&& body) {
  const int64_t P = pr.positions, C = pr.channels;
  // ~4096 elements per tile (16 KiB of fp32 noise: stays in L1/L2), at least 16 positions.
  const int64_t tp = std::max<int64_t>(16, (4096 / C + 3) / 4 * 4);
  const int64_t tiles_per_sample = (P + tp - 1) / tp, tiles = pr.batch * tiles_per_sample;
  // as at::parallel_for: no threads for small states, none inside another parallel region
  const bool big = pr.batch * pr.per_sample() >= (1 << 15);
  const int threads = big && !at::in_parallel_region() ? at::get_num_threads() : 1;
  bool any = false;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> z(tp * C + 4, 0.0f);
    std::vector<float> run(noise && C > 1 ? std::min<int64_t>(C, kMaxInterleave) * (tp + 8) : 0);
#pragma omp for schedule(static) reduction(|| : any)
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t j = i % tiles_per_sample;
      const Tile t{i / tiles_per_sample, j * tp, std::min(P, (j + 1) * tp)};
      if (noise) tile_noise(pr, t, seed, s, sample_offset, z.data(), run.data());
      const int64_t i0 = (t.b * P + t.p0) * C, n = (t.p1 - t.p0) * C;
      any = body(i0, n, z.data()) || any;
    }
  }
  return any;
}

// The step over every tile. Returns whether x_next holds a non-finite value (checked when
// `check`, while each tile is still in L1).
template <typename T, bool kGuided, int kS0, int kS1>
bool run_tiles(const Pointers<T>& p, const Problem& pr, const Row& r, bool noise, uint64_t seed,
               uint32_t s, int64_t sample_offset, bool check) {
  return for_each_tile(pr, noise, seed, s, sample_offset,
                       [&](int64_t i0, int64_t n, const float* z) {
                         update_tile<T, kGuided, kS0, kS1>(p, r, i0, n, z);
                         return check && any_nonfinite(p.out + i0, n);
                       });
}

// out[0 .. n) = T(z * scale): the product in fp32, rounded to T once.
template <typename T>
FASTDIFF_CLONES void store_scaled(T* out, float* __restrict__ z, int64_t n, float scale) {
  for (int64_t k = 0; k < n; ++k) z[k] *= scale;
  from_float(out, z, n);  // vector conversions for fp16 where the CPU has them
}

template <typename T>
const T* ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->mutable_data_ptr<T>() : nullptr;
}

at::Tensor step_cpu(const at::Tensor& x, const at::Tensor& y,
                    const std::optional<at::Tensor>& y_uncond, const std::optional<at::Tensor>& h0,
                    const std::optional<at::Tensor>& h1, const at::Tensor& table,
                    const at::Tensor& counter, int64_t seed, int64_t sample_offset,
                    double guidance, std::optional<at::ArrayRef<double>> clamp, bool stochastic,
                    const std::optional<at::Tensor>& nonfinite) {
  Problem pr = check_step_inputs(x, y, y_uncond, h0, h1, table, counter, sample_offset, guidance,
                                 clamp, stochastic, nonfinite);
  TORCH_CHECK(x.device().is_cpu(), "fastdiff::step: the CPU kernel got a tensor on ", x.device());
  (void)cpu_intrinsics_allowed();
  const int64_t row_index = *counter.const_data_ptr<int64_t>();
  TORCH_CHECK(row_index >= 0 && row_index < table.size(0), "fastdiff::step: counter is ",
              row_index, " but the table has ", table.size(0), " rows");
  const Row r = table.scalar_type() == at::kDouble
                    ? load_row(table.const_data_ptr<double>() + row_index * kNumCoef,
                               pr.guidance, pr.lo, pr.hi)
                    : load_row(table.const_data_ptr<float>() + row_index * kNumCoef,
                               pr.guidance, pr.lo, pr.hi);
  Row rz = r;
  const bool noise = pr.noise && r.z != 0.0f;
  if (!noise) rz.z = 0.0f;  // adds 0 * 0: x_next keeps its value (a -0 may become +0)
  const auto s = static_cast<uint32_t>(row_index + 1);

  at::Tensor out = at::empty_like(x);  // same strides: x is dense
  if (x.numel() == 0) return out;
  bool bad = false;
  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "fastdiff::step", [&] {
    const Pointers<scalar_t> p{x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                               ptr<scalar_t>(y_uncond),      mutable_ptr<scalar_t>(h0),
                               mutable_ptr<scalar_t>(h1),    out.mutable_data_ptr<scalar_t>()};
    dispatch_bool(pr.guided, [&](auto guided) {
      dispatch_slot(pr.has_h0, r.w[0], [&](auto s0) {
        dispatch_slot(pr.has_h1, r.w[1], [&](auto s1) {
          bad = run_tiles<scalar_t, decltype(guided)::value, decltype(s0)::value,
                          decltype(s1)::value>(p, pr, rz, noise, static_cast<uint64_t>(seed), s,
                                               sample_offset, nonfinite.has_value());
        });
      });
    });
  });
  if (bad) nonfinite->mutable_data_ptr<int32_t>()[row_index] = 1;
  return out;
}

void gaussian_cpu(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset,
                  double scale) {
  const Problem pr = check_gaussian_inputs(out, step, sample_offset);
  TORCH_CHECK(out.device().is_cpu(), "fastdiff::gaussian_: the CPU kernel got a tensor on ",
              out.device());
  (void)cpu_intrinsics_allowed();
  if (out.numel() == 0) return;
  const auto scale_f = static_cast<float>(scale);
  FASTDIFF_DISPATCH_FLOAT(out.scalar_type(), "fastdiff::gaussian_", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_tile(pr, true, static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                  sample_offset, [&](int64_t i0, int64_t n, float* z) {
                    store_scaled(o + i0, z, n, scale_f);
                    return false;
                  });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("step", &step_cpu);
  m.impl("gaussian_", &gaussian_cpu);
}

}  // namespace step
}  // namespace fastdiff
