// The input checks of fastdiff::step and fastdiff::gaussian_ (step.h), shared by the CPU and
// CUDA kernels: one message per mistake, saying how to fix it.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <limits>
#include <utility>

#include "common.h"
#include "step.h"

namespace fastdiff {
namespace step {

namespace {

const char* layout_name(const at::Tensor& t) {
  if (t.is_contiguous()) return "contiguous";
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return "channels_last";
  return nullptr;
}

// the same memory order: equal strides wherever a dimension has more than one element (a
// size-1 dimension's stride is never used: (B, 1, H, W) is NCHW and channels_last at once)
bool same_layout(const at::Tensor& t, const at::Tensor& x) {
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) > 1 && t.stride(d) != x.stride(d)) return false;
  return true;
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastdiff::step: ", name, " must have x's shape ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastdiff::step: ", name,
              " must have x's dtype (", x.scalar_type(), "), got ", t.scalar_type(),
              "; convert it with .to(x.dtype)");
  TORCH_CHECK(t.device() == x.device(), "fastdiff::step: ", name, " must be on x's device (",
              x.device(), "), got ", t.device());
  TORCH_CHECK(same_layout(t, x), "fastdiff::step: ", name,
              " must have x's memory layout (", layout_name(x), ", strides ", x.strides(),
              "), got strides ", t.strides(),
              "; convert it with .contiguous(memory_format=...) to match x");
}

// The layout of a state (or noise output) `t` named `name`, checked for op `op`: a float32,
// float16 or bfloat16 tensor of shape (B, ...), contiguous or channels_last, whose samples'
// indices and (with noise) elements fit the noise counter.
Problem describe(const char* op, const char* name, const at::Tensor& t, int64_t sample_offset,
                 bool noise) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be a float32, float16 or bfloat16 tensor, got ", t.scalar_type(),
              " (float64 runs on the reference backend)");
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must be batched (B, ...), got a 0-d tensor");
  TORCH_CHECK(layout_name(t) != nullptr, op, ": ", name,
              " must be contiguous or channels_last, got strides ", t.strides(), " for shape ",
              t.sizes(), "; call .contiguous() first");
  Problem p;
  p.batch = t.size(0);
  if (t.is_contiguous()) {
    p.positions = p.batch ? t.numel() / p.batch : 0;
  } else {
    p.channels = t.size(1);
    p.positions = t.size(2) * t.size(3);
  }
  TORCH_CHECK(sample_offset >= 0 && sample_offset + p.batch <= (int64_t(1) << 32), op,
              ": sample indices ", sample_offset, "..", sample_offset + p.batch - 1,
              " must lie in [0, 2**32)");
  TORCH_CHECK(!noise || p.per_sample() <= (int64_t(1) << 34), op, ": a sample has ",
              p.per_sample(), " elements; the noise counter allows at most 2**34");
  p.noise = noise;
  return p;
}

}  // namespace

Problem check_gaussian_inputs(const at::Tensor& out, int64_t step, int64_t sample_offset) {
  Problem p = describe("fastdiff::gaussian_", "out", out, sample_offset, true);
  TORCH_CHECK(step >= 0 && step < (int64_t(1) << 32), "fastdiff::gaussian_: step must be in "
              "[0, 2**32) (0 draws x_T, row r of a plan draws with r + 1), got ", step);
  return p;
}

Problem check_step_inputs(const at::Tensor& x, const at::Tensor& y,
                          const std::optional<at::Tensor>& y_uncond,
                          const std::optional<at::Tensor>& h0,
                          const std::optional<at::Tensor>& h1, const at::Tensor& table,
                          const at::Tensor& counter, int64_t sample_offset, double guidance,
                          std::optional<at::ArrayRef<double>> clamp, bool stochastic,
                          const std::optional<at::Tensor>& nonfinite) {
  Problem p = describe("fastdiff::step", "x", x, sample_offset, stochastic);
  check_like("y", y, x);
  if (y_uncond) check_like("y_uncond", *y_uncond, x);
  for (const auto& [name, h] : {std::pair{"h0", &h0}, std::pair{"h1", &h1}}) {
    if (!*h) continue;
    check_like(name, **h, x);
    // the kernels write h while reading the other operands through restrict pointers
    for (const at::Tensor* other : {&x, &y}) at::assert_no_overlap(**h, *other);
    if (y_uncond) at::assert_no_overlap(**h, *y_uncond);
  }
  if (h0 && h1) at::assert_no_overlap(*h0, *h1);
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kNumCoef && table.size(0) > 0,
              "fastdiff::step: table must be a plan's coefficient table of shape (rows, ",
              int(kNumCoef), "), got shape ", table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble,
              "fastdiff::step: table must be float32 or float64, got ", table.scalar_type());
  TORCH_CHECK(table.is_contiguous(), "fastdiff::step: table must be contiguous");
  TORCH_CHECK(table.device() == x.device(), "fastdiff::step: table must be on x's device (",
              x.device(), "), got ", table.device(), "; move it once with table.to(device)");
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.numel() == 1,
              "fastdiff::step: counter must be an int64 tensor holding one row index, got ",
              counter.scalar_type(), " of shape ", counter.sizes());
  TORCH_CHECK(counter.device() == x.device(), "fastdiff::step: counter must be on x's device (",
              x.device(), "), got ", counter.device());
  if (nonfinite) {
    TORCH_CHECK(nonfinite->scalar_type() == at::kInt && nonfinite->dim() == 1 &&
                    nonfinite->size(0) == table.size(0) && nonfinite->is_contiguous(),
                "fastdiff::step: nonfinite must be a contiguous int32 tensor of shape (rows,) = (",
                table.size(0), ",), one flag per table row, got ", nonfinite->scalar_type(),
                " of shape ", nonfinite->sizes());
    TORCH_CHECK(nonfinite->device() == x.device(),
                "fastdiff::step: nonfinite must be on x's device (", x.device(), "), got ",
                nonfinite->device());
  }

  if (!stochastic) {
    // without noise the update is elementwise in any order: the state, channels_last or not,
    // runs as the one flat array it is in memory (the CUDA kernel's vector path)
    p.positions = p.batch * p.per_sample();
    p.batch = 1;
    p.channels = 1;
  }
  p.guided = y_uncond.has_value();
  p.has_h0 = h0.has_value();
  p.has_h1 = h1.has_value();
  p.guidance = static_cast<float>(guidance);
  p.lo = -std::numeric_limits<float>::infinity();
  p.hi = std::numeric_limits<float>::infinity();
  if (clamp) {
    TORCH_CHECK(clamp->size() == 2, "fastdiff::step: clamp must be [lo, hi], got ",
                clamp->size(), " values");
    p.lo = static_cast<float>((*clamp)[0]);
    p.hi = static_cast<float>((*clamp)[1]);
  }
  return p;
}

}  // namespace step
}  // namespace fastdiff
