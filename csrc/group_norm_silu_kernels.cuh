// The CUDA kernels of fastdiff::group_norm_silu_fwd (group_norm_silu_cuda.cu describes them and
// launches them) and the host-side plan of a call. It is included inside namespace fastdiff by
// its users, after <cooperative_groups.h> and group_norm_silu.h, and has no include guard:
// tests/cuda_emulation.cpp compiles it for the host once per rank of a thread block cluster, so
// that each emulated block of a cluster has its own __shared__ variables. Apart from the CUDA
// runtime's built-ins (threadIdx, __syncthreads, __shfl_xor_sync, float2, ...) and the cluster
// API of cooperative groups it uses nothing of CUDA's; its inline PTX is device-only.

constexpr int kThreads = 256;
constexpr int64_t kMaxClusterSplits = 8;  // the portable cluster size
constexpr int64_t kMaxSplits = 32;        // the two-launch path merges partials within one warp
constexpr int64_t kSlice = 4096;          // elements of a group per block, about

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

// The block's merged statistics, valid in thread 0.
__device__ __forceinline__ Stats block_merge(Stats s) {
  __shared__ Stats warps[kThreads / 32];
  s = warp_merge(s);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < kThreads / 32 ? warps[threadIdx.x] : Stats{0.f, 0.f, 0.f};
    s = warp_merge(s);
  }
  return s;
}

// (mean, rstd) of a group from its n <= 32 partial statistics, part(0) ... part(n - 1), merged by
// warp 0 in a fixed order, for every thread of the block. part is called by threads 0 .. n-1.
template <typename Part>
__device__ __forceinline__ float2 group_mean_rstd(int n, Part part, float eps) {
  __shared__ float2 mean_rstd;
  if (threadIdx.x < 32) {
    Stats s = static_cast<int>(threadIdx.x) < n ? part(threadIdx.x) : Stats{0.f, 0.f, 0.f};
    s = warp_merge(s);
    if (threadIdx.x == 0) mean_rstd = make_float2(s.mean, 1.f / sqrtf(s.m2 / s.n + eps));
  }
  __syncthreads();
  return mean_rstd;
}

// silu(v) = v sigmoid(v): exact for fp32 output; for 16-bit output with the hardware's exp2 and
// reciprocal (a few fp32 ulps, far below the output's rounding) at a tenth of the instructions.
template <typename T>
__device__ __forceinline__ float silu(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v / (1.f + expf(-v));
  } else {
    return __fdividef(v, 1.f + __expf(-v));
  }
}

template <typename T>
struct Params {
  const T* x;
  const T* residual;     // nullptr, (B, C) or x-shaped in x's layout
  const T* scale_shift;  // nullptr or (B, 2C)
  const float* weight;
  const float* bias;
  T* y;
  Stats* partial;  // the two-launch path's workspace: one entry per block
  int64_t C, S, G;
  int64_t chunk;  // elements per block (a multiple of the run length)
  int splits;     // blocks per group
  int residual_kind;
  float eps;
};

template <typename T, int R>
struct alignas(sizeof(T) * R) Run {
  T v[R];
};

// Registers per thread for CACHE cached runs (one unused slot when there is none).
template <int CACHE>
constexpr int kSlots = CACHE > 0 ? CACHE : 1;

// Elements index within a group in 32 bits (the host refuses groups of 2^31 elements or more);
// offsets into the tensor in 64.
using Index = uint32_t;

// One group: element j in the group's storage order (channel-major in NCHW, position-major in
// channels_last) and where it lives. A run starts at a multiple of R and stays in one memory row.
template <bool CHANNELS_LAST>
struct Group {
  int64_t base;  // offset of the group's first element
  int64_t b, c0;  // batch, first channel
  int64_t C;
  Index S, cpg, n;  // positions, channels per group, elements
  __device__ __forceinline__ int64_t offset(Index j) const {
    return CHANNELS_LAST ? base + static_cast<int64_t>(j / cpg) * C + j % cpg : base + j;
  }
  // the channel of element j (the first of its run's channels in channels_last)
  __device__ __forceinline__ int64_t channel(Index j) const {
    return c0 + (CHANNELS_LAST ? j % cpg : j / S);
  }
};

template <bool CHANNELS_LAST, typename T>
__device__ __forceinline__ Group<CHANNELS_LAST> group_of(const Params<T>& p, int64_t bg) {
  const int64_t b = bg / p.G, cpg = p.C / p.G, c0 = (bg % p.G) * cpg;
  const int64_t base = CHANNELS_LAST ? b * p.S * p.C + c0 : (b * p.C + c0) * p.S;
  return {base, b, c0, p.C, static_cast<Index>(p.S), static_cast<Index>(cpg),
          static_cast<Index>(cpg * p.S)};
}

