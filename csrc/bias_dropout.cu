// CUDA bias + activation + dropout (+ residual), forward and backward.
//
// One templated kernel pair serves every variant: the activation is a
// template functor (identity/relu/gelu/gelu_tanh, csrc/bias_dropout.h);
// residual, bias and dropout are uniform runtime branches.
//
// Layout: a 2-D grid over (column vectors, rows). Each thread owns VEC
// consecutive columns (16-byte accesses when cols and the pointers allow),
// keeps their bias in registers, and walks rows with a grid stride. Dropout
// draws one Philox call per 8 consecutive elements (4 with VEC = 4;
// csrc/philox.h; element index offset + r * row_stride + c, VEC-aligned
// whenever offset and row_stride are, as for every shard lsjax's ops pass,
// whose width VEC divides; else one call per element) into keep bitmasks while
// the row's loads are in flight. gelu adds ~12 instructions per element
// (forward) and ~23 (backward) with the 16-bit types' erfc fit, ~4 more with
// float32's (SASS counts); gelu_tanh a little less.
//
// Both passes are one wave of kMinBlocks blocks per SM (the backward's also
// bounds its dbias partial rows); each thread keeps kStages rows of loads in
// flight through its own shared-memory slots (cp.async, StagedRows): row
// r + kStages * stride is requested as row r is stored, so loads stay in
// flight while the thread runs the Philox rounds and the activation, at no
// register cost. (Rows held in registers instead capped the forward at 2 rows,
// 32 bytes in flight per thread, and only while the thread waited: gelu at
// 65536x4096 reached 67% of copy bandwidth.) Registers are capped so that
// kMinBlocks blocks fit on an SM (without a cap the compiler took 100-170
// registers: one or two blocks, 12-25% occupancy).
//
// relu's backward reads y and draws no random bits (csrc/bias_dropout.h).
//
// Backward dbias is deterministic: each thread accumulates its columns over
// its rows in float32 registers, the block reduces its row lanes through
// shared memory in a fixed order into one partial row per blockIdx.y, and a
// second kernel sums the partial rows in a fixed order. No float atomics.
#include <algorithm>
#include <type_traits>

#include "csrc/bias_dropout.h"
#include "csrc/cuda_common.cuh"
#include "csrc/philox.h"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::LoadFloats;
using cuda::NextPow2;
using cuda::StoreFloats;

constexpr int kBlock = 256;    // threads per block
constexpr int kMinBlocks = 4;  // blocks per SM, one wave: <= 64 registers per thread (no spills)
constexpr int kStages = 4;     // rows of loads in flight per thread (shared-memory slots)
constexpr int kMaxVec = 8;     // 16 bytes of 16-bit elements

using cuda::Int;

// ------------------------------------------------------------- dropout --

__device__ __forceinline__ DropoutRng LoadRng(const uint32_t* rng, float rate) {
  if (rate <= 0.f) return DropoutRng{0u, 0u, 0u, 0u, 1.f};
  const uint32_t words[4] = {rng[0], rng[1], rng[2], rng[3]};  // 16 bytes, cached
  return MakeDropoutRng(words, rate);
}

// ------------------------------------------------------------- kernels --

// Walks rows r0, r0 + stride, ... < rows of the [rows, cols] inputs a and b
// (b nullable) at columns [c0, c0 + VEC), kStages rows of loads in flight
// through the thread's shared-memory slots (cp.async; tid indexes the slots):
// row r + kStages * stride is requested once row r is consumed. Per row:
// keep = early(r), work that needs no data (the dropout bits), runs while the
// loads are in flight; then late(r, keep, va, vb) gets the row's values in
// float32 (vb unset without b). No barriers.
template <typename T, int VEC, typename Early, typename Late>
__device__ __forceinline__ void StagedRows(const T* a, const T* b, int64_t rows, int64_t cols, int64_t c0, int64_t r0,
                                           int64_t stride, int tid, Early&& early, Late&& late) {
  using V = cuda::Vec<T, VEC>;
  __shared__ V sa[kStages][kBlock], sb[kStages][kBlock];
  auto stage = [&](int s, int64_t r) {  // one commit group per row, empty past the end
    if (r < rows) {
      cuda::CopyVecAsync<T, VEC>(&sa[s][tid], a + r * cols + c0);
      if (b) cuda::CopyVecAsync<T, VEC>(&sb[s][tid], b + r * cols + c0);
    }
    cuda::CopyAsyncCommit();
  };
#pragma unroll
  for (int s = 0; s < kStages; ++s) stage(s, r0 + s * stride);
  int s = 0;
  for (int64_t r = r0; r < rows; r += stride) {
    const uint32_t keep = early(r);
    cuda::CopyAsyncWait<kStages - 1>();  // row r's group, the oldest, has landed
    float va[VEC], vb[VEC];
    LoadFloats<T, VEC>(sa[s][tid].v, va);
    if (b) LoadFloats<T, VEC>(sb[s][tid].v, vb);
    late(r, keep, va, vb);
    stage(s, r + kStages * stride);  // after late's stores: the slot's values are consumed
    s = s + 1 == kStages ? 0 : s + 1;
  }
}

