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
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "philox.h"
#include "step.h"

// --- the CUDA built-ins the kernels use --------------------------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

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

// One block's barrier. A phase completes when every thread of the block has arrived at the same
// __syncthreads() (by source line); a thread that leaves the kernel, or arrives at another line,
// while a phase is open breaks the barrier (reported; the phase is released so the block ends).
class Barrier {
 public:
  explicit Barrier(int threads) : threads_(threads) {}

  void arrive(int line) {
    std::unique_lock<std::mutex> lock(m_);
    if (broken_) return;
    if (waiting_ == 0) line_ = line;
    if (line != line_) {
      fail("__syncthreads() at lines " + std::to_string(line_) + " and " + std::to_string(line) +
           " in one phase (divergent barrier)");
      return;
    }
    const uint64_t phase = phase_;
    if (++waiting_ + exited_ == threads_) {
      if (exited_ > 0) {
        fail("__syncthreads() that some threads of the block never reach (they returned)");
        return;
      }
      waiting_ = 0;
      ++phase_;
      cv_.notify_all();
      return;
    }
    const bool released = cv_.wait_for(lock, std::chrono::seconds(20),
                                       [&] { return phase_ != phase || broken_; });
    if (!released) fail("__syncthreads() still waiting after 20 s");
  }

  void exit() {
    const std::lock_guard<std::mutex> lock(m_);
    if (++exited_ + waiting_ == threads_ && waiting_ > 0 && !broken_) {
      fail("__syncthreads() that some threads of the block never reach (they returned)");
    }
  }

 private:
  void fail(const std::string& what) {  // m_ held
    report(what);
    broken_ = true;
    cv_.notify_all();
  }

  const int threads_;
  std::mutex m_;
  std::condition_variable cv_;
  int waiting_ = 0, exited_ = 0, line_ = 0;
  uint64_t phase_ = 0;
  bool broken_ = false;
};

Barrier* barrier = nullptr;  // the running block's

// Runs body() as a grid of `grid` blocks of `threads` CUDA threads; the first error reported
// in it (a barrier, a device assertion) becomes an exception.
template <typename Body>
void launch(int grid, int threads, const Body& body) {
  first_error.clear();
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (int b = 0; b < grid; ++b) {
    Barrier block_barrier(threads);
    barrier = &block_barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        blockIdx = {static_cast<unsigned>(b), 0, 0};
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        body();
        block_barrier.exit();
      });
    }
    for (std::thread& th : pool) th.join();
    barrier = nullptr;
  }
  TORCH_CHECK(first_error.empty(), "emulated CUDA kernel: ", first_error);
}

}  // namespace emulation

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() emulation::barrier->arrive(__LINE__)
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) emulation::report("device assertion `" #cond "` failed")

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

using namespace gpu;

// Guard elements before an operand (keeps 16-byte alignment for every dtype) and after it (one
// tile of the largest: a partial tile's stores past the end land in it).
constexpr int64_t kGuard = 64, kGuardAfter = kThreads * 8;

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

TORCH_LIBRARY(fastdiff_emulation, m) {
  m.def(
      "step(Tensor x, Tensor y, Tensor? y_uncond, Tensor(a!)? h0, Tensor(b!)? h1, Tensor table, "
      "Tensor counter, int seed, int sample_offset, float guidance, float[]? clamp, "
      "bool stochastic, Tensor(c!)? nonfinite, str kernel, int grid, int offset) -> Tensor");
  m.def(
      "gaussian_(Tensor(a!) out, int seed, int step, int sample_offset, float scale, str kernel, "
      "int grid, int offset) -> ()");
  m.def("fault(int fault, int n) -> Tensor", &emulated_fault);
}

TORCH_LIBRARY_IMPL(fastdiff_emulation, CPU, m) {
  m.impl("step", &emulated_step);
  m.impl("gaussian_", &emulated_gaussian);
}

}  // namespace step
}  // namespace fastdiff
