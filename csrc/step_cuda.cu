// fastdiff::step on CUDA: one kernel per sampler step, launched on the current stream. The row
// index is read from the device counter inside the kernel (no host sync; CUDA-graph safe). A
// thread that stored a non-finite x_next sets the row's flag in `nonfinite` (when given).
//
// Contiguous states whose per-sample size is a multiple of the vector width take the vector
// path: each thread handles 16 bytes of every operand per iteration of a grid-stride loop
// (4 fp32 = 1 Philox block, 8 fp16/bf16 = 2 blocks); so does a step without noise on a
// channels_last state (check_step_inputs describes it as one flat sample). channels_last with
// noise and 2^k channels takes the tile kernel: 16-byte accesses too, the noise transposed
// through shared memory. Otherwise (other channels_last states with noise, odd sizes) a
// thread handles one Philox block of 4 logical elements with scalar loads.
// Bytes per element: (2 + guided + histories read + 1 + histories written) * sizeof(T); e.g.
// DDIM in fp32 moves 12 B/element, DPM-Solver++(2M) 20 B/element.
// fastdiff::gaussian_ (the noise alone, e.g. a sample's x_T: the block or tile kernel's noise,
// scaled and stored) writes sizeof(T) B/element.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "step.h"
#include "step_kernels.cuh"

namespace fastdiff {
namespace step {
namespace {

using namespace gpu;

// Blocks of kThreads of `kKernel` that fit on one SM at once (registers bound it), asked once.
template <auto kKernel>
int resident_blocks() {
  static const int blocks = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0));
    return std::max(n, 1);
  }();
  return blocks;
}

// One full wave of resident blocks for `units` thread iterations (a grid-stride loop covers the
// rest), fewer if the problem is small.
int grid_size(int64_t units, int resident) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((units + kThreads - 1) / kThreads,
                           static_cast<int64_t>(sms) * resident)));
}

at::Tensor step_cuda(const at::Tensor& x, const at::Tensor& y,
                     const std::optional<at::Tensor>& y_uncond,
                     const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& h1,
                     const at::Tensor& table, const at::Tensor& counter, int64_t seed,
                     int64_t sample_offset, double guidance,
                     std::optional<at::ArrayRef<double>> clamp, bool stochastic,
                     const std::optional<at::Tensor>& nonfinite) {
  const Problem pr = check_step_inputs(x, y, y_uncond, h0, h1, table, counter, sample_offset,
                                       guidance, clamp, stochastic, nonfinite);
  TORCH_CHECK(x.is_cuda(), "fastdiff::step: the CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);  // same strides: x is dense
  if (x.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "fastdiff::step", [&] {
    using T = scalar_t;
    const Args<T> a = make_args<T>(x, y, y_uncond, h0, h1, out, table, counter, nonfinite,
                                   seed, sample_offset, pr);
    switch (step_kernel_for<T>(pr, a)) {
      case StepKernel::kVector: {
        constexpr int V = Pack<T>::kSize;
        const int blocks =
            grid_size(pr.batch * pr.positions / V, resident_blocks<step_vector_kernel<T>>());
        step_vector_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
        break;
      }
      case StepKernel::kTile: {  // one block per tile
        const int blocks =
            grid_size(tile_count<T>(pr) * kThreads, resident_blocks<step_tile_kernel<T>>());
        step_tile_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
        break;
      }
      case StepKernel::kBlock: {
        const int blocks = grid_size(pr.batch * ((pr.per_sample() + 3) / 4),
                                     resident_blocks<step_block_kernel<T>>());
        step_block_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
        break;
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void gaussian_cuda(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset,
                   double scale) {
  const Problem pr = check_gaussian_inputs(out, step, sample_offset);
  TORCH_CHECK(out.is_cuda(), "fastdiff::gaussian_: the CUDA kernel got a tensor on ",
              out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTDIFF_DISPATCH_FLOAT(out.scalar_type(), "fastdiff::gaussian_", [&] {
    using T = scalar_t;
    T* o = out.mutable_data_ptr<T>();
    const auto seed64 = static_cast<uint64_t>(seed);
    const auto s = static_cast<uint32_t>(step);
    const auto fscale = static_cast<float>(scale);
    if (gaussian_tiled<T>(pr, o)) {
      const int64_t tiles = tile_count<T>(pr);
      const int blocks = grid_size(tiles * kThreads, resident_blocks<gaussian_tile_kernel<T>>());
      gaussian_tile_kernel<T><<<blocks, kThreads, 0, stream>>>(
          o, seed64, s, sample_offset, fscale, pr.batch, pr.positions, pr.channels);
    } else {
      const bool quad = gaussian_quad<T>(pr, o);
      const int blocks = grid_size(pr.batch * ((pr.per_sample() + 3) / 4),
                                   resident_blocks<gaussian_kernel<T>>());
      gaussian_kernel<T><<<blocks, kThreads, 0, stream>>>(
          o, seed64, s, sample_offset, fscale, pr.batch, pr.positions, pr.channels, quad);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("step", &step_cuda);
  m.impl("gaussian_", &gaussian_cuda);
}

}  // namespace step
}  // namespace fastdiff