__device__ __forceinline__ int ThreadInBlock() { return threadIdx.y * blockDim.x + threadIdx.x; }

template <typename T, int VEC, typename Act>
__global__ void __launch_bounds__(kBlock, kMinBlocks) BiasDropoutFwdKernel(BiasDropoutFwdArgs<T> a) {
  const int64_t nvec = a.cols / VEC;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= nvec) return;  // no barriers below
  const int64_t c0 = cv * VEC;
  const bool drop = a.rate > 0.f;
  const DropoutRng rng = LoadRng(a.rng, a.rate);
  float b[VEC];
  if (a.bias.data) {
    cuda::LoadParams<T, VEC>(a.bias, c0, b);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) b[k] = 0.f;
  }
  StagedRows<T, VEC>(
      a.x, a.residual, a.rows, a.cols, c0, static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y,
      static_cast<int64_t>(gridDim.y) * blockDim.y, ThreadInBlock(),
      [&](int64_t r) { return drop ? DropoutKeepBits<VEC>(rng, static_cast<uint64_t>(r * a.row_stride + c0)) : 0u; },
      [&](int64_t r, uint32_t keep, float (&v)[VEC], const float (&res)[VEC]) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = Act::F(v[k] + b[k]);
        if (drop) ApplyKeepBits<VEC>(keep, rng.scale, v);
        if (a.residual) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[k] += res[k];
        }
        StoreFloats<T, VEC>(a.y + r * a.cols + c0, v);
      });
}

// partial: [gridDim.y, cols] float32, or nullptr without dbias.
template <typename T, int VEC, typename Act>
__global__ void __launch_bounds__(kBlock, kMinBlocks) BiasDropoutBwdKernel(BiasDropoutBwdArgs<T> a, float* partial) {
  __shared__ float red[kBlock * kMaxVec];
  constexpr bool kSaved = Act::kGradFromOutput || Act::kNeedsInput;
  const int64_t nvec = a.cols / VEC;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < nvec;  // inactive threads still reach the barrier
  const int64_t c0 = cv * VEC;
  float b[VEC], acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) b[k] = acc[k] = 0.f;
  if (Act::kNeedsInput && active && a.bias.data) cuda::LoadParams<T, VEC>(a.bias, c0, b);
  const bool drop = a.rate > 0.f && !Act::kGradFromOutput;
  const DropoutRng rng = LoadRng(a.rng, drop ? a.rate : 0.f);
  const float scale = DropoutScale(a.rate);
  if (active) {
    StagedRows<T, VEC>(
        a.dy, kSaved ? a.saved : nullptr, a.rows, a.cols, c0,
        static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y, static_cast<int64_t>(gridDim.y) * blockDim.y,
        ThreadInBlock(),
        [&](int64_t r) { return drop ? DropoutKeepBits<VEC>(rng, static_cast<uint64_t>(r * a.row_stride + c0)) : 0u; },
        [&](int64_t r, uint32_t keep, float (&g)[VEC], const float (&saved)[VEC]) {
          if constexpr (Act::kGradFromOutput) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) g[k] = Act::G(saved[k]) ? g[k] * scale : 0.f;
          } else {
            if (drop) ApplyKeepBits<VEC>(keep, rng.scale, g);
            if constexpr (Act::kNeedsInput) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) g[k] *= Act::D(saved[k] + b[k]);
            }
          }
          StoreFloats<T, VEC>(a.dx + r * a.cols + c0, g);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += g[k];
        });
  }
  if (partial == nullptr) return;  // uniform over the block
  if (blockDim.y > 1) {            // uniform: reduce the row lanes, lane 0 first
    const int width = blockDim.x * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) red[threadIdx.y * width + threadIdx.x * VEC + k] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += red[y * width + threadIdx.x * VEC + k];
      }
    }
  }
  if (threadIdx.y == 0 && active) {
    float* out = partial + static_cast<int64_t>(blockIdx.y) * a.cols + c0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = acc[k];
  }
}

