// fastdiff::group_norm_silu_fwd on the CPU, and its Meta kernel (shapes only) for fake tensors.
// The op is described in group_norm_silu.h.
//
// Every inner loop runs over a contiguous fp32 row without branches or libm calls, so it
// vectorizes; the row helpers are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (GCC/clang target_clones).
//   NCHW: one OpenMP task per (batch, group), whose C/G x S elements are contiguous. An fp32 x
//     is read in place, a 16-bit one (or x + a full-size residual) once into an fp32 buffer
//     (cache resident for UNet groups). A per-channel residual r is never added: the statistics
//     and the output take x - (mean - r) per channel. Each helper call covers a whole group (in
//     fp32 sums of at most kChunk elements, added up in double), not a row of S positions: at
//     4x4 and 8x8 a call per row cost more than the row itself.
//   channels_last: one task per batch element. Rows are positions (all C channels contiguous).
//     Blocks of positions are read once into an fp32 buffer that stays in L2: per channel its
//     sum, then its sum of squares about the block's mean; the blocks' moments merge per group
//     (law of total variance). The output is a second pass over x.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_convert.h"
#include "group_norm_silu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDIFF_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDIFF_VECTOR_CLONES
#endif

namespace fastdiff {
namespace {

// exp(x) in fp32 without libm: x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), e^r by a degree-7
// polynomial (Cephes expf's coefficients), 2^n by building the exponent bits. < 1 ulp on
// [-87, 88] (checked against exp in double on a dense grid); clamped outside.
inline float exp_f32(float x) {
  // clamp on the bits: float compares may trap, so GCC (without -fno-trapping-math) will not
  // if-convert them and the loop would stay scalar.
  // 0x42B00000 = 88.0f: as int32, only larger positives exceed it (GCC 12 keeps the loop scalar
  // if these constants are named); 0xC2AE0000 = -87.0f: as uint32, only more negative values do
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = static_cast<int32_t>(u) > static_cast<int32_t>(0x42B00000u) ? 0x42B00000u : u;
  u = u > 0xC2AE0000u ? 0xC2AE0000u : u;
  std::memcpy(&x, &u, 4);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t t_bits, kround_bits;
  std::memcpy(&t_bits, &t, 4);
  std::memcpy(&kround_bits, &kRound, 4);
  const int32_t scale_bits = (t_bits - kround_bits + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return p * scale;
}

inline float silu_f32(float v) { return v / (1.0f + exp_f32(-v)); }

// -- row helpers (the hot loops) --------------------------------------------------------------

constexpr int64_t kChunk = 2048;  // elements summed in fp32 before a flush to double

FASTDIFF_VECTOR_CLONES float row_sum(const float* v, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += v[k];
  return s;
}

FASTDIFF_VECTOR_CLONES void accumulate(float* acc, const float* v, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] += v[k];
}

// the channels_last statistics, four rows of positions per pass over acc (one read and write
// of acc per four rows): acc += v0 + v1 + v2 + v3, and acc += the rows' squares about mean
FASTDIFF_VECTOR_CLONES void accumulate4(float* acc, const float* v0, const float* v1,
                                        const float* v2, const float* v3, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] += (v0[k] + v1[k]) + (v2[k] + v3[k]);
}

FASTDIFF_VECTOR_CLONES void accumulate_centred_sq4(float* acc, const float* v0, const float* v1,
                                                   const float* v2, const float* v3,
                                                   const float* mean, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float d0 = v0[k] - mean[k], d1 = v1[k] - mean[k], d2 = v2[k] - mean[k],
                d3 = v3[k] - mean[k];
    acc[k] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
  }
}

// sum over `rows` consecutive rows of n of (v - centre[row])^2: fp32 sums of at most kChunk
// elements, added up in double
FASTDIFF_VECTOR_CLONES double centred_sq_rows(const float* v, int64_t rows, int64_t n,
                                              const float* centre) {
  double total = 0.0;
  for (int64_t c = 0; c < rows; ++c) {
    const float mu = centre[c];
    for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
      const float* vc = v + c * n + k0;
      const int64_t m = std::min(kChunk, n - k0);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < m; ++k) s += (vc[k] - mu) * (vc[k] - mu);
      total += s;
    }
  }
  return total;
}

