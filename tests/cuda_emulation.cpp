// fastdiff's CUDA step and noise kernels (csrc/step_kernels.cuh) compiled for the host, so that
// tests on a machine without a GPU run their indexing, tiling, grid-stride loops and barriers.
// It is a check of the kernels' logic, not of the GPU: no warps, no memory model, no timing, and
// the noise's logf/sincosf are glibc's (<= 1 ulp) instead of CUDA's (<= 2 ulp).
//
// A launch runs its blocks one after another; each block's 256 CUDA threads are OS threads, so
// a __shared__ array (a function static here) belongs to the running block and __syncthreads()
// is a real barrier. The barrier reports, instead of hanging: threads of a block waiting at
// different __syncthreads() calls, and a thread that returns while others wait. Operands are
// copied into buffers with guard elements on either side (NaN before reads, so an
// out-of-bounds read poisons the result; a bit pattern before writes, checked afterwards).
//
// torch.ops.fastdiff_emulation.step / gaussian_ take fastdiff::step's / gaussian_'s arguments
// (CPU tensors) plus: kernel ("auto": step_cuda.cu's choice; or "vector", "tile", "block" where
// that kernel takes the problem), grid (blocks; 0: one thread per unit of work, as the real
// launcher sizes small problems) and offset (elements by which every operand is moved off its
// 16-byte-aligned position: 0 or 1; with 1 only the block kernels take the problem).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "group_norm_silu.h"
#include "philox.h"
#include "step.h"

// --- the CUDA built-ins the kernels use --------------------------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fdividef(float a, float b) { return a / b; }  // the hardware's: to 2 ulp
inline float __expf(float a) { return std::exp(a); }

thread_local uint3 threadIdx, blockIdx;
uint3 blockDim, gridDim;

namespace emulation {

std::mutex error_mutex;
std::string first_error;

void report(const std::string& what) {
  const std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) {
    first_error = what + " (block " + std::to_string(blockIdx.x) + ", thread " +
                  std::to_string(threadIdx.x) + ")";
  }
}

// A barrier of `threads` emulated threads (a block's for __syncthreads(), a warp's for its
// shuffles, a cluster's for cluster.sync()). A phase completes when every thread has arrived at
// the same call (by source line); a thread that leaves the kernel, or arrives at another line,
// while a phase is open breaks the barrier (reported; the phase is released so the launch ends).
class Barrier {
 public:
  Barrier(int threads, const char* name) : threads_(threads), name_(name) {}

  void arrive(int line) {
    std::unique_lock<std::mutex> lock(m_);
    if (broken_) return;
    if (waiting_ == 0) line_ = line;
    if (line != line_) {
      fail(" at lines " + std::to_string(line_) + " and " + std::to_string(line) +
           " in one phase (divergent barrier)");
      return;
    }
    const uint64_t phase = phase_;
    if (++waiting_ + exited_ == threads_) {
      if (exited_ > 0) {
        fail(" that some threads never reach (they returned)");
        return;
      }
      waiting_ = 0;
      ++phase_;
      cv_.notify_all();
      return;
    }
    const bool released = cv_.wait_for(lock, std::chrono::seconds(20),
                                       [&] { return phase_ != phase || broken_; });
    if (!released) {
      fail(" still waiting after 20 s (" + std::to_string(waiting_) + " of " +
           std::to_string(threads_) + " threads arrived at line " + std::to_string(line_) + ", " +
           std::to_string(exited_) + " returned)");
    }
  }

  void exit() {
    const std::lock_guard<std::mutex> lock(m_);
    if (++exited_ + waiting_ == threads_ && waiting_ > 0 && !broken_) {
      fail(" that some threads never reach (they returned)");
    }
  }

 private:
  void fail(const std::string& what) {  // m_ held
    report(name_ + what);
    broken_ = true;
    cv_.notify_all();
  }

  const int threads_;
  const std::string name_;
  std::mutex m_;
  std::condition_variable cv_;
  int waiting_ = 0, exited_ = 0, line_ = 0;
  uint64_t phase_ = 0;
  bool broken_ = false;
};

constexpr int kWarp = 32;
constexpr int64_t kMaxTile = 256 * 8;  // elements: step_kernels.cuh's 16-bit tiles

struct Warp {
  Barrier barrier{kWarp, "__shfl_xor_sync()"};
  float lanes[kWarp] = {};
};