// ------------------------------------------------------------ launch plan --

struct Plan {
  int vec = 1;
  dim3 block;
  int64_t grid_x = 1;
};

// Widest access the size and every pointer allow: 16 bytes, 4 elements, or 1.
template <typename T>
int PickVec(int64_t cols, const void* const* ptrs, int n_ptrs, const ParamVec<T>& bias) {
  auto fits = [&](int vec) {
    if (cols % vec != 0) return false;
    const int bytes = std::min<int>(16, vec * static_cast<int>(sizeof(T)));
    for (int i = 0; i < n_ptrs; ++i) {
      if (!cuda::Aligned(ptrs[i], bytes)) return false;
    }
    return cuda::Aligned(bias.data, std::min<int>(16, vec * static_cast<int>(bias.ElementBytes())));
  };
  if (fits(cuda::kVec16<T>)) return cuda::kVec16<T>;
  if (fits(4)) return 4;
  return 1;
}

Plan MakePlan(int vec, int64_t cols) {
  Plan plan;
  plan.vec = vec;
  const int64_t nvec = cols / vec;
  const int bx = static_cast<int>(std::min<int64_t>(kBlock, std::max(32, NextPow2(nvec))));
  plan.block = dim3(bx, kBlock / bx);
  plan.grid_x = CeilDiv(nvec, bx);
  return plan;
}

// Row blocks: one wave of kMinBlocks blocks per SM, at most one per row of each thread.
int64_t GridY(const Plan& plan, int64_t rows) {
  const int64_t fill = std::max<int64_t>(1, kMinBlocks * cuda::NumSMs() / plan.grid_x);
  return std::max<int64_t>(1, std::min(CeilDiv(rows, plan.block.y), fill));
}

template <typename T, typename F>
void DispatchVec(int vec, F&& f) {
  constexpr int kV = cuda::kVec16<T>;
  if (vec == kV) {
    f(Int<kV>{});
    return;
  }
  if constexpr (kV > 4) {
    if (vec == 4) {
      f(Int<4>{});
      return;
    }
  }
  f(Int<1>{});
}

}  // namespace

template <typename T>
cudaError_t BiasDropoutFwdCuda(const BiasDropoutFwdArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  const void* ptrs[] = {a.x, a.residual, a.y};
  const Plan plan = MakePlan(PickVec<T>(a.cols, ptrs, 3, a.bias), a.cols);
  const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(GridY(plan, a.rows)));
  bool known = DispatchActivation<T>(a.act, [&](auto act) {
    DispatchVec<T>(plan.vec, [&](auto vec) {
      BiasDropoutFwdKernel<T, decltype(vec)::value, decltype(act)><<<grid, plan.block, 0, stream>>>(a);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

template <typename T>
cudaError_t BiasDropoutBwdCuda(const BiasDropoutBwdArgs<T>& a, cudaStream_t stream) {
  if (a.cols == 0) return cudaSuccess;
  if (a.rows == 0) {
    if (a.dbias.data) cudaMemsetAsync(a.dbias.data, 0, a.cols * a.dbias.ElementBytes(), stream);
    return cudaGetLastError();
  }
  float* partial = a.dbias.data ? a.partials : nullptr;
  int64_t grid_y = 0;
  bool known = DispatchActivation<T>(a.act, [&](auto act) {
    using Act = decltype(act);
    const void* ptrs[] = {a.dy, a.dx, Act::kGradFromOutput || Act::kNeedsInput ? a.saved : nullptr};
    const Plan plan = MakePlan(PickVec<T>(a.cols, ptrs, 3, Act::kNeedsInput ? a.bias : ParamVec<T>{}), a.cols);
    grid_y = std::min(GridY(plan, a.rows), ColumnSumPartialRows(a.rows));  // fits a.partials (>= 32 rows each)
    const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(grid_y));
    DispatchVec<T>(plan.vec, [&](auto vec) {
      BiasDropoutBwdKernel<T, decltype(vec)::value, Act><<<grid, plan.block, 0, stream>>>(a, partial);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  if (a.dbias.data) {
    return cuda::LaunchColumnSums<T>(partial, grid_y, grid_y, a.cols, a.dbias, ParamGrad<T>{}, stream);
  }
  return cudaGetLastError();
}

#define LSJAX_INSTANTIATE(T)                                                                \
  template cudaError_t BiasDropoutFwdCuda<T>(const BiasDropoutFwdArgs<T>&, cudaStream_t); \
  template cudaError_t BiasDropoutBwdCuda<T>(const BiasDropoutBwdArgs<T>&, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
