// The CUDA kernels of fastdiff::step and fastdiff::gaussian_ (step_cuda.cu launches them), and
// the host-side choice of kernel for a call. Apart from the CUDA runtime's built-ins (threadIdx,
// __syncthreads, float4, ...) this header uses nothing of CUDA's, so that a test can compile it
// for the host under a thread-per-CUDA-thread emulation (tests/cuda_emulation.cpp)
// and check the kernels' indexing on a machine without a GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "philox.h"
#include "step.h"

namespace fastdiff {
namespace step {
namespace gpu {

template <typename T>
struct Args {
  const T* x;  // h0/h1 overlap no other operand (check_step_inputs)
  const T* y;
  const T* yu;
  T* h0;
  T* h1;
  T* out;
  const void* table;
  bool table_double;
  int64_t rows;
  const int64_t* counter;
  int32_t* nonfinite;  // nullptr, or one flag per row: set to 1 where x_next is not finite
  uint64_t seed;
  int64_t sample_offset;
  float guidance, lo, hi;
  bool guided, has_h0, has_h1, noise;
  int64_t batch, positions, channels;  // memory (B, P, C); logical e = c * P + p
};

constexpr int kThreads = 256;

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Row device_row(const Args<T>& a, uint32_t& step) {
  int64_t index = *a.counter;
  CUDA_KERNEL_ASSERT(index >= 0 && index < a.rows);
  index = index < 0 ? 0 : (index >= a.rows ? a.rows - 1 : index);
  step = static_cast<uint32_t>(index + 1);
  Row r = a.table_double
              ? load_row(static_cast<const double*>(a.table) + index * kNumCoef, a.guidance,
                         a.lo, a.hi)
              : load_row(static_cast<const float*>(a.table) + index * kNumCoef, a.guidance, a.lo,
                         a.hi);
  if (!a.noise) r.z = 0.0f;
  return r;
}

// One element at memory index i with noise value z; returns whether x_next is not finite.
template <typename T>
__device__ __forceinline__ bool apply(const Args<T>& a, const Row& r, int64_t i, float z) {
  const float h0 = a.has_h0 ? static_cast<float>(a.h0[i]) : 0.0f;
  const float h1 = a.has_h1 ? static_cast<float>(a.h1[i]) : 0.0f;
  const float yu = a.guided ? static_cast<float>(a.yu[i]) : 0.0f;
  float nh0, nh1;
  const float xn = update(r, static_cast<float>(a.x[i]), static_cast<float>(a.y[i]), yu, h0, h1,
                          z, nh0, nh1, a.guided, a.has_h0, a.has_h1);
  const T out = static_cast<T>(xn);
  a.out[i] = out;
  if (a.has_h0 && r.w[0]) a.h0[i] = static_cast<T>(nh0);
  if (a.has_h1 && r.w[1]) a.h1[i] = static_cast<T>(nh1);
  return nonfinite_bits(out);
}

// Every thread that wrote a non-finite x_next sets the row's flag (the same value: no order
// needed).
template <typename T>
__device__ __forceinline__ void flag(const Args<T>& a, uint32_t step, bool bad) {
  if (bad && a.nonfinite != nullptr) a.nonfinite[step - 1] = 1;
}

template <typename T>
__device__ __forceinline__ Pack<T> load(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T>*>(p + i);
}

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, const Pack<T>& v) {
  *reinterpret_cast<Pack<T>*>(p + i) = v;
}

// The update of the V elements at memory [i, i + V) (16-byte aligned) with noise z[0 .. V);
// returns whether one of x_next's is not finite.
template <typename T>
__device__ __forceinline__ bool apply_pack(const Args<T>& a, const Row& r, int64_t i,
                                           const float (&z)[Pack<T>::kSize]) {
  constexpr int V = Pack<T>::kSize;
  const Pack<T> x = load(a.x, i), y = load(a.y, i);
  Pack<T> yu{}, h0{}, h1{}, out;
  if (a.guided) yu = load(a.yu, i);
  if (a.has_h0) h0 = load(a.h0, i);
  if (a.has_h1) h1 = load(a.h1, i);
  bool bad = false;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float nh0, nh1;
    const float xn = update(r, static_cast<float>(x.v[k]), static_cast<float>(y.v[k]),
                            static_cast<float>(yu.v[k]), static_cast<float>(h0.v[k]),
                            static_cast<float>(h1.v[k]), z[k], nh0, nh1, a.guided, a.has_h0,
                            a.has_h1);
    out.v[k] = static_cast<T>(xn);
    h0.v[k] = static_cast<T>(nh0);
    h1.v[k] = static_cast<T>(nh1);
    bad |= nonfinite_bits(out.v[k]);
  }
  store(a.out, i, out);
  if (a.has_h0 && r.w[0]) store(a.h0, i, h0);
  if (a.has_h1 && r.w[1]) store(a.h1, i, h1);
  return bad;
}

// Contiguous, per-sample size a multiple of V, every pointer 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(kThreads) step_vector_kernel(const Args<T> a) {
  constexpr int V = Pack<T>::kSize;
  uint32_t s;
  const Row r = device_row(a, s);
  const bool noise = r.z != 0.0f;  // uniform: every thread reads the same row
  const int64_t per_sample = a.positions, nvec = a.batch * per_sample / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += stride) {
    const int64_t i = v * V, b = i / per_sample, e = i - b * per_sample;
    float z[V];
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float4 n = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (noise) {
        n = philox::normals(philox::block_words(
            a.seed, static_cast<uint32_t>(e / 4 + q), static_cast<uint32_t>(a.sample_offset + b),
            s));
      }
      z[4 * q] = n.x;
      z[4 * q + 1] = n.y;
      z[4 * q + 2] = n.z;
      z[4 * q + 3] = n.w;
    }
    bad |= apply_pack(a, r, i, z);
  }
  flag(a, s, bad);
}

