// fastdiff::step, shared by the CPU (step.cpp) and CUDA (step_cuda.cu) kernels: the table row,
// the per-element update in the reference's operation order, and the input checks.
//
// Per element, in fp32 (fastdiff/ops/step.py is the definition):
//   y      = y_u + g (y - y_u)                             (guided only)
//   d      = clamp(A x + B y)                              (the x0 prediction)
//   x_next = 0 + X_X x + X_D d [+ X_H0 h0] [+ X_H1 h1] + X_Z z
//   h_k    = 0 + Hk_X x + Hk_D d [+ Hk_H0 h0] [+ Hk_H1 h1]  (stored only where W_k != 0)
// Every product and sum is rounded separately (no FMA contraction: -ffp-contract=off on the
// host, __fmul_rn/__fadd_rn on the device), so both kernels equal the PyTorch reference bit
// for bit apart from the noise, whose libm differs by <= 2 ulp.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "philox.h"

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <optional>

namespace fastdiff {
namespace step {

// Columns of a plan's table (fastdiff.samplers.Col).
enum Col : int {
  kA = 3,
  kB = 4,
  kXX = 5,  // X_X, X_D, X_H0, X_H1
  kXZ = 9,
  kH0X = 10,  // H0_X, H0_D, H0_H0, H0_H1
  kH1X = 14,  // H1_X, H1_D, H1_H0, H1_H1
  kW0 = 18,
  kW1 = 19,
  kNumCoef = 20,
};

// One table row in fp32, with the call's guidance and clamp.
struct Row {
  float a, b;
  float x[4];  // coefficients of (x, d, h0, h1) in x_next
  float z;     // of the noise (0 when no noise is drawn)
  float h[2][4];
  bool w[2];
  float guidance, lo, hi;
};

template <typename T>
FASTDIFF_HD Row load_row(const T* c, float guidance, float lo, float hi) {
  Row r;
  r.a = static_cast<float>(c[kA]);
  r.b = static_cast<float>(c[kB]);
  for (int k = 0; k < 4; ++k) {
    r.x[k] = static_cast<float>(c[kXX + k]);
    r.h[0][k] = static_cast<float>(c[kH0X + k]);
    r.h[1][k] = static_cast<float>(c[kH1X + k]);
  }
  r.z = static_cast<float>(c[kXZ]);
  r.w[0] = c[kW0] != 0;
  r.w[1] = c[kW1] != 0;
  r.guidance = guidance;
  r.lo = lo;
  r.hi = hi;
  return r;
}

FASTDIFF_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FASTDIFF_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FASTDIFF_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// 0 + c0 x + c1 d [+ c2 h0] [+ c3 h1]: the reference's combo(), term by term.
FASTDIFF_HD float combo(const float* c, float x, float d, float h0, float h1, bool has_h0,
                        bool has_h1) {
  float v = add(add(0.0f, mul(c[0], x)), mul(c[1], d));
  if (has_h0) v = add(v, mul(c[2], h0));
  if (has_h1) v = add(v, mul(c[3], h1));
  return v;
}

// x_next of one element; nh0/nh1 get the new history values (to store where r.w[k]). The CPU
// kernel passes the flags as compile-time constants (its loops stay branch-free); on the GPU
// they are uniform branches.
FASTDIFF_HD float update(const Row& r, float x, float y, float yu, float h0, float h1, float z,
                         float& nh0, float& nh1, bool guided, bool has_h0, bool has_h1) {
  if (guided) y = add(yu, mul(r.guidance, sub(y, yu)));
  float d = add(mul(r.a, x), mul(r.b, y));
  d = d < r.lo ? r.lo : d;  // torch.clamp: min(max(d, lo), hi), NaN passes through
  d = d > r.hi ? r.hi : d;
  nh0 = combo(r.h[0], x, d, h0, h1, has_h0, has_h1);
  nh1 = combo(r.h[1], x, d, h0, h1, has_h0, has_h1);
  return add(combo(r.x, x, d, h0, h1, has_h0, has_h1), mul(r.z, z));
}

// The memory layout of a step call: (batch, positions, channels) in memory, logical element
// e = c * positions + p within a sample (contiguous: channels = 1; channels_last: positions =
// H * W; a step without noise, whose element order does not matter: one flat sample). The noise
// of element e of sample b is z(seed, counter + 1, sample_offset + b, e).
struct Problem {
  int64_t batch = 0, positions = 0, channels = 1;
  bool guided = false, has_h0 = false, has_h1 = false;
  bool noise = false;  // stochastic: draw noise where the row's X_Z != 0
  float guidance = 1.0f, lo = 0.0f, hi = 0.0f;
  int64_t per_sample() const { return positions * channels; }
};

// Validates the arguments of fastdiff::step (one message per mistake, saying how to fix it) and
// describes the call; `device` is "CPU" or "CUDA", the kernel that was reached.
Problem check_step_inputs(const at::Tensor& x, const at::Tensor& y,
                          const std::optional<at::Tensor>& y_uncond,
                          const std::optional<at::Tensor>& h0,
                          const std::optional<at::Tensor>& h1, const at::Tensor& table,
                          const at::Tensor& counter, int64_t sample_offset, double guidance,
                          std::optional<at::ArrayRef<double>> clamp, bool stochastic,
                          const std::optional<at::Tensor>& nonfinite);

// Validates the arguments of fastdiff::gaussian_ (out: a float32/float16/bfloat16 tensor,
// contiguous or channels_last, to fill with z(seed, step, sample_offset + b, e) * scale) and
// describes `out` as check_step_inputs describes x.
Problem check_gaussian_inputs(const at::Tensor& out, int64_t step, int64_t sample_offset);

// The exponent field of the state's dtype: a value is NaN or infinite exactly when all of these
// bits are set (fp16: 5 exponent bits; bf16: 8, the fp32 exponent).
template <typename T>
constexpr uint32_t kExponentBits =
    sizeof(T) == 4 ? 0x7f800000u : (std::is_same_v<T, c10::BFloat16> ? 0x7f80u : 0x7c00u);

// The bits of a value of the state's dtype.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;

// Whether a value of the state's dtype is NaN or infinite, from its bits.
template <typename T>
FASTDIFF_HD bool nonfinite_bits(T v) {
  Bits<T> b;
  memcpy(&b, &v, sizeof b);
  return (b & kExponentBits<T>) == kExponentBits<T>;
}

}  // namespace step
}  // namespace fastdiff