// y = silu((h - centre[row]) * scale[row] + shift[row]) over `rows` consecutive rows of n
FASTDIFF_VECTOR_CLONES void silu_rows(const float* h, float* y, int64_t rows, int64_t n,
                                      const float* centre, const float* scale,
                                      const float* shift) {
  for (int64_t c = 0; c < rows; ++c) {
    const float* hc = h + c * n;
    float* yc = y + c * n;
    const float mu = centre[c], sc = scale[c], sh = shift[c];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) yc[k] = silu_f32((hc[k] - mu) * sc + sh);
  }
}

// the same with per-element (mean, scale, shift)
FASTDIFF_VECTOR_CLONES void silu_row(const float* h, float* y, int64_t n, const float* mean,
                                     const float* scale, const float* shift) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] = silu_f32((h[k] - mean[k]) * scale[k] + shift[k]);
}

// -- loads ------------------------------------------------------------------------------------

// dst = x (+ residual row) (+ residual per element of the row) in fp32
template <typename scalar_t>
void load_row(float* dst, const scalar_t* x, const scalar_t* res_row, const float* res_channel,
              int64_t n) {
  to_float(dst, x, n);
  if (res_row != nullptr) {
    float tmp[256];
    for (int64_t k0 = 0; k0 < n; k0 += 256) {
      const int64_t m = std::min<int64_t>(256, n - k0);
      to_float(tmp, res_row + k0, m);
      accumulate(dst + k0, tmp, m);
    }
  }
  if (res_channel != nullptr) accumulate(dst, res_channel, n);
}

// scale_c = w rstd (1 + s), shift_c = b (1 + s) + t for the channels [c0, c0 + n) of batch b
template <typename scalar_t>
void channel_affine(const GroupNormSiluArgs& a, const scalar_t* ss, int64_t b, int64_t c0,
                    int64_t n, float rstd, float* scale, float* shift) {
  const float* w = a.weight.const_data_ptr<float>();
  const float* bias = a.bias.const_data_ptr<float>();
  const int64_t C = a.channels;
  for (int64_t c = 0; c < n; ++c) {
    const float s = ss ? 1.f + static_cast<float>(ss[b * 2 * C + c0 + c]) : 1.f;
    const float t = ss ? static_cast<float>(ss[b * 2 * C + C + c0 + c]) : 0.f;
    scale[c] = w[c0 + c] * rstd * s;
    shift[c] = bias[c0 + c] * s + t;
  }
}

template <typename scalar_t>
void residual_channels(const GroupNormSiluArgs& a, const scalar_t* res, int64_t b, float* dst) {
  for (int64_t c = 0; c < a.channels; ++c)
    dst[c] = static_cast<float>(res[b * a.channels + c]);
}

// -- the two layouts --------------------------------------------------------------------------

// sum over v[0, n) in fp32 chunks of at most kChunk, added up in double
double chunked_sum(const float* v, int64_t n) {
  double s = 0.0;
  for (int64_t k = 0; k < n; k += kChunk) s += row_sum(v + k, std::min(kChunk, n - k));
  return s;
}

