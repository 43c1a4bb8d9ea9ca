// fastdiff::group_norm_silu_fwd on CUDA (op described in group_norm_silu.h).
//
// A group (C/G channels x S positions) is split over `splits` blocks so that small batches
// still fill the GPU (SD1.5 at batch 2 has only 64 groups). Two launches:
//   1. statistics: each block reduces its slice to (count, mean, M2) with Welford per thread
//      and Chan et al.'s pairwise merge across threads; partials go to a small fp32 workspace;
//   2. apply: each block merges its group's partials, then normalises, conditions and writes
//      its slice.
// Where a group's elements come in 16-byte runs that share a memory row (NCHW with S a multiple
// of the vector width V = 16 / itemsize; channels_last with C and C/G multiples of V) and every
// pointer is 16-byte aligned, both passes move one 16-byte vector per thread and iteration and
// index with one 32-bit division per vector; otherwise one element at a time.
// Traffic: x read twice (plus the residual), the output written once: 3 x numel x itemsize.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "group_norm_silu.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSplits = 32;  // the apply kernel merges the partials within one warp

struct Stats {
  float n, mean, m2;
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + delta * f, a.m2 + b.m2 + delta * delta * a.n * f};
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const Stats o{__shfl_xor_sync(0xffffffffu, s.n, offset),
                  __shfl_xor_sync(0xffffffffu, s.mean, offset),
                  __shfl_xor_sync(0xffffffffu, s.m2, offset)};
    s = merge(s, o);
  }
  return s;
}

// The block's merged statistics, written by thread 0 to *out.
__device__ __forceinline__ void store_block_stats(Stats s, Stats* out) {
  __shared__ Stats warps[kThreads / 32];
  s = warp_merge(s);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < kThreads / 32 ? warps[threadIdx.x] : Stats{0.f, 0.f, 0.f};
    s = warp_merge(s);
    if (threadIdx.x == 0) *out = s;
  }
}

// (mean, rstd) of a group from its gridDim.y partial statistics, for every thread of the block.
__device__ __forceinline__ float2 group_mean_rstd(const Stats* __restrict__ partial, float eps) {
  __shared__ float mean_rstd[2];
  if (threadIdx.x < 32) {
    Stats s = threadIdx.x < gridDim.y ? partial[threadIdx.x] : Stats{0.f, 0.f, 0.f};
    s = warp_merge(s);
    if (threadIdx.x == 0) {
      mean_rstd[0] = s.mean;
      mean_rstd[1] = 1.f / sqrtf(s.m2 / s.n + eps);
    }
  }
  __syncthreads();
  return make_float2(mean_rstd[0], mean_rstd[1]);
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

// The element j of a group (in the group's storage order) and its channel within the group.
template <bool CHANNELS_LAST>
struct GroupIndex {
  int64_t base;  // offset of the group's first element
  int64_t C, S, cpg;
  __device__ __forceinline__ int64_t offset(int64_t j) const {
    return CHANNELS_LAST ? base + (j / cpg) * C + j % cpg : base + j;
  }
  __device__ __forceinline__ int64_t channel(int64_t j) const {
    return CHANNELS_LAST ? j % cpg : j / S;
  }
};

template <bool CHANNELS_LAST>
__device__ __forceinline__ GroupIndex<CHANNELS_LAST> group_index(int64_t bg, int64_t C, int64_t S,
                                                                 int64_t G) {
  const int64_t b = bg / G, c0 = (bg % G) * (C / G);
  const int64_t base = CHANNELS_LAST ? b * S * C + c0 : (b * C + c0) * S;
  return {base, C, S, C / G};
}

template <typename scalar_t, bool CHANNELS_LAST>
__device__ __forceinline__ float load_h(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ res, int residual_kind,
                                        const GroupIndex<CHANNELS_LAST>& g, int64_t bg, int64_t G,
                                        int64_t j, int64_t i) {
  float v = static_cast<float>(x[i]);
  if (residual_kind == static_cast<int>(ResidualKind::kPerChannel)) {
    const int64_t b = bg / G, c = (bg % G) * g.cpg + g.channel(j);
    v += static_cast<float>(res[b * g.C + c]);
  } else if (residual_kind == static_cast<int>(ResidualKind::kFull)) {
    v += static_cast<float>(res[i]);
  }
  return v;
}

template <typename scalar_t, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                 int residual_kind, int64_t C, int64_t S, int64_t G, int64_t chunk,
                 Stats* __restrict__ partial) {
  const int64_t bg = blockIdx.x;
  const auto g = group_index<CHANNELS_LAST>(bg, C, S, G);
  const int64_t start = blockIdx.y * chunk, stop = start + chunk, n = g.cpg * S;
  const int64_t end = stop < n ? stop : n;
  Stats s{0.f, 0.f, 0.f};
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const float v = load_h(x, res, residual_kind, g, bg, G, j, g.offset(j));
    s.n += 1.f;
    const float d = v - s.mean;
    s.mean += d / s.n;
    s.m2 += d * (v - s.mean);
  }
  store_block_stats(s, partial + bg * gridDim.y + blockIdx.y);
}

