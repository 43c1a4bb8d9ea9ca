// fastdiff::group_norm_silu_fwd, shared by the CPU (.cpp) and CUDA (_cuda.cu) kernels:
//
//   h = x + residual              residual: none, (B, C) per channel, or x-shaped
//   y = (h - mean_g) * rstd_g * weight + bias
//   y = y * (1 + scale) + shift   scale_shift: (B, 2C) = [scale | shift]
//   out = y * sigmoid(y)
//
// x is (B, C, *spatial), contiguous or channels_last (4-D); weight and bias are fp32 (C,);
// scale_shift and residual have x's dtype. The output has x's layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common.h"

namespace fastdiff {

enum class ResidualKind : int { kNone = 0, kPerChannel = 1, kFull = 2 };

// Shapes, strides and pointers-to-be of one call, after the checks.
struct GroupNormSiluArgs {
  at::Tensor x, weight, bias, scale_shift, residual;  // scale_shift / residual may be undefined
  int64_t batch = 0, channels = 0, spatial = 0, groups = 0;
  bool channels_last = false;
  ResidualKind residual_kind = ResidualKind::kNone;
  float eps = 0.f;

  int64_t channels_per_group() const { return channels / groups; }
  // Offset of element (b, c, s) in x, the output and a full residual.
  int64_t offset(int64_t b, int64_t c, int64_t s) const {
    return channels_last ? (b * spatial + s) * channels + c : (b * channels + c) * spatial + s;
  }
};

inline GroupNormSiluArgs check_group_norm_silu(const at::Tensor& x, int64_t num_groups,
                                               const at::Tensor& weight, const at::Tensor& bias,
                                               double eps,
                                               const std::optional<at::Tensor>& scale_shift,
                                               const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "fastdiff::group_norm_silu_fwd";
  TORCH_CHECK(x.dim() >= 3, op, ": x must be (B, C, *spatial), got shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  GroupNormSiluArgs a;
  a.batch = x.size(0);
  a.channels = x.size(1);
  a.spatial = x.numel() / std::max<int64_t>(1, a.batch * a.channels);
  a.groups = num_groups;
  a.eps = static_cast<float>(eps);
  TORCH_CHECK(num_groups > 0 && a.channels % num_groups == 0, op, ": ", a.channels,
              " channels do not split into ", num_groups, " groups");
  a.channels_last = !x.is_contiguous() && x.dim() == 4 &&
                    x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous() || a.channels_last, op,
              ": x must be contiguous or channels_last, got strides ", x.strides(),
              "; call .contiguous()");
  a.x = x;
  for (const NamedTensor& p : {NamedTensor{"weight", weight}, NamedTensor{"bias", bias}}) {
    TORCH_CHECK(p.tensor.scalar_type() == at::kFloat && p.tensor.dim() == 1 &&
                    p.tensor.size(0) == a.channels && p.tensor.device() == x.device(),
                op, ": ", p.name, " must be a float32 (C,) = (", a.channels, ",) tensor on ",
                x.device(), ", got ", p.tensor.scalar_type(), " ", p.tensor.sizes(), " on ",
                p.tensor.device());
  }
  a.weight = weight.contiguous();
  a.bias = bias.contiguous();
  const auto same_kind = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name,
                " must have x's dtype and device (", x.scalar_type(), ", ", x.device(),
                "), got ", t.scalar_type(), ", ", t.device());
  };
  if (scale_shift.has_value()) {
    same_kind(*scale_shift, "scale_shift");
    TORCH_CHECK(scale_shift->dim() == 2 && scale_shift->size(0) == a.batch &&
                    scale_shift->size(1) == 2 * a.channels,
                op, ": scale_shift must be (B, 2C) = (", a.batch, ", ", 2 * a.channels,
                "), got ", scale_shift->sizes());
    a.scale_shift = scale_shift->contiguous();
  }
  if (residual.has_value()) {
    same_kind(*residual, "residual");
    if (residual->dim() == 2) {
      TORCH_CHECK(residual->size(0) == a.batch && residual->size(1) == a.channels, op,
                  ": a 2-D residual must be (B, C), got ", residual->sizes());
      a.residual = residual->contiguous();
      a.residual_kind = ResidualKind::kPerChannel;
    } else {
      TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must be (B, C) or x's shape ",
                  x.sizes(), ", got ", residual->sizes());
      a.residual = residual->contiguous(a.channels_last ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous);
      a.residual_kind = ResidualKind::kFull;
    }
  }
  return a;
}

}  // namespace fastdiff