// The run's values of a per-channel vector (weight, bias, scale, shift, a (B, C) residual) from
// the entry of its first channel: R consecutive channels in channels_last, as vectors (the host
// checked alignment); the one channel of the run in NCHW.
template <int R, bool CL, typename U>
__device__ __forceinline__ void per_channel(const U* v, float (&out)[R]) {
  if constexpr (CL && R > 1) {
    // per load: 16 bytes, or the whole run where it is shorter
    constexpr int kPer = R < 16 / sizeof(U) ? R : 16 / sizeof(U);
    static_assert(R % kPer == 0, "a run covers whole vectors of per-channel values");
#pragma unroll
    for (int q = 0; q < R / kPer; ++q) {
      const Run<U, kPer> r = reinterpret_cast<const Run<U, kPer>*>(v)[q];
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[q * kPer + k] = static_cast<float>(r.v[k]);
    }
  } else {
    const float one = static_cast<float>(*v);
#pragma unroll
    for (int k = 0; k < R; ++k) out[k] = one;
  }
}

// h = x (+ residual) for the run at group element j.
template <int R, bool CL, typename T>
__device__ __forceinline__ void load_run(const Params<T>& p, const Group<CL>& g, Index j,
                                         float (&h)[R]) {
  const int64_t i = g.offset(j);
  const Run<T, R> xv = *reinterpret_cast<const Run<T, R>*>(p.x + i);
#pragma unroll
  for (int k = 0; k < R; ++k) h[k] = static_cast<float>(xv.v[k]);
  if (p.residual_kind == static_cast<int>(ResidualKind::kFull)) {
    const Run<T, R> rv = *reinterpret_cast<const Run<T, R>*>(p.residual + i);
#pragma unroll
    for (int k = 0; k < R; ++k) h[k] += static_cast<float>(rv.v[k]);
  } else if (p.residual_kind == static_cast<int>(ResidualKind::kPerChannel)) {
    float r[R];
    per_channel<R, CL>(p.residual + g.b * g.C + g.channel(j), r);
#pragma unroll
    for (int k = 0; k < R; ++k) h[k] += r[k];
  }
}

// silu(normalised and conditioned h) for the run at group element j, written to y.
template <int R, bool CL, typename T>
__device__ __forceinline__ void store_run(const Params<T>& p, const Group<CL>& g, Index j,
                                          const float (&h)[R], float mean, float rstd) {
  const int64_t c = g.channel(j);
  float w[R], b[R], scale[R], shift[R];
  per_channel<R, CL>(p.weight + c, w);
  per_channel<R, CL>(p.bias + c, b);
  if (p.scale_shift != nullptr) {
    const T* ss = p.scale_shift + g.b * 2 * g.C + c;
    per_channel<R, CL>(ss, scale);
    per_channel<R, CL>(ss + g.C, shift);
  }
  Run<T, R> out;
#pragma unroll
  for (int k = 0; k < R; ++k) {
    float v = (h[k] - mean) * (w[k] * rstd) + b[k];
    if (p.scale_shift != nullptr) v = v * (1.f + scale[k]) + shift[k];
    out.v[k] = static_cast<T>(silu<T>(v));
  }
  // stored as one 32-, 64- or 128-bit value, spelled out: NVVM splits a struct (or uint4) store
  // of 16-bit values into narrower stores in some loops
  T* y = p.y + g.offset(j);
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(out) == 16) {
    uint4 bits;
    memcpy(&bits, &out, sizeof(bits));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(y), "r"(bits.x), "r"(bits.y),
                 "r"(bits.z), "r"(bits.w));
  } else if constexpr (sizeof(out) == 8) {
    uint2 bits;
    memcpy(&bits, &out, sizeof(bits));
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(y), "r"(bits.x), "r"(bits.y));
  } else if constexpr (sizeof(out) == 4) {
    uint32_t bits;
    memcpy(&bits, &out, sizeof(bits));
    asm volatile("st.global.b32 [%0], %1;" ::"l"(y), "r"(bits));
  } else {
    *reinterpret_cast<Run<T, R>*>(y) = out;
  }
#else
  *reinterpret_cast<Run<T, R>*>(y) = out;
#endif
}

// The run's own (count, mean, M2): one division per run when merged.
template <int R>
__device__ __forceinline__ Stats run_stats(const float (&h)[R]) {
  float sum = 0.f, m2 = 0.f;
#pragma unroll
  for (int k = 0; k < R; ++k) sum += h[k];
  const float mean = sum * (1.f / R);  // exact: R is a power of two
#pragma unroll
  for (int k = 0; k < R; ++k) m2 += (h[k] - mean) * (h[k] - mean);
  return {static_cast<float>(R), mean, m2};
}