template <typename scalar_t>
void nchw_kernel(const GroupNormSiluArgs& a, const scalar_t* x, const scalar_t* res,
                 const scalar_t* ss, scalar_t* y) {
  const int64_t S = a.spatial, cpg = a.channels_per_group(), n = cpg * S;
  const bool full = a.residual_kind == ResidualKind::kFull;
  const bool per_channel = a.residual_kind == ResidualKind::kPerChannel;
  // a per-channel residual r is never added to x: the statistics and the output take x - c
  // with the centre c = mean - r of each channel. So an fp32 x without a full-size residual is
  // read in place.
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  const bool in_place = is_float && !full;
#pragma omp parallel if (a.batch * a.groups > 1 && a.x.numel() >= 32768)
  {
    std::vector<float> h(in_place ? 0 : n), out(is_float ? 0 : n), r(a.channels, 0.f),
        centre(cpg), scale(cpg), shift(cpg);
#pragma omp for
    for (int64_t bg = 0; bg < a.batch * a.groups; ++bg) {
      const int64_t b = bg / a.groups, c0 = (bg % a.groups) * cpg, off = a.offset(b, c0, 0);
      const float* group = h.data();
      if (in_place) {
        group = reinterpret_cast<const float*>(x + off);
      } else {
        load_row<scalar_t>(h.data(), x + off, full ? res + off : nullptr, nullptr, n);
      }
      double sum = chunked_sum(group, n);
      if (per_channel) {
        residual_channels(a, res, b, r.data());
        for (int64_t c = 0; c < cpg; ++c) sum += static_cast<double>(S) * r[c0 + c];
      }
      const float mean = static_cast<float>(sum / static_cast<double>(n));
      for (int64_t c = 0; c < cpg; ++c) centre[c] = mean - r[c0 + c];
      // without a per-channel residual every centre is the mean: one row of n
      const double m2 = per_channel ? centred_sq_rows(group, cpg, S, centre.data())
                                    : centred_sq_rows(group, 1, n, &mean);
      const float rstd = static_cast<float>(1.0 / std::sqrt(m2 / static_cast<double>(n) + a.eps));
      channel_affine(a, ss, b, c0, cpg, rstd, scale.data(), shift.data());
      float* dst = is_float ? reinterpret_cast<float*>(y + off) : out.data();
      silu_rows(group, dst, cpg, S, centre.data(), scale.data(), shift.data());
      if constexpr (!is_float) from_float(y + off, dst, n);
    }
  }
}