template <typename scalar_t, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                 int residual_kind, const scalar_t* __restrict__ scale_shift,
                 const float* __restrict__ weight, const float* __restrict__ bias,
                 scalar_t* __restrict__ y, int64_t C, int64_t S, int64_t G, int64_t chunk,
                 const Stats* __restrict__ partial, float eps) {
  const int64_t bg = blockIdx.x;
  const auto g = group_index<CHANNELS_LAST>(bg, C, S, G);
  const float2 mr = group_mean_rstd(partial + bg * gridDim.y, eps);
  const float mean = mr.x, rstd = mr.y;
  const int64_t b = bg / G, c0 = (bg % G) * g.cpg;
  const int64_t start = blockIdx.y * chunk, stop = start + chunk, n = g.cpg * S;
  const int64_t end = stop < n ? stop : n;
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const int64_t i = g.offset(j), c = c0 + g.channel(j);
    float v = load_h(x, res, residual_kind, g, bg, G, j, i);
    v = (v - mean) * (weight[c] * rstd) + bias[c];
    if (scale_shift != nullptr) {
      v = v * (1.f + static_cast<float>(scale_shift[b * 2 * C + c])) +
          static_cast<float>(scale_shift[b * 2 * C + C + c]);
    }
    y[i] = static_cast<scalar_t>(silu(v));
  }
}

// --- the vector path -----------------------------------------------------------------------

template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// A group whose elements j (storage order, j % V == 0) start 16-byte runs of one memory row: V
// positions of one channel (NCHW) or V channels of one position (channels_last). 32-bit index
// arithmetic: the group has fewer than 2^31 elements.
template <bool CHANNELS_LAST>
struct VecGroup {
  int64_t base, C;
  uint32_t S, cpg;
  __device__ __forceinline__ int64_t offset(uint32_t j) const {
    return CHANNELS_LAST ? base + static_cast<int64_t>(j / cpg) * C + j % cpg : base + j;
  }
  // the channel (within the group) of the run's first element
  __device__ __forceinline__ uint32_t channel(uint32_t j) const {
    return CHANNELS_LAST ? j % cpg : j / S;
  }
};

template <bool CHANNELS_LAST>
__device__ __forceinline__ VecGroup<CHANNELS_LAST> vec_group(int64_t bg, int64_t C, int64_t S,
                                                             int64_t G) {
  const auto g = group_index<CHANNELS_LAST>(bg, C, S, G);
  return {g.base, C, static_cast<uint32_t>(S), static_cast<uint32_t>(g.cpg)};
}

// h = x (+ residual) for the V elements of the run at group element j (memory offset i).
template <typename T, bool CHANNELS_LAST>
__device__ __forceinline__ void load_run(const T* __restrict__ x, const T* __restrict__ res,
                                         int residual_kind, const VecGroup<CHANNELS_LAST>& g,
                                         int64_t b, int64_t c0, uint32_t j, int64_t i,
                                         float (&h)[Vec<T>::kSize]) {
  constexpr int V = Vec<T>::kSize;
  const Vec<T> xv = *reinterpret_cast<const Vec<T>*>(x + i);
#pragma unroll
  for (int k = 0; k < V; ++k) h[k] = static_cast<float>(xv.v[k]);
  if (residual_kind == static_cast<int>(ResidualKind::kFull)) {
    const Vec<T> rv = *reinterpret_cast<const Vec<T>*>(res + i);
#pragma unroll
    for (int k = 0; k < V; ++k) h[k] += static_cast<float>(rv.v[k]);
  } else if (residual_kind == static_cast<int>(ResidualKind::kPerChannel)) {
    const T* r = res + b * g.C + c0 + g.channel(j);
#pragma unroll
    for (int k = 0; k < V; ++k) h[k] += static_cast<float>(r[CHANNELS_LAST ? k : 0]);
  }
}

template <typename T, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads)
    stats_vec_kernel(const T* __restrict__ x, const T* __restrict__ res, int residual_kind,
                     int64_t C, int64_t S, int64_t G, int64_t chunk, Stats* __restrict__ partial) {
  constexpr int V = Vec<T>::kSize;
  const int64_t bg = blockIdx.x, b = bg / G, c0 = (bg % G) * (C / G);
  const auto g = vec_group<CHANNELS_LAST>(bg, C, S, G);
  const uint32_t n = g.cpg * g.S, start = blockIdx.y * chunk;
  const uint32_t end = start + chunk < n ? start + chunk : n;
  Stats s{0.f, 0.f, 0.f};
  for (uint32_t j = start + threadIdx.x * V; j < end; j += kThreads * V) {
    float h[V];
    load_run<T, CHANNELS_LAST>(x, res, residual_kind, g, b, c0, j, g.offset(j), h);
    // the run's own (count, mean, M2), merged in: one division per run
    float sum = 0.f, m2 = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) sum += h[k];
    const float mean = sum * (1.f / V);  // exact: V is a power of two
#pragma unroll
    for (int k = 0; k < V; ++k) m2 += (h[k] - mean) * (h[k] - mean);
    s = merge(s, Stats{static_cast<float>(V), mean, m2});
  }
  store_block_stats(s, partial + bg * gridDim.y + blockIdx.y);
}