// A tile of a channels_last sample (C = 2^k channels, C <= kTile / 4, P % 4 == 0) is kTile / C
// whole positions of all its channels from position p0 (a multiple of 4): kTile contiguous
// elements of memory. The block draws the tile's noise per channel along logical e = c P + p
// (Philox blocks of 4 positions) and stores it transposed, in memory order (p C + c), into
// tile_z; every thread of the block calls it, and a barrier must follow before tile_z is read.
template <int kTile>
__device__ __forceinline__ void draw_tile(float* tile_z, uint64_t seed, uint32_t sample,
                                          uint32_t s, int64_t P, int64_t C, int64_t p0) {
  // Philox block q of the tile: channel q % C (neighbouring threads, neighbouring words of
  // shared memory), positions p0 + 4 (q / C) .. + 3
  for (int q = threadIdx.x; q < kTile / 4; q += kThreads) {
    const int64_t c = q % C, p = 4 * (q / C);
    const float4 n = philox::normals(
        philox::block_words(seed, static_cast<uint32_t>(c * (P / 4) + (p0 + p) / 4), sample, s));
    tile_z[(p + 0) * C + c] = n.x;
    tile_z[(p + 1) * C + c] = n.y;
    tile_z[(p + 2) * C + c] = n.z;
    tile_z[(p + 3) * C + c] = n.w;
  }
}

// The tiles of `batch` samples of P positions and C channels, `tile` elements each: tp
// positions per tile, tile t = (sample t / per_sample_tiles, its (t % per_sample_tiles)-th).
struct Tiles {
  int64_t tp, per_sample_tiles, count;
  __host__ __device__ Tiles(int64_t batch, int64_t P, int64_t C, int tile)
      : tp(tile / C), per_sample_tiles((P + tp - 1) / tp), count(batch * per_sample_tiles) {}
  // tile t's sample b and first position p0
  __device__ void locate(int64_t t, int64_t& b, int64_t& p0) const {
    b = t / per_sample_tiles;
    p0 = (t - b * per_sample_tiles) * tp;
  }
};