// A block's slice [start, end) of a group: thread t takes the runs at start + (t + i kThreads) R,
// i = 0, 1, ...; the first CACHE of them stay in `cache` for the write. Their statistics come
// from the registers in two passes (mean, then the squares about it: one division per thread);
// each run after them is merged in as it streams past.
template <int CACHE, int R, bool CL, typename T>
__device__ __forceinline__ Stats slice_stats(const Params<T>& p, const Group<CL>& g,
                                             Index start, Index end,
                                             float (&cache)[kSlots<CACHE>][R]) {
  constexpr Index step = kThreads * R;
  const Index first = start + threadIdx.x * R;
  Stats s{0.f, 0.f, 0.f};
  if constexpr (CACHE > 0) {
    // every cached load issued before the first is used
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      if (first + i * step < end) load_run<R>(p, g, first + i * step, cache[i]);
    }
    float sum = 0.f;
    int runs = 0;
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      if (first + i * step < end) {
        ++runs;
#pragma unroll
        for (int k = 0; k < R; ++k) sum += cache[i][k];
      }
    }
    if (runs > 0) {
      s.n = static_cast<float>(runs * R);
      s.mean = sum / s.n;
#pragma unroll
      for (int i = 0; i < CACHE; ++i) {
        if (first + i * step < end) {
#pragma unroll
          for (int k = 0; k < R; ++k) s.m2 += (cache[i][k] - s.mean) * (cache[i][k] - s.mean);
        }
      }
    }
  }
  for (Index j = first + CACHE * step; j < end; j += step) {
    float h[R];
    load_run<R>(p, g, j, h);
    s = merge(s, run_stats<R>(h));
  }
  return s;
}

template <int CACHE, int R, bool CL, typename T>
__device__ __forceinline__ void slice_apply(const Params<T>& p, const Group<CL>& g,
                                            Index start, Index end,
                                            const float (&cache)[kSlots<CACHE>][R],
                                            float2 mean_rstd) {
  constexpr Index step = kThreads * R;
  const Index first = start + threadIdx.x * R;
#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const Index j = first + i * step;
    if (j < end) store_run<R>(p, g, j, cache[i], mean_rstd.x, mean_rstd.y);
  }
  for (Index j = first + CACHE * step; j < end; j += step) {
    float h[R];
    load_run<R>(p, g, j, h);
    store_run<R>(p, g, j, h, mean_rstd.x, mean_rstd.y);
  }
}

// Block blockIdx.x takes slice blockIdx.x % splits, [start, end), of group blockIdx.x / splits.
template <bool CL>
struct Slice {
  Group<CL> group;
  int64_t bg;  // batch x groups + group
  Index start, end;
};

template <bool CL, int R, typename T>
__device__ __forceinline__ Slice<CL> block_slice(const Params<T>& p) {
  const int64_t bg = blockIdx.x / p.splits;
  const auto g = group_of<CL>(p, bg);
  const auto start = static_cast<Index>((blockIdx.x % p.splits) * p.chunk);
  const auto stop = start + static_cast<Index>(p.chunk);
  return {g, bg, start, stop < g.n ? stop : g.n};
}

template <typename T, bool CL, int R, int CACHE>
__global__ void __launch_bounds__(kThreads) group_norm_silu_kernel(const Params<T> p) {
  const auto sl = block_slice<CL, R>(p);
  float cache[CACHE][R];
  const Stats s = block_merge(slice_stats<CACHE, R>(p, sl.group, sl.start, sl.end, cache));
  float2 mean_rstd;
  if (p.splits == 1) {
    mean_rstd = group_mean_rstd(1, [&](int) { return s; }, p.eps);
  } else {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FASTDIFF_EMULATED_CLUSTERS)
    namespace cg = cooperative_groups;
    __shared__ Stats block_stats;
    if (threadIdx.x == 0) block_stats = s;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's statistics are in its shared memory
    mean_rstd = group_mean_rstd(
        p.splits, [&](int rank) { return *cluster.map_shared_rank(&block_stats, rank); }, p.eps);
    cluster.sync();  // no block exits, releasing its shared memory, while another reads it
#elif defined(__CUDA_ARCH__)
    __trap();  // the host splits groups over clusters only where sm_90 code runs
#endif
  }
  slice_apply<CACHE, R>(p, sl.group, sl.start, sl.end, cache, mean_rstd);
}

// The two-launch path: statistics of every slice into p.partial, then apply.
template <typename T, bool CL, int R>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(const Params<T> p) {
  const auto sl = block_slice<CL, R>(p);
  float none[1][R];
  const Stats s = block_merge(slice_stats<0, R>(p, sl.group, sl.start, sl.end, none));
  if (threadIdx.x == 0) p.partial[blockIdx.x] = s;
}

