// The schema of every op in the `fastdiff` torch library: one m.def per op, nothing else.
// Kernels register with TORCH_LIBRARY_IMPL(fastdiff, CPU/CUDA, m) next to their code; fake
// (meta) impls are registered from Python through fastdiff.ops._library.register_fake.
#include <torch/library.h>

TORCH_LIBRARY(fastdiff, m) {
  m.set_python_module("fastdiff.ops._library");
  // a * x + b * y in fp32 arithmetic; exists to prove the C++/CUDA build end to end.
  m.def("axpby(Tensor x, Tensor y, float a, float b) -> Tensor");
  // One sampler step (fastdiff/ops/step.py): row table[counter] applied to x; returns x_next,
  // updates h0/h1 in place. seed: the uint64 seed as two's-complement int64. nonfinite: int32
  // of shape (rows,); element `counter` is set to 1 when x_next holds a NaN or an infinity.
  m.def(
      "step(Tensor x, Tensor y, Tensor? y_uncond, Tensor(a!)? h0, Tensor(b!)? h1, Tensor table, "
      "Tensor counter, int seed, int sample_offset, float guidance, float[]? clamp, "
      "bool stochastic, Tensor(c!)? nonfinite=None) -> Tensor");
  // out = z(seed, step, sample_offset + b, e) * scale (fastdiff/noise.py), rounded once to out's
  // dtype; out contiguous or channels_last. Step 0 is a sample's x_T, row r of a plan draws r + 1.
  m.def("gaussian_(Tensor(a!) out, int seed, int step, int sample_offset, float scale) -> ()");
  // silu(group_norm(x + residual) * (1 + scale) + shift); weight/bias fp32; see group_norm_silu.h
  m.def(
      "group_norm_silu_fwd(Tensor x, int num_groups, Tensor weight, Tensor bias, float eps, "
      "Tensor? scale_shift, Tensor? residual) -> Tensor");
}