struct Block {
  explicit Block(int threads)
      : barrier(threads, "__syncthreads()"), warps(new Warp[(threads + kWarp - 1) / kWarp]) {}
  Barrier barrier;
  std::unique_ptr<Warp[]> warps;
};

// The blocks of one thread block cluster, running at once: their barrier, and the __shared__
// variables they have offered to each other (map_shared_rank), by block rank and size.
struct Cluster {
  Cluster(int blocks, int threads) : size(blocks), barrier(blocks * threads, "cluster.sync()") {}
  const int size;
  Barrier barrier;
  std::mutex m;
  std::condition_variable cv;
  std::map<std::pair<int, size_t>, void*> shared;
};

thread_local Block* block = nullptr;  // the calling thread's
thread_local Cluster* cluster = nullptr;
thread_local int cluster_rank = 0;

// v of lane (this lane ^ lane_mask) of the calling thread's warp; every lane must take part.
inline float shfl_xor(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) report("__shfl_xor_sync with a partial mask (not emulated)");
  Warp& w = block->warps[threadIdx.x / kWarp];
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  w.lanes[lane] = v;
  w.barrier.arrive(0);
  const float out = w.lanes[(lane ^ lane_mask) % kWarp];
  w.barrier.arrive(1);  // every lane has read before the next shuffle writes
  return out;
}

// The block of cluster rank `rank`'s copy of the __shared__ variable *p of the calling block:
// each block offers its own when it first maps, and waits (up to 20 s) for the other's.
template <typename T>
T* map_shared(T* p, unsigned rank) {
  Cluster& c = *cluster;
  std::unique_lock<std::mutex> lock(c.m);
  // told apart by size: each rank's copy of the kernels has its own types
  const size_t type = sizeof(T);
  const auto [mine, added] = c.shared.emplace(std::pair{cluster_rank, type}, p);
  if (!added && mine->second != p) {
    report("map_shared_rank of two __shared__ variables of one size (not emulated)");
  }
  c.cv.notify_all();
  if (static_cast<int>(rank) >= c.size) {
    report("map_shared_rank(" + std::to_string(rank) + ") in a cluster of " +
           std::to_string(c.size) + " blocks");
    return p;
  }
  const auto key = std::pair{static_cast<int>(rank), type};
  if (!c.cv.wait_for(lock, std::chrono::seconds(20), [&] { return c.shared.count(key) > 0; })) {
    report("map_shared_rank(" + std::to_string(rank) + "): that block never maps its variable");
    return p;
  }
  return static_cast<T*>(c.shared[key]);
}

// Runs body(rank) as a grid of `grid` blocks of `threads` CUDA threads in clusters of
// `cluster_size` consecutive blocks (rank: the block's index in its cluster). Clusters run one
// after another, the blocks of one at once. The first error reported in a launch (a barrier, a
// device assertion) becomes an exception.
template <typename Body>
void launch(int grid, int threads, int cluster_size, const Body& body) {
  TORCH_CHECK(cluster_size >= 1 && grid % cluster_size == 0, "a grid of ", grid,
              " blocks does not split into clusters of ", cluster_size);
  first_error.clear();
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (int first = 0; first < grid; first += cluster_size) {
    Cluster shared_by(cluster_size, threads);
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(cluster_size) * threads);
    for (int rank = 0; rank < cluster_size; ++rank) {
      blocks.push_back(std::make_unique<Block>(threads));
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, rank, t, mine = blocks.back().get()] {
          blockIdx = {static_cast<unsigned>(first + rank), 0, 0};
          threadIdx = {static_cast<unsigned>(t), 0, 0};
          block = mine;
          cluster = &shared_by;
          cluster_rank = rank;
          body(rank);
          mine->barrier.exit();
          mine->warps[t / kWarp].barrier.exit();
          shared_by.barrier.exit();
        });
      }
    }
    for (std::thread& th : pool) th.join();
  }
  TORCH_CHECK(first_error.empty(), "emulated CUDA kernel: ", first_error);
}

template <typename Body>
void launch(int grid, int threads, const Body& body) {
  launch(grid, threads, 1, [&](int) { body(); });
}

// Guard elements before an operand (keeps 16-byte alignment for every dtype) and after it (one
// tile of the largest: a partial tile's stores past the end land in it).
constexpr int64_t kGuard = 64, kGuardAfter = kMaxTile;

