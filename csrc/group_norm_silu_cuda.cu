// fastdiff::group_norm_silu_fwd on CUDA (op described in group_norm_silu.h); the kernels and the
// plan of a call are in group_norm_silu_kernels.cuh, this file launches them.
//
// One kernel. A (batch, group) of more than 4096 elements is split over the blocks of one thread
// block cluster (up to 8), so that small batches still fill the GPU (SD1.5 at batch 2 has only 64
// groups of 41k elements); on sm_90 the blocks of a cluster run at the same time and read each
// other's shared memory. The split depends on the group's size alone, so a sample's output does
// not depend on the batch it is in. Each block
//   1. reads its slice of the group once, keeping up to CACHE runs per thread in registers, and
//      reduces it to (count, mean, M2): two passes over the registers (mean, then squares about
//      it), runs beyond the cache merged in as they stream past, then Chan et al.'s pairwise
//      merge across the block;
//   2. merges the cluster's block statistics through distributed shared memory; every block
//      merges them in the same order, so all of them normalise with the same mean and rstd;
//   3. normalises, conditions and writes its slice from the registers, re-reading only the runs
//      that did not fit.
// Traffic where the slice fits the registers: x (and the residual) read once, the output written
// once, 2 x numel x itemsize. Without clusters (no sm_90 code for the device, or
// FASTDIFF_CUDA_CLUSTERS=0) a group is never split in that kernel; where splitting is needed to
// fill the GPU, two launches over a small fp32 workspace do it instead: statistics, then apply
// (x read twice).
//
// A run is R elements of one memory row that a thread moves together, with every pointer 16-byte
// aligned: in NCHW one 16-byte vector (R = 16 / itemsize) where H*W is a multiple of it; in
// channels_last the largest power of two up to that which divides C and C/G (the per-channel
// values of a run are vectors too); otherwise R = 1. Index arithmetic within a group is 32-bit,
// once per run.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <type_traits>

#include "group_norm_silu.h"

namespace fastdiff {
namespace {

#include "group_norm_silu_kernels.cuh"

// Whether the device runs this build's sm_90 (or later) code, i.e. can launch clusters (asked of
// the CUDA runtime once per device), and FASTDIFF_CUDA_CLUSTERS=0 does not turn them off (which
// runs the kernels as on a GPU before Hopper).
bool device_runs_clusters(int device) {
  const char* env = std::getenv("FASTDIFF_CUDA_CLUSTERS");
  if (env != nullptr && std::string_view(env) == "0") return false;
  static std::atomic<int8_t> known[64] = {};  // 0: not asked yet, 1: yes, 2: no
  if (device < 64 && known[device].load() != 0) return known[device].load() == 1;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, group_norm_silu_kernel<float, false, 1, 8>));
  const bool yes = attributes.binaryVersion >= 90 &&
                   at::cuda::getDeviceProperties(device)->major >= 9;
  if (device < 64) known[device].store(yes ? 1 : 2);
  return yes;
}

template <typename Kernel, typename T>
void launch_clusters(Kernel kernel, int64_t blocks, int64_t cluster, cudaStream_t stream,
                     const Params<T>& p) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (cluster > 1) {
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

template <typename T, bool CL, int R>
void launch(const Params<T>& p, const Plan& plan, int64_t blocks, cudaStream_t stream) {
  if (plan.cache == 0) {
    group_norm_stats_kernel<T, CL, R><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    group_norm_apply_kernel<T, CL, R><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  with_cache<R>(plan.cache, [&](auto cache) {
    launch_clusters(group_norm_silu_kernel<T, CL, R, decltype(cache)::value>, blocks, plan.splits,
                    stream, p);
  });
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, int64_t num_groups, const at::Tensor& weight,
                                const at::Tensor& bias, double eps,
                                const std::optional<at::Tensor>& scale_shift,
                                const std::optional<at::Tensor>& residual) {
  const GroupNormSiluArgs a =
      check_group_norm_silu(x, num_groups, weight, bias, eps, scale_shift, residual);
  TORCH_CHECK(x.is_cuda(), "fastdiff::group_norm_silu_fwd: the CUDA kernel got a tensor on ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) return out;
  const int64_t groups_total = a.batch * a.groups, group_size = a.channels_per_group() * a.spatial;

  TORCH_CHECK(group_size < (int64_t{1} << 31), "fastdiff::group_norm_silu_fwd: the CUDA kernel ",
              "takes groups of fewer than 2^31 elements, got ", a.channels_per_group(),
              " channels x ", a.spatial, " positions; use the triton or reference backend");
  const int64_t run = run_length(a, out);
  const int device = x.get_device();
  const Plan plan = plan_launch(group_size, run, device_runs_clusters(device));
  const int64_t blocks = groups_total * plan.splits;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "fastdiff::group_norm_silu_fwd: ", groups_total,
              " groups (batch x num_groups) are more than one launch can take");
  at::Tensor partial;
  if (plan.cache == 0) partial = at::empty({blocks * 3}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "fastdiff::group_norm_silu_fwd", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(a, out, partial, plan);
    with_run<scalar_t>(a.channels_last, run, [&](auto cl, auto r) {
      launch<scalar_t, decltype(cl)::value, decltype(r)::value>(p, plan, blocks, stream);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("group_norm_silu_fwd", &group_norm_silu_cuda); }

}  // namespace fastdiff