template <typename scalar_t>
void channels_last_kernel(const GroupNormSiluArgs& a, const scalar_t* x, const scalar_t* res,
                          const scalar_t* ss, scalar_t* y) {
  const int64_t C = a.channels, S = a.spatial, G = a.groups, cpg = a.channels_per_group();
  const double n = static_cast<double>(cpg * S);
  const bool full = a.residual_kind == ResidualKind::kFull;
  const bool per_channel = a.residual_kind == ResidualKind::kPerChannel;
  // as in nchw_kernel, an fp32 x without a full-size residual is read in place and a
  // per-channel residual r enters as centres mean - r; otherwise rows are loaded with r added
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  const bool in_place = is_float && !full;
  // positions per block: a block of P x C fp32 values (<= 128 KB) stays in L2 between its sum
  // and its centred sum, so the statistics read x once
  const int64_t P = std::clamp<int64_t>(32768 / C, 1, 256);
  const int64_t nblocks = (S + P - 1) / P;
#pragma omp parallel if (a.batch > 1 && a.x.numel() >= 32768)
  {
    std::vector<float> buffer(in_place ? 0 : P * C), out_row(is_float ? 0 : C), r(C, 0.f),
        acc(C), block_mean(nblocks * C), centre(C), scale(C), shift(C), zeros(C, 0.f);
    std::vector<double> total(C), m2(C);
    // row s of batch b in fp32: x itself, or its conversion (+ residual) in buffer row `slot`
    const auto row = [&](int64_t b, int64_t s, int64_t slot) -> const float* {
      const int64_t off = a.offset(b, 0, s);
      if (in_place) return reinterpret_cast<const float*>(x + off);
      float* dst = buffer.data() + slot * C;
      load_row(dst, x + off, full ? res + off : nullptr, per_channel ? r.data() : nullptr, C);
      return dst;
    };
#pragma omp for
    for (int64_t b = 0; b < a.batch; ++b) {
      if (per_channel) residual_channels(a, res, b, r.data());
      // r as it still has to be added (in place: all of it; loaded rows hold it already)
      const float* r_left = in_place ? r.data() : nullptr;
      // per channel and block: the block's mean and its centred second moment (law of total
      // variance: M2 = the blocks' M2 + sum over blocks of m_j (mean_j - mean)^2, per group)
      std::fill(total.begin(), total.end(), 0.0);
      std::fill(m2.begin(), m2.end(), 0.0);
      for (int64_t j = 0; j < nblocks; ++j) {
        const int64_t s0 = j * P, m = std::min(P, S - s0);
        float* mu = block_mean.data() + j * C;
        // rows s .. s + 3 of the block; past its end `pad`, which adds nothing (zeros to the
        // sums, the mean to the squares). `loaded`: converted rows are in the buffer already
        const auto rows4 = [&](int64_t s, const float* pad, bool loaded) {
          std::array<const float*, 4> v;
          for (int64_t q = 0; q < 4; ++q) {
            const int64_t t = s + q;
            v[q] = t >= m ? pad : loaded && !in_place ? buffer.data() + t * C : row(b, s0 + t, t);
          }
          return v;
        };
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < m; s += 4) {
          const auto v = rows4(s, zeros.data(), false);
          accumulate4(acc.data(), v[0], v[1], v[2], v[3], C);
        }
        for (int64_t c = 0; c < C; ++c) {
          total[c] += acc[c];
          mu[c] = acc[c] / static_cast<float>(m);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < m; s += 4) {
          const auto v = rows4(s, mu, true);
          accumulate_centred_sq4(acc.data(), v[0], v[1], v[2], v[3], mu, C);
        }
        for (int64_t c = 0; c < C; ++c) {
          m2[c] += acc[c];
          if (r_left != nullptr) {
            mu[c] += r_left[c];
            total[c] += static_cast<double>(m) * r_left[c];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = g * cpg, c1 = c0 + cpg;
        double sum = 0.0, group_m2 = 0.0;
        for (int64_t c = c0; c < c1; ++c) sum += total[c];
        const double mean = sum / n;
        for (int64_t c = c0; c < c1; ++c) group_m2 += m2[c];
        for (int64_t j = 0; j < nblocks; ++j) {
          const double m = static_cast<double>(std::min(P, S - j * P));
          for (int64_t c = c0; c < c1; ++c) {
            const double d = block_mean[j * C + c] - mean;
            group_m2 += m * d * d;
          }
        }
        const float rstd = static_cast<float>(1.0 / std::sqrt(group_m2 / n + a.eps));
        for (int64_t c = c0; c < c1; ++c)
          centre[c] = static_cast<float>(mean) - (r_left != nullptr ? r_left[c] : 0.f);
        channel_affine(a, ss, b, c0, cpg, rstd, scale.data() + c0, shift.data() + c0);
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t off = a.offset(b, 0, s);
        float* dst = is_float ? reinterpret_cast<float*>(y + off) : out_row.data();
        silu_row(row(b, s, 0), dst, C, centre.data(), scale.data(), shift.data());
        if constexpr (!is_float) from_float(y + off, dst, C);
      }
    }
  }
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups, const at::Tensor& weight,
                               const at::Tensor& bias, double eps,
                               const std::optional<at::Tensor>& scale_shift,
                               const std::optional<at::Tensor>& residual) {
  const GroupNormSiluArgs a =
      check_group_norm_silu(x, num_groups, weight, bias, eps, scale_shift, residual);
  TORCH_CHECK(x.device().is_cpu(), "fastdiff::group_norm_silu_fwd: the CPU kernel got a tensor on ",
              x.device());
  (void)cpu_intrinsics_allowed();
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) return out;
  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "fastdiff::group_norm_silu_fwd", [&] {
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const scalar_t* rp = a.residual.defined() ? a.residual.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ssp =
        a.scale_shift.defined() ? a.scale_shift.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    if (a.channels_last) {
      channels_last_kernel(a, xp, rp, ssp, yp);
    } else {
      nchw_kernel(a, xp, rp, ssp, yp);
    }
  });
  return out;
}

at::Tensor group_norm_silu_meta(const at::Tensor& x, int64_t num_groups, const at::Tensor& weight,
                                const at::Tensor& bias, double eps,
                                const std::optional<at::Tensor>& scale_shift,
                                const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() >= 3 && num_groups > 0 && x.size(1) % num_groups == 0,
              "fastdiff::group_norm_silu_fwd: x must be (B, C, *spatial) with C divisible by ",
              "num_groups, got ", x.sizes(), " and ", num_groups);
  return at::empty_like(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("group_norm_silu_fwd", &group_norm_silu_cpu); }
TORCH_LIBRARY_IMPL(fastdiff, Meta, m) { m.impl("group_norm_silu_fwd", &group_norm_silu_meta); }

}  // namespace fastdiff