// channels_last with noise, C = 2^k channels, P % 4 == 0, every pointer 16-byte aligned: a
// tile (draw_tile) holds one Pack per thread; each thread updates its 16 bytes of every
// operand with its noise from shared memory. Grid-stride over tiles.
template <typename T>
__global__ void __launch_bounds__(kThreads) step_tile_kernel(const Args<T> a) {
  constexpr int V = Pack<T>::kSize;
  constexpr int kTile = kThreads * V;
  __shared__ float tile_z[kTile];
  uint32_t s;
  const Row r = device_row(a, s);
  const bool noise = r.z != 0.0f;  // uniform: the barriers below are reached by every thread
  const int64_t P = a.positions, C = a.channels, per_sample = P * C;
  const Tiles tiles(a.batch, P, C, kTile);
  const int m = threadIdx.x * V;  // this thread's first element within a tile (memory order)
  bool bad = false;
  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    int64_t b, p0;
    tiles.locate(t, b, p0);
    float z[V] = {};
    if (noise) {
      draw_tile<kTile>(tile_z, a.seed, static_cast<uint32_t>(a.sample_offset + b), s, P, C, p0);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < V; ++k) z[k] = tile_z[m + k];
      __syncthreads();  // every thread has its noise: the next tile may overwrite tile_z
    }
    if (p0 * C + m < per_sample) bad |= apply_pack(a, r, (b * P + p0) * C + m, z);
  }
  flag(a, s, bad);
}

// Any dense layout: one Philox block (4 logical elements of one sample) per thread and
// iteration, each element at its memory position.
template <typename T>
__global__ void __launch_bounds__(kThreads) step_block_kernel(const Args<T> a) {
  uint32_t s;
  const Row r = device_row(a, s);
  const bool noise = r.z != 0.0f;
  const int64_t P = a.positions, C = a.channels, per_sample = P * C;
  const int64_t blocks = (per_sample + 3) / 4, units = a.batch * blocks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += stride) {
    const int64_t b = u / blocks, block = u - b * blocks;
    float4 n = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (noise) {
      n = philox::normals(philox::block_words(a.seed, static_cast<uint32_t>(block),
                                              static_cast<uint32_t>(a.sample_offset + b), s));
    }
    const float z[4] = {n.x, n.y, n.z, n.w};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = 4 * block + l;
      if (e >= per_sample) break;
      const int64_t m = C == 1 ? e : (e % P) * C + e / P;
      bad |= apply(a, r, b * per_sample + m, z[l]);
    }
  }
  flag(a, s, bad);
}

// fastdiff::gaussian_: out = T(z * scale), one Philox block (4 logical elements of one sample)
// per thread and iteration. A contiguous output whose per-sample size is a multiple of 4 stores
// the block's 4 values at once (16 bytes in fp32, 8 in fp16/bf16); otherwise each element goes
// to its memory position (channels_last: logical e = c * P + p at p * C + c).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gaussian_kernel(T* __restrict__ out, uint64_t seed, uint32_t s, int64_t sample_offset,
                    float scale, int64_t batch, int64_t P, int64_t C, bool quad) {
  const int64_t per_sample = P * C, blocks = (per_sample + 3) / 4, units = batch * blocks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += stride) {
    const int64_t b = u / blocks, block = u - b * blocks;
    const float4 n = philox::normals(philox::block_words(
        seed, static_cast<uint32_t>(block), static_cast<uint32_t>(sample_offset + b), s));
    const float z[4] = {__fmul_rn(n.x, scale), __fmul_rn(n.y, scale), __fmul_rn(n.z, scale),
                        __fmul_rn(n.w, scale)};
    T* o = out + b * per_sample;
    if (quad) {
      Quad<T> q;
#pragma unroll
      for (int l = 0; l < 4; ++l) q.v[l] = static_cast<T>(z[l]);
      *reinterpret_cast<Quad<T>*>(o + 4 * block) = q;
      continue;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = 4 * block + l;
      if (e >= per_sample) break;
      o[C == 1 ? e : (e % P) * C + e / P] = static_cast<T>(z[l]);
    }
  }
}

// fastdiff::gaussian_ into a channels_last output with C = 2^k channels (step_tile_kernel's
// conditions): a tile's noise through shared memory, then one 16-byte store per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gaussian_tile_kernel(T* __restrict__ out, uint64_t seed, uint32_t s, int64_t sample_offset,
                         float scale, int64_t batch, int64_t P, int64_t C) {
  constexpr int V = Pack<T>::kSize;
  constexpr int kTile = kThreads * V;
  __shared__ float tile_z[kTile];
  const Tiles tiles(batch, P, C, kTile);
  const int m = threadIdx.x * V;
  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    int64_t b, p0;
    tiles.locate(t, b, p0);
    draw_tile<kTile>(tile_z, seed, static_cast<uint32_t>(sample_offset + b), s, P, C, p0);
    __syncthreads();
    Pack<T> v;
#pragma unroll
    for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(__fmul_rn(tile_z[m + k], scale));
    __syncthreads();
    if (p0 * C + m < P * C) store(out, (b * P + p0) * C + m, v);
  }
}