template <typename T, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads)
    apply_vec_kernel(const T* __restrict__ x, const T* __restrict__ res, int residual_kind,
                     const T* __restrict__ scale_shift, const float* __restrict__ weight,
                     const float* __restrict__ bias, T* __restrict__ y, int64_t C, int64_t S,
                     int64_t G, int64_t chunk, const Stats* __restrict__ partial, float eps) {
  constexpr int V = Vec<T>::kSize;
  const int64_t bg = blockIdx.x, b = bg / G, c0 = (bg % G) * (C / G);
  const auto g = vec_group<CHANNELS_LAST>(bg, C, S, G);
  const float2 mr = group_mean_rstd(partial + bg * gridDim.y, eps);
  const float mean = mr.x, rstd = mr.y;
  const uint32_t n = g.cpg * g.S, start = blockIdx.y * chunk;
  const uint32_t end = start + chunk < n ? start + chunk : n;
  for (uint32_t j = start + threadIdx.x * V; j < end; j += kThreads * V) {
    const int64_t i = g.offset(j), c_first = c0 + g.channel(j);
    float h[V];
    load_run<T, CHANNELS_LAST>(x, res, residual_kind, g, b, c0, j, i, h);
    Vec<T> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = c_first + (CHANNELS_LAST ? k : 0);
      float v = (h[k] - mean) * (weight[c] * rstd) + bias[c];
      if (scale_shift != nullptr) {
        v = v * (1.f + static_cast<float>(scale_shift[b * 2 * C + c])) +
            static_cast<float>(scale_shift[b * 2 * C + C + c]);
      }
      out.v[k] = static_cast<T>(silu(v));
    }
    *reinterpret_cast<Vec<T>*>(y + i) = out;
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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
  const int64_t groups_total = a.batch * a.groups, group_size = a.channels_per_group() * a.spatial;
  if (out.numel() == 0) return out;

  const int64_t V = 16 / static_cast<int64_t>(x.element_size());
  const bool vector =
      group_size < (int64_t{1} << 31) &&
      (a.channels_last ? a.channels % V == 0 && a.channels_per_group() % V == 0
                       : a.spatial % V == 0) &&
      aligned16(a.x.const_data_ptr()) && aligned16(out.const_data_ptr()) &&
      (a.residual_kind != ResidualKind::kFull || aligned16(a.residual.const_data_ptr()));
  // enough blocks for ~4 waves of the SMs, but no slice under 2048 elements; on the vector path
  // slices start on a run (chunk % V == 0)
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::max<int64_t>(1, (4 * sms + groups_total - 1) / groups_total);
  splits = std::min({splits, static_cast<int64_t>(kMaxSplits), (group_size + 2047) / 2048});
  splits = std::max<int64_t>(splits, 1);
  int64_t chunk = (group_size + splits - 1) / splits;
  if (vector) chunk = (chunk + V - 1) / V * V;
  splits = (group_size + chunk - 1) / chunk;  // no empty slice
  TORCH_CHECK(groups_total < (int64_t{1} << 31), "fastdiff::group_norm_silu_fwd: too many groups");

  at::Tensor partial =
      at::empty({groups_total * splits * 3}, x.options().dtype(at::kFloat));
  Stats* partial_ptr = reinterpret_cast<Stats*>(partial.mutable_data_ptr<float>());
  const dim3 grid(static_cast<unsigned>(groups_total), static_cast<unsigned>(splits));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int residual_kind = static_cast<int>(a.residual_kind);

  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "fastdiff::group_norm_silu_fwd", [&] {
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const scalar_t* rp = a.residual.defined() ? a.residual.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ssp =
        a.scale_shift.defined() ? a.scale_shift.const_data_ptr<scalar_t>() : nullptr;
    const float* wp = a.weight.const_data_ptr<float>();
    const float* bp = a.bias.const_data_ptr<float>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const auto launch = [&](auto channels_last) {
      constexpr bool CL = decltype(channels_last)::value;
      const auto stats = vector ? stats_vec_kernel<scalar_t, CL> : stats_kernel<scalar_t, CL>;
      const auto apply = vector ? apply_vec_kernel<scalar_t, CL> : apply_kernel<scalar_t, CL>;
      stats<<<grid, kThreads, 0, stream>>>(xp, rp, residual_kind, a.channels, a.spatial,
                                           a.groups, chunk, partial_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      apply<<<grid, kThreads, 0, stream>>>(xp, rp, residual_kind, ssp, wp, bp, yp, a.channels,
                                           a.spatial, a.groups, chunk, partial_ptr, a.eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (a.channels_last) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("group_norm_silu_fwd", &group_norm_silu_cuda); }

}  // namespace fastdiff
