// CUDA bias + activation + dropout (+ residual), forward and backward.
//
// One templated kernel pair serves every variant: the activation is a
// template functor (identity/relu/gelu/gelu_tanh, csrc/bias_dropout.h);
// residual, bias and dropout are uniform runtime branches.
//
// Layout: a 2-D grid over (column vectors, rows). Each thread owns VEC
// consecutive columns (16-byte accesses when cols and the pointers allow),
// keeps their bias in registers, and walks rows with a grid stride, holding
// kFwdRows / kBwdRows rows of loads in flight. Dropout draws one Philox call
// per 8 consecutive elements (4 with VEC = 4; csrc/philox.h; element index
// offset + r * row_stride + c, VEC-aligned whenever offset and row_stride are,
// as for every shard lsjax's ops pass, whose width VEC divides; else one call
// per element) into keep bitmasks between issuing a pass's loads and using
// them, so the Philox work runs while the loads are in flight. gelu adds ~12
// instructions per element (forward) and ~23 (backward) with the 16-bit
// types' erfc fit, ~4 more with float32's (SASS counts); gelu_tanh a little less.
//
// The forward gives each thread kFwdRows rows and launches blocks for all
// rows: many short blocks, so blocks in their load phase overlap blocks in
// their Philox phase (one long pass per thread puts the whole GPU in the same
// phase at once when the tensor fills about one wave). The backward is one
// wave of kMinBlocks blocks per SM, which bounds its dbias partial rows.
//
// Registers are capped so that kMinBlocks blocks fit on an SM (without the cap
// the compiler took 100-170 registers: one or two blocks, 12-25% occupancy).
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
constexpr int kMinBlocks = 3;  // blocks per SM the registers must allow: <= 80 per thread (no spills)
constexpr int kFwdRows = 2;    // rows per thread of the forward
constexpr int kBwdRows = 2;    // rows in flight per thread of the backward
constexpr int kMaxVec = 8;     // 16 bytes of 16-bit elements

using cuda::Int;

// ------------------------------------------------------------- dropout --

__device__ __forceinline__ DropoutRng LoadRng(const uint32_t* rng, float rate) {
  if (rate <= 0.f) return DropoutRng{0u, 0u, 0u, 0u, 1.f};
  const uint32_t words[4] = {rng[0], rng[1], rng[2], rng[3]};  // 16 bytes, cached
  return MakeDropoutRng(words, rate);
}

// ------------------------------------------------------------- kernels --

// Keep bits of the ROWS rows r0, r0 + stride, ... at columns [c0, c0 + VEC) (0 for rows past
// `rows` or without dropout): drawn after a pass issues its loads, before it uses them.
template <int VEC, int ROWS>
__device__ __forceinline__ void RowsKeepBits(const DropoutRng& rng, bool drop, int64_t r0, int64_t stride,
                                             int64_t rows, int64_t row_stride, int64_t c0, uint32_t (&keep)[ROWS]) {
#pragma unroll
  for (int u = 0; u < ROWS; ++u) {
    const int64_t r = r0 + u * stride;
    keep[u] = drop && r < rows ? DropoutKeepBits<VEC>(rng, static_cast<uint64_t>(r * row_stride + c0)) : 0u;
  }
}