template <typename T>
bool aligned16(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
T* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// Whether the tile kernels take a problem (channels_last: C > 1; C = 2^k <= kTile / 4,
// P % 4 == 0, every pointer 16-byte aligned), and how many tiles it has.
template <typename T>
bool tiled(const Problem& pr, bool aligned) {
  constexpr int kTile = kThreads * Pack<T>::kSize;
  const int64_t C = pr.channels;
  return C > 1 && (C & (C - 1)) == 0 && C <= kTile / 4 && pr.positions % 4 == 0 && aligned;
}

template <typename T>
int64_t tile_count(const Problem& pr) {
  return Tiles(pr.batch, pr.positions, pr.channels, kThreads * Pack<T>::kSize).count;
}

// The kernel fastdiff::step takes for a call (step_cuda.cu's dispatch, and the emulation's).
enum class StepKernel { kVector, kTile, kBlock };

// The call's operands, problem and options as the kernels take them; `out` is x_next's tensor.
template <typename T>
Args<T> make_args(const at::Tensor& x, const at::Tensor& y,
                  const std::optional<at::Tensor>& y_uncond, const std::optional<at::Tensor>& h0,
                  const std::optional<at::Tensor>& h1, const at::Tensor& out,
                  const at::Tensor& table, const at::Tensor& counter,
                  const std::optional<at::Tensor>& nonfinite, int64_t seed,
                  int64_t sample_offset, const Problem& pr) {
  Args<T> a;
  a.x = x.const_data_ptr<T>();
  a.y = y.const_data_ptr<T>();
  a.yu = y_uncond ? y_uncond->const_data_ptr<T>() : nullptr;
  a.h0 = data_or_null<T>(h0);
  a.h1 = data_or_null<T>(h1);
  a.out = out.mutable_data_ptr<T>();
  a.table = table.const_data_ptr();
  a.table_double = table.scalar_type() == at::kDouble;
  a.rows = table.size(0);
  a.counter = counter.const_data_ptr<int64_t>();
  a.nonfinite = nonfinite ? nonfinite->mutable_data_ptr<int32_t>() : nullptr;
  a.seed = static_cast<uint64_t>(seed);
  a.sample_offset = sample_offset;
  a.guidance = pr.guidance;
  a.lo = pr.lo;
  a.hi = pr.hi;
  a.guided = pr.guided;
  a.has_h0 = pr.has_h0;
  a.has_h1 = pr.has_h1;
  a.noise = pr.noise;
  a.batch = pr.batch;
  a.positions = pr.positions;
  a.channels = pr.channels;
  return a;
}

// The vector kernel for contiguous states whose samples are whole 16-byte packs (and a step
// without noise, one flat sample), the tile kernel for channels_last with noise and 2^k
// channels, the block kernel for everything else; the first two need every pointer 16-byte
// aligned.
template <typename T>
StepKernel step_kernel_for(const Problem& pr, const Args<T>& a) {
  const bool aligned = aligned16(a.x) && aligned16(a.y) && aligned16(a.yu) && aligned16(a.h0) &&
                       aligned16(a.h1) && aligned16(a.out);
  if (pr.channels == 1 && pr.positions % Pack<T>::kSize == 0 && aligned) {
    return StepKernel::kVector;
  }
  if (tiled<T>(pr, aligned)) return StepKernel::kTile;
  return StepKernel::kBlock;
}

// Whether fastdiff::gaussian_ into `out` takes the tile kernel; otherwise gaussian_kernel, with
// `quad` (4 values per store) set by gaussian_quad.
template <typename T>
bool gaussian_tiled(const Problem& pr, const T* out) {
  return tiled<T>(pr, aligned16(out));
}

template <typename T>
bool gaussian_quad(const Problem& pr, const T* out) {
  return pr.channels == 1 && pr.positions % 4 == 0 &&
         reinterpret_cast<uintptr_t>(out) % sizeof(Quad<T>) == 0;
}

}  // namespace gpu
}  // namespace step
}  // namespace fastdiff
