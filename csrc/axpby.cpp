// fastdiff::axpby on the CPU (OpenMP): out = a * x + b * y, computed in fp32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.h"

namespace fastdiff {
namespace {

template <typename scalar_t>
void axpby_loop(const scalar_t* x, const scalar_t* y, scalar_t* out, float a, float b,
                int64_t n) {
#pragma omp parallel for if (n >= 65536)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(a * static_cast<float>(x[i]) + b * static_cast<float>(y[i]));
  }
}

at::Tensor axpby_cpu(const at::Tensor& x, const at::Tensor& y, double a, double b) {
  check_elementwise_inputs("fastdiff::axpby", {{"x", x}, {"y", y}});
  TORCH_CHECK(x.device().is_cpu(), "fastdiff::axpby: the CPU kernel got a tensor on ", x.device());
  at::Tensor out = at::empty_like(x);
  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "fastdiff::axpby", [&] {
    axpby_loop<scalar_t>(x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                         out.mutable_data_ptr<scalar_t>(), static_cast<float>(a),
                         static_cast<float>(b), x.numel());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("axpby", &axpby_cpu); }

}  // namespace fastdiff