// A copy of dense `t` (same strides) inside a flat buffer with kGuard + offset elements before
// it and kGuardAfter after, the guards filled with `fill_bits` (per byte).
struct Guarded {
  at::Tensor buffer, view;
  int64_t begin = 0, size = 0;  // the view's storage, in elements of the buffer

  Guarded(const at::Tensor& t, int64_t offset, int fill_bits) {
    size = t.numel();
    begin = kGuard + offset;
    buffer = at::empty({begin + size + kGuardAfter}, t.options());
    std::memset(buffer.data_ptr(), fill_bits, buffer.nbytes());
    view = buffer.as_strided(t.sizes(), t.strides(), begin);
    view.copy_(t);
  }

  // Whether the guards still hold `fill_bits` in every byte.
  bool intact(int fill_bits) const {
    const auto* bytes = static_cast<const unsigned char*>(buffer.data_ptr());
    const int64_t item = buffer.element_size();
    for (int64_t i = 0; i < buffer.numel(); ++i) {
      if (i >= begin && i < begin + size) continue;
      for (int64_t k = 0; k < item; ++k)
        if (bytes[i * item + k] != static_cast<unsigned char>(fill_bits)) return false;
    }
    return true;
  }
};

constexpr int kReadGuard = 0xFF;   // NaN in every float dtype
constexpr int kWriteGuard = 0x5A;  // a finite value in every float dtype

std::optional<Guarded> guard_input(const std::optional<at::Tensor>& t, int64_t offset) {
  if (!t) return std::nullopt;
  return Guarded(*t, offset, kReadGuard);
}