template <typename T, int VEC, typename Act>
__global__ void __launch_bounds__(kBlock, kMinBlocks) BiasDropoutFwdKernel(BiasDropoutFwdArgs<T> a) {
  const int64_t nvec = a.cols / VEC;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= nvec) return;  // no barriers below
  const int64_t c0 = cv * VEC;
  float b[VEC];
  if (a.bias) {
    LoadFloats<float, VEC>(a.bias + c0, b);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) b[k] = 0.f;
  }
  const bool drop = a.rate > 0.f;
  const DropoutRng rng = LoadRng(a.rng, a.rate);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r0 < a.rows;
       r0 += stride * kFwdRows) {
    float v[kFwdRows][VEC], res[kFwdRows][VEC];
#pragma unroll
    for (int u = 0; u < kFwdRows; ++u) {
      const int64_t r = r0 + u * stride;
      if (r < a.rows) {
        LoadFloats<T, VEC>(a.x + r * a.cols + c0, v[u]);
        if (a.residual) LoadFloats<T, VEC>(a.residual + r * a.cols + c0, res[u]);
      }
    }
    uint32_t keep[kFwdRows];
    RowsKeepBits<VEC>(rng, drop, r0, stride, a.rows, a.row_stride, c0, keep);
#pragma unroll
    for (int u = 0; u < kFwdRows; ++u) {
      const int64_t r = r0 + u * stride;
      if (r < a.rows) {
        const int64_t e = r * a.cols + c0;
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[u][k] = Act::F(v[u][k] + b[k]);
        if (drop) ApplyKeepBits<VEC>(keep[u], rng.scale, v[u]);
        if (a.residual) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[u][k] += res[u][k];
        }
        StoreFloats<T, VEC>(a.y + e, v[u]);
      }
    }
  }
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
  if (Act::kNeedsInput && active && a.bias) LoadFloats<float, VEC>(a.bias + c0, b);
  const bool drop = a.rate > 0.f && !Act::kGradFromOutput;
  const DropoutRng rng = LoadRng(a.rng, drop ? a.rate : 0.f);
  const float scale = DropoutScale(a.rate);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; active && r0 < a.rows;
       r0 += stride * kBwdRows) {
    float g[kBwdRows][VEC], s[kBwdRows][VEC];
#pragma unroll
    for (int u = 0; u < kBwdRows; ++u) {
      const int64_t r = r0 + u * stride;
      if (r < a.rows) {
        LoadFloats<T, VEC>(a.dy + r * a.cols + c0, g[u]);
        if constexpr (kSaved) LoadFloats<T, VEC>(a.saved + r * a.cols + c0, s[u]);
      }
    }
    uint32_t keep[kBwdRows];
    RowsKeepBits<VEC>(rng, drop, r0, stride, a.rows, a.row_stride, c0, keep);
#pragma unroll
    for (int u = 0; u < kBwdRows; ++u) {
      const int64_t r = r0 + u * stride;
      if (r < a.rows) {
        const int64_t e = r * a.cols + c0;
        if constexpr (Act::kGradFromOutput) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) g[u][k] = Act::G(s[u][k]) ? g[u][k] * scale : 0.f;
        } else {
          if (drop) ApplyKeepBits<VEC>(keep[u], rng.scale, g[u]);
          if constexpr (Act::kNeedsInput) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) g[u][k] *= Act::D(s[u][k] + b[k]);
          }
        }
        StoreFloats<T, VEC>(a.dx + e, g[u]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += g[u][k];
      }
    }
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
int PickVec(int64_t cols, const void* const* ptrs, int n_ptrs, const float* bias) {
  auto fits = [&](int vec) {
    if (cols % vec != 0) return false;
    const int bytes = std::min<int>(16, vec * static_cast<int>(sizeof(T)));
    for (int i = 0; i < n_ptrs; ++i) {
      if (!cuda::Aligned(ptrs[i], bytes)) return false;
    }
    return cuda::Aligned(bias, std::min<int>(16, vec * static_cast<int>(sizeof(float))));
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

// Row blocks of the backward: enough to fill the GPU (kMinBlocks per SM), at
// least 32 rows each so the partial rows stay small next to the data, and at
// most one per kBwdRows rows of each thread. Never more than the workspace's
// BiasDropoutDbiasPartials(rows).
int64_t BwdGridY(const Plan& plan, int64_t rows) {
  const int64_t fill = std::max<int64_t>(1, kMinBlocks * cuda::NumSMs() / plan.grid_x);
  return std::max<int64_t>(1, std::min({CeilDiv(rows, plan.block.y * kBwdRows), fill, BiasDropoutDbiasPartials(rows)}));
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
  const int64_t grid_y = std::min<int64_t>(CeilDiv(a.rows, plan.block.y * kFwdRows), 65535);
  const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(grid_y));
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
    if (a.dbias) cudaMemsetAsync(a.dbias, 0, a.cols * sizeof(float), stream);
    return cudaGetLastError();
  }
  float* partial = a.dbias ? a.partials : nullptr;
  int64_t grid_y = 0;
  bool known = DispatchActivation<T>(a.act, [&](auto act) {
    using Act = decltype(act);
    const void* ptrs[] = {a.dy, a.dx, Act::kGradFromOutput || Act::kNeedsInput ? a.saved : nullptr};
    const Plan plan = MakePlan(PickVec<T>(a.cols, ptrs, 3, Act::kNeedsInput ? a.bias : nullptr), a.cols);
    grid_y = BwdGridY(plan, a.rows);  // <= BiasDropoutDbiasPartials: fits a.partials
    const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(grid_y));
    DispatchVec<T>(plan.vec, [&](auto vec) {
      BiasDropoutBwdKernel<T, decltype(vec)::value, Act><<<grid, plan.block, 0, stream>>>(a, partial);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  if (a.dbias) {
    return cuda::LaunchColumnSums(partial, grid_y, grid_y, a.cols, a.dbias, nullptr, stream);
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