template <typename T, bool CL, int R>
__global__ void __launch_bounds__(kThreads) group_norm_apply_kernel(const Params<T> p) {
  const auto sl = block_slice<CL, R>(p);
  const Stats* partial = p.partial + sl.bg * p.splits;
  const float2 mean_rstd = group_mean_rstd(p.splits, [&](int i) { return partial[i]; }, p.eps);
  float none[1][R];
  slice_apply<0, R>(p, sl.group, sl.start, sl.end, none, mean_rstd);
}

// How one call is launched: `splits` blocks per group of `chunk` elements each; `cache` runs per
// thread held in registers by the one-kernel path, 0 for the two-launch path.
struct Plan {
  int64_t splits, chunk;
  int cache;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A block per kSlice elements of a group (at most 8 in a cluster, 32 on the two-launch path).
// The plan depends on the group's size only, never on the batch or the GPU: each sample's
// output is the same bit for bit whatever the batch it is in.
Plan plan_launch(int64_t group_size, int64_t run, bool clusters) {
  const int64_t wanted = ceil_div(group_size, kSlice);
  const bool one_kernel = clusters || wanted == 1;
  int64_t splits = std::min(wanted, one_kernel ? kMaxClusterSplits : kMaxSplits);
  const int64_t chunk = ceil_div(ceil_div(group_size, splits), run) * run;
  splits = ceil_div(group_size, chunk);  // no empty slice
  int cache = 0;
  if (one_kernel) {
    const int64_t runs = ceil_div(chunk, kThreads * run);  // per thread
    cache = run == 1 || runs > 4 ? 8 : runs > 2 ? 4 : static_cast<int>(runs);
  }
  return {splits, chunk, cache};
}

// The run length of a call: 16 bytes (V elements) in NCHW when H*W allows; in channels_last the
// largest power of two up to V that divides C and C/G (SD1.5's 10 and 20 channels per group
// give 2 and 4); 1 where an operand is not 16-byte aligned.
inline int64_t run_length(const GroupNormSiluArgs& a, const at::Tensor& out) {
  const int64_t V = 16 / static_cast<int64_t>(a.x.element_size());
  const auto aligned = [](const at::Tensor& t) {
    return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  };
  int64_t run = 1;
  if (aligned(a.x) && aligned(out) && aligned(a.residual)) {
    if (!a.channels_last) {
      run = a.spatial % V == 0 ? V : 1;
    } else if (aligned(a.weight) && aligned(a.bias) && aligned(a.scale_shift)) {
      run = V;
      while (run > 1 && (a.channels % run != 0 || a.channels_per_group() % run != 0)) run /= 2;
    }
  }
  return run;
}

// The kernels' parameters for a call planned as `plan`; `partial` is the two-launch path's
// workspace (undefined otherwise).
template <typename T>
Params<T> make_params(const GroupNormSiluArgs& a, const at::Tensor& out,
                      const at::Tensor& partial, const Plan& plan) {
  return {a.x.const_data_ptr<T>(),
          a.residual.defined() ? a.residual.const_data_ptr<T>() : nullptr,
          a.scale_shift.defined() ? a.scale_shift.const_data_ptr<T>() : nullptr,
          a.weight.const_data_ptr<float>(),
          a.bias.const_data_ptr<float>(),
          out.mutable_data_ptr<T>(),
          partial.defined() ? reinterpret_cast<Stats*>(partial.mutable_data_ptr<float>())
                            : nullptr,
          a.channels,
          a.spatial,
          a.groups,
          plan.chunk,
          static_cast<int>(plan.splits),
          static_cast<int>(a.residual_kind),
          a.eps};
}

// Calls f(std::bool_constant<CL>{}, std::integral_constant<int, R>{}) for a call's layout and
// run length (run_length: V, or in channels_last also 1, 2 or 4).
template <typename T, typename F>
void with_run(bool channels_last, int64_t run, F&& f) {
  constexpr int kVector = 16 / sizeof(T);
  using Vector = std::integral_constant<int, kVector>;
  using One = std::integral_constant<int, 1>;
  if (!channels_last) {
    run == kVector ? f(std::false_type{}, Vector{}) : f(std::false_type{}, One{});
  } else if (run == kVector) {
    f(std::true_type{}, Vector{});
  } else if (run == 1) {
    f(std::true_type{}, One{});
  } else if (run == 2) {
    f(std::true_type{}, std::integral_constant<int, 2>{});
  } else if constexpr (kVector > 4) {
    f(std::true_type{}, std::integral_constant<int, 4>{});
  }
}

// Calls f(std::integral_constant<int, CACHE>{}) for the one-kernel path's cached runs per thread
// (plan.cache > 0; a run of one element always caches 8).
template <int R, typename F>
void with_cache(int cache, F&& f) {
  if constexpr (R == 1) {
    f(std::integral_constant<int, 8>{});
  } else if (cache == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (cache == 2) {
    f(std::integral_constant<int, 2>{});
  } else if (cache == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}