std::optional<at::Tensor> view_of(const std::optional<Guarded>& g) {
  if (!g) return std::nullopt;
  return g->view;
}

}  // namespace emulation

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() emulation::block->barrier.arrive(__LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) emulation::shfl_xor(mask, v, lane_mask)
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) emulation::report("device assertion `" #cond "` failed")

// The cluster API of cooperative groups that the kernels use.
namespace cooperative_groups {
struct cluster_group {
  void sync() const { emulation::cluster->barrier.arrive(0); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return emulation::map_shared(p, rank);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// philox.h's normals() for the device, with the host's libm in place of CUDA's.
namespace fastdiff {
namespace philox {
inline float4 normals(Words w) {
  const float r01 = __fsqrt_rn(-2.0f * std::log(unit(w.w0)));
  const float r23 = __fsqrt_rn(-2.0f * std::log(unit(w.w2)));
  float s01, c01, s23, c23;
  ::sincosf(angle(w.w1), &s01, &c01);
  ::sincosf(angle(w.w3), &s23, &c23);
  return make_float4(__fmul_rn(r01, c01), __fmul_rn(r01, s01), __fmul_rn(r23, c23),
                     __fmul_rn(r23, s23));
}
}  // namespace philox
}  // namespace fastdiff

#include "step_kernels.cuh"

namespace fastdiff {
namespace step {
namespace {

using namespace emulation;
using namespace gpu;

const char* kernel_name(StepKernel k) {
  return k == StepKernel::kVector ? "vector" : k == StepKernel::kTile ? "tile" : "block";
}

int blocks_for(int64_t grid, int64_t units) {
  TORCH_CHECK(grid >= 0, "grid must be >= 0 blocks (0: one thread per unit), got ", grid);
  const int64_t n = grid > 0 ? grid : (units + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(n, 1));
}

at::Tensor emulated_step(const at::Tensor& x, const at::Tensor& y,
                         const std::optional<at::Tensor>& y_uncond,
                         const std::optional<at::Tensor>& h0,
                         const std::optional<at::Tensor>& h1, const at::Tensor& table,
                         const at::Tensor& counter, int64_t seed, int64_t sample_offset,
                         double guidance, std::optional<at::ArrayRef<double>> clamp,
                         bool stochastic, const std::optional<at::Tensor>& nonfinite,
                         c10::string_view kernel, int64_t grid, int64_t offset) {
  const Problem pr = check_step_inputs(x, y, y_uncond, h0, h1, table, counter, sample_offset,
                                       guidance, clamp, stochastic, nonfinite);
  TORCH_CHECK(x.device().is_cpu(), "the emulation runs on CPU tensors, got ", x.device());
  TORCH_CHECK(offset == 0 || offset == 1, "offset must be 0 or 1, got ", offset);
  const Guarded gx(x, offset, kReadGuard), gy(y, offset, kReadGuard);
  const std::optional<Guarded> gyu = guard_input(y_uncond, offset);
  std::optional<Guarded> gh0, gh1;
  if (h0) gh0.emplace(*h0, offset, kWriteGuard);
  if (h1) gh1.emplace(*h1, offset, kWriteGuard);
  Guarded gout(at::empty_like(x), offset, kWriteGuard);
  if (x.numel() == 0) return gout.view.clone();
  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "emulated step", [&] {
    using T = scalar_t;
    const Args<T> a = make_args<T>(gx.view, gy.view, view_of(gyu), view_of(gh0), view_of(gh1),
                                   gout.view, table, counter, nonfinite, seed, sample_offset, pr);
    const StepKernel chosen = step_kernel_for<T>(pr, a);
    StepKernel k = chosen;
    if (kernel == "block") {
      k = StepKernel::kBlock;  // takes any problem
    } else if (kernel != "auto") {
      TORCH_CHECK(kernel == kernel_name(chosen), "the ", std::string(kernel),
                  " kernel does not take this problem (step_cuda.cu picks the ",
                  kernel_name(chosen), " kernel); valid: auto, block, ", kernel_name(chosen));
    }
    switch (k) {
      case StepKernel::kVector: {
        const int64_t units = pr.batch * pr.positions / Pack<T>::kSize;
        emulation::launch(blocks_for(grid, units), kThreads, [&] { step_vector_kernel<T>(a); });
        break;
      }
      case StepKernel::kTile:
        emulation::launch(blocks_for(grid, tile_count<T>(pr) * kThreads), kThreads,
                          [&] { step_tile_kernel<T>(a); });
        break;
      case StepKernel::kBlock: {
        const int64_t units = pr.batch * ((pr.per_sample() + 3) / 4);
        emulation::launch(blocks_for(grid, units), kThreads, [&] { step_block_kernel<T>(a); });
        break;
      }
    }
  });
  TORCH_CHECK(gout.intact(kWriteGuard), "emulated CUDA kernel wrote outside x_next");
  if (gh0) {
    TORCH_CHECK(gh0->intact(kWriteGuard), "emulated CUDA kernel wrote outside h0");
    h0->copy_(gh0->view);
  }
  if (gh1) {
    TORCH_CHECK(gh1->intact(kWriteGuard), "emulated CUDA kernel wrote outside h1");
    h1->copy_(gh1->view);
  }
  return gout.view.clone();
}

void emulated_gaussian(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset,
                       double scale, c10::string_view kernel, int64_t grid, int64_t offset) {
  const Problem pr = check_gaussian_inputs(out, step, sample_offset);
  TORCH_CHECK(out.device().is_cpu(), "the emulation runs on CPU tensors, got ", out.device());
  TORCH_CHECK(offset == 0 || offset == 1, "offset must be 0 or 1, got ", offset);
  if (out.numel() == 0) return;
  Guarded g(out, offset, kWriteGuard);
  FASTDIFF_DISPATCH_FLOAT(out.scalar_type(), "emulated gaussian_", [&] {
    using T = scalar_t;
    T* o = g.view.mutable_data_ptr<T>();
    const auto seed64 = static_cast<uint64_t>(seed);
    const auto s = static_cast<uint32_t>(step);
    const auto fscale = static_cast<float>(scale);
    const bool tile = gaussian_tiled<T>(pr, o);
    TORCH_CHECK(kernel == "auto" || kernel == (tile ? "tile" : "block"), "the ",
                std::string(kernel), " kernel does not take this output; valid: auto, ",
                tile ? "tile" : "block");
    if (tile) {
      emulation::launch(blocks_for(grid, tile_count<T>(pr) * kThreads), kThreads, [&] {
        gaussian_tile_kernel<T>(o, seed64, s, sample_offset, fscale, pr.batch, pr.positions,
                                pr.channels);
      });
    } else {
      const bool quad = gaussian_quad<T>(pr, o);
      emulation::launch(blocks_for(grid, pr.batch * ((pr.per_sample() + 3) / 4)), kThreads, [&] {
        gaussian_kernel<T>(o, seed64, s, sample_offset, fscale, pr.batch, pr.positions,
                           pr.channels, quad);
      });
    }
  });
  TORCH_CHECK(g.intact(kWriteGuard), "emulated CUDA kernel wrote outside out");
  out.copy_(g.view);
}

// A kernel with a chosen fault, each of which the emulation must report: 0 none (out[i] = in[i]
// times the shared-memory value of the next thread of the block, (i + 1) % kThreads), 1 a thread
// returns before a barrier, 2 threads wait at two different barriers, 3 a write past the end,
// 4 a failed device assertion, 5 a read past the end (of `in`: out's last value is NaN).
void fault_kernel(int fault, const float* in, float* out, int64_t n) {
  __shared__ float ring[kThreads];
  const int t = static_cast<int>(threadIdx.x);
  ring[t] = static_cast<float>(t);
  if (fault == 1 && t == 0) return;
  if (fault == 2 && t == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  CUDA_KERNEL_ASSERT(fault != 4);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  if (i < n) out[fault == 3 ? i + 1 : i] = in[fault == 5 ? i + 1 : i] * ring[(t + 1) % kThreads];
}

at::Tensor emulated_fault(int64_t fault, int64_t n) {
  TORCH_CHECK(fault >= 0 && fault <= 5, "fault must be 0..5, got ", fault);
  const Guarded in(at::ones({n}, at::kFloat), 0, kReadGuard);
  Guarded out(at::empty({n}, at::kFloat), 0, kWriteGuard);
  const float* i = in.view.const_data_ptr<float>();
  float* o = out.view.mutable_data_ptr<float>();
  emulation::launch(blocks_for(0, n), kThreads,
                    [&] { fault_kernel(static_cast<int>(fault), i, o, n); });
  TORCH_CHECK(out.intact(kWriteGuard), "emulated CUDA kernel wrote outside out");
  return out.view.clone();
}

}  // namespace
}  // namespace step

// group_norm_silu_kernels.cuh once per rank of a cluster of up to 8 blocks: the __shared__
// variables of each copy are those of the blocks of that rank.
#define FASTDIFF_EMULATED_CLUSTERS 1
#define FASTDIFF_FOR_RANKS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
namespace gn0 {
#include "group_norm_silu_kernels.cuh"
}
namespace gn1 {
#include "group_norm_silu_kernels.cuh"
}
namespace gn2 {
#include "group_norm_silu_kernels.cuh"
}
namespace gn3 {
#include "group_norm_silu_kernels.cuh"
}
namespace gn4 {
#include "group_norm_silu_kernels.cuh"
}
namespace gn5 {
#include "group_norm_silu_kernels.cuh"
}
namespace gn6 {
#include "group_norm_silu_kernels.cuh"
}
namespace gn7 {
#include "group_norm_silu_kernels.cuh"
}

namespace {

using namespace emulation;

std::optional<at::Tensor> guarded_or_none(const at::Tensor& t, std::optional<Guarded>& g,
                                          int64_t offset) {
  if (!t.defined()) return std::nullopt;
  g.emplace(t, offset, kReadGuard);
  return g->view;
}

// the kernel parameters of each rank's copy, p0 .. p7, and the call of rank n's kernel
#define FASTDIFF_PARAMS(n)                                                   \
  const auto p##n = gn##n::make_params<T>(a, out, workspace,                 \
                                          {plan.splits, plan.chunk, plan.cache});
#define FASTDIFF_RANK(n)                                  \
  case n:                                                 \
    gn##n::group_norm_silu_kernel<T, CL, R, CACHE>(p##n); \
    break;

// fastdiff::group_norm_silu_fwd's CUDA kernels on CPU tensors, planned as group_norm_silu_cuda
// plans them (with clusters: the one-kernel path, groups split over up to 8 blocks of a cluster;
// without: the two-launch path where a group needs more than one block). Returns the output and
// the plan, [run, splits, chunk, cache].
std::tuple<at::Tensor, std::vector<int64_t>> emulated_group_norm_silu(
    const at::Tensor& x, int64_t num_groups, const at::Tensor& weight, const at::Tensor& bias,
    double eps, const std::optional<at::Tensor>& scale_shift,
    const std::optional<at::Tensor>& residual, bool clusters, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "the emulation runs on CPU tensors, got ", x.device());
  TORCH_CHECK(offset == 0 || offset == 1, "offset must be 0 or 1, got ", offset);
  // the operands as the CUDA op sees them (after check_group_norm_silu's conversions), copied
  // between guards
  const GroupNormSiluArgs given =
      check_group_norm_silu(x, num_groups, weight, bias, eps, scale_shift, residual);
  const Guarded gx(given.x, offset, kReadGuard), gw(given.weight, offset, kReadGuard),
      gb(given.bias, offset, kReadGuard);
  std::optional<Guarded> gss, gres;
  const GroupNormSiluArgs a = check_group_norm_silu(
      gx.view, num_groups, gw.view, gb.view, eps, guarded_or_none(given.scale_shift, gss, offset),
      guarded_or_none(given.residual, gres, offset));
  Guarded gout(at::empty_like(gx.view), offset, kWriteGuard);
  const at::Tensor& out = gout.view;
  const int64_t group_size = a.channels_per_group() * a.spatial;
  const int64_t run = gn0::run_length(a, out);
  const gn0::Plan plan = gn0::plan_launch(group_size, run, clusters);
  std::vector<int64_t> described{run, plan.splits, plan.chunk, plan.cache};
  if (out.numel() == 0) return {out.clone(), described};
  const int64_t blocks = a.batch * a.groups * plan.splits;
  TORCH_CHECK(blocks < (int64_t{1} << 20), "emulated group_norm_silu: ", blocks,
              " blocks are more than the emulation takes; use a smaller x");
  std::optional<Guarded> partial;
  if (plan.cache == 0) partial.emplace(at::empty({blocks * 3}, at::kFloat), 0, kWriteGuard);
  const at::Tensor workspace = partial ? partial->view : at::Tensor();
  const int grid = static_cast<int>(blocks);
  FASTDIFF_DISPATCH_FLOAT(x.scalar_type(), "emulated group_norm_silu", [&] {
    using T = scalar_t;
    FASTDIFF_FOR_RANKS(FASTDIFF_PARAMS)
    gn0::with_run<T>(a.channels_last, run, [&](auto cl, auto r) {
      constexpr bool CL = decltype(cl)::value;
      constexpr int R = decltype(r)::value;
      if (plan.cache == 0) {
        launch(grid, gn0::kThreads, [&] { gn0::group_norm_stats_kernel<T, CL, R>(p0); });
        launch(grid, gn0::kThreads, [&] { gn0::group_norm_apply_kernel<T, CL, R>(p0); });
        return;
      }
      gn0::with_cache<R>(plan.cache, [&](auto cache) {
        constexpr int CACHE = decltype(cache)::value;
        launch(grid, gn0::kThreads, static_cast<int>(plan.splits), [&](int rank) {
          switch (rank) {
            FASTDIFF_FOR_RANKS(FASTDIFF_RANK)
          }
        });
      });
    });
  });
  TORCH_CHECK(gout.intact(kWriteGuard), "emulated CUDA kernel wrote outside the output");
  TORCH_CHECK(!partial || partial->intact(kWriteGuard),
              "emulated CUDA kernel wrote outside the statistics workspace");
  return {out.clone(), described};
}

#undef FASTDIFF_PARAMS
#undef FASTDIFF_RANK

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY(fastdiff_emulation, m) {
  m.def(
      "step(Tensor x, Tensor y, Tensor? y_uncond, Tensor(a!)? h0, Tensor(b!)? h1, Tensor table, "
      "Tensor counter, int seed, int sample_offset, float guidance, float[]? clamp, "
      "bool stochastic, Tensor(c!)? nonfinite, str kernel, int grid, int offset) -> Tensor");
  m.def(
      "gaussian_(Tensor(a!) out, int seed, int step, int sample_offset, float scale, str kernel, "
      "int grid, int offset) -> ()");
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor weight, Tensor bias, float eps, "
      "Tensor? scale_shift, Tensor? residual, bool clusters, int offset) -> (Tensor, int[])");
  m.def("fault(int fault, int n) -> Tensor", &fastdiff::step::emulated_fault);
}

TORCH_LIBRARY_IMPL(fastdiff_emulation, CPU, m) {
  m.impl("step", &fastdiff::step::emulated_step);
  m.impl("gaussian_", &fastdiff::step::emulated_gaussian);
  m.impl("group_norm_silu", &fastdiff::emulated_group_norm_silu);
}
