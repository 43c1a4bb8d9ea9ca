// Helpers shared by fastdiff's C++ and CUDA kernels: input checks and float dtype dispatch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace fastdiff {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// Checks the inputs of an elementwise kernel: each is a contiguous float32/float16/bfloat16
// tensor with the shape, dtype and device of the first one.
inline void check_elementwise_inputs(const char* op, std::initializer_list<NamedTensor> inputs) {
  const NamedTensor& first = *inputs.begin();
  for (const NamedTensor& in : inputs) {
    const at::Tensor& t = in.tensor;
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", in.name,
                " must be a float32, float16 or bfloat16 tensor, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": ", in.name, " must be contiguous (got strides ",
                t.strides(), " for shape ", t.sizes(), "); call .contiguous() first");
    if (&in == &first) continue;
    TORCH_CHECK(t.sizes() == first.tensor.sizes(), op, ": ", in.name, " must have the shape of ",
                first.name, " ", first.tensor.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == first.tensor.scalar_type(), op, ": ", in.name,
                " must have the dtype of ", first.name, " (", first.tensor.scalar_type(),
                "), got ", t.scalar_type(), "; convert one of them with .to(dtype)");
    TORCH_CHECK(t.device() == first.tensor.device(), op, ": ", in.name,
                " must be on the device of ", first.name, " (", first.tensor.device(), "), got ",
                t.device());
  }
}

}  // namespace fastdiff

// Calls the lambda __VA_ARGS__ with `scalar_t` bound to float, at::Half or at::BFloat16 for
// DTYPE; any other dtype is an error naming OP.
#define FASTDIFF_DISPATCH_FLOAT(DTYPE, OP, ...)                                              \
  [&] {                                                                                      \
    switch (DTYPE) {                                                                         \
      case at::kFloat: {                                                                     \
        using scalar_t = float;                                                              \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kHalf: {                                                                      \
        using scalar_t = at::Half;                                                           \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kBFloat16: {                                                                  \
        using scalar_t = at::BFloat16;                                                       \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      default:                                                                               \
        TORCH_CHECK(false, OP, ": unsupported dtype ", DTYPE,                                \
                    "; expected float32, float16 or bfloat16");                              \
    }                                                                                        \
  }()
