// CUDA layer norm (forward and backward), LightSeq-style but without a hidden
// size cap.
//
// Fast path ("register" kernels): when cols divides into 16-byte vectors and
// the row fits in registers (<= 256 threads x ITEMS vectors), each row is read
// once into registers, reduced twice (mean, then centred variance: exact
// two-pass statistics at no extra memory traffic) and written once. A 256-thread
// block holds 256 / threads_per_row rows. Otherwise the "generic" kernels work on
// any size with one block per row and re-read the row (L1/L2 resident).
//
// The register backward keeps kBwdStages rows of loads in flight per thread
// through shared memory (cp.async; see LnBwdRegister).
//
// Backward column sums (dscale, dbias) are deterministic: each block of a
// persistent grid (<= kLayerNormBwdMaxPartials blocks) accumulates its rows in
// registers, combines its row groups in shared memory in a fixed order, writes
// one partial row to the caller's workspace, and a second kernel sums the
// partials in a fixed order. No float atomics.
#include <algorithm>
#include <type_traits>

#include "csrc/cuda_common.cuh"
#include "csrc/layer_norm.h"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::FromFloat;
using cuda::LoadFloats;
using cuda::NextPow2;
using cuda::RowSum2;
using cuda::StoreFloats;
using cuda::ToFloat;

constexpr int kBlock = 256;        // threads per block, all kernels
constexpr int kMaxRowsPerBlock = kBlock / 32;
constexpr int kMaxItemsFwd = 8;    // vectors per thread held in registers
constexpr int kMaxItemsBwd = 4;
constexpr int kBwdStages = 3;      // rows of loads in flight per thread of the register backward

// ---------------------------------------------------------------- forward --

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kBlock) LnFwdRegister(LayerNormFwdArgs<T> a) {
  __shared__ float smem[kMaxRowsPerBlock * 64];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;
  const int nvec = static_cast<int>(a.cols / VEC);
  const int64_t off = row * a.cols;
  float v[ITEMS][VEC];
  float sum = 0.f, unused = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * blockDim.x + threadIdx.x;
    if (active && idx < nvec) {
      LoadFloats<T, VEC>(a.x + off + idx * VEC, v[i]);
      if (a.residual) {
        float r[VEC];
        LoadFloats<T, VEC>(a.residual + off + idx * VEC, r);
        // Normalise the rounded sum, as an unfused `z = x + r; layer_norm(z)`.
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = ToFloat(FromFloat<T>(v[i][k] + r[k]));
        StoreFloats<T, VEC>(a.z + off + idx * VEC, v[i]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += v[i][k];
    }
  }
  RowSum2(sum, unused, smem);
  const float mean = sum / a.cols;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * blockDim.x + threadIdx.x;
    if (active && idx < nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) sq += (v[i][k] - mean) * (v[i][k] - mean);
    }
  }
  RowSum2(sq, unused, smem);
  const float rstd = rsqrtf(sq / a.cols + a.eps);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * blockDim.x + threadIdx.x;
    if (active && idx < nvec) {
      float s[VEC], b[VEC];
      cuda::LoadParams<T, VEC>(a.scale, idx * VEC, s);
      cuda::LoadParams<T, VEC>(a.bias, idx * VEC, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = (v[i][k] - mean) * rstd * s[k] + b[k];
      StoreFloats<T, VEC>(a.y + off + idx * VEC, v[i]);
    }
  }
  if (active && threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// Any cols: one block per row (grid-stride), the row re-read from cache.
template <typename T>
__global__ void __launch_bounds__(kBlock) LnFwdGeneric(LayerNormFwdArgs<T> a) {
  __shared__ float smem[64];
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * a.cols;
    auto load = [&](int64_t c) {
      float v = ToFloat(a.x[off + c]);
      if (a.residual) v = ToFloat(FromFloat<T>(v + ToFloat(a.residual[off + c])));
      return v;
    };
    float sum = 0.f, unused = 0.f;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float v = load(c);
      if (a.residual) a.z[off + c] = FromFloat<T>(v);
      sum += v;
    }
    RowSum2(sum, unused, smem);
    const float mean = sum / a.cols;
    float sq = 0.f;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float d = load(c) - mean;
      sq += d * d;
    }
    RowSum2(sq, unused, smem);
    const float rstd = rsqrtf(sq / a.cols + a.eps);
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      a.y[off + c] = FromFloat<T>((load(c) - mean) * rstd * cuda::ParamAt(a.scale, c) + cuda::ParamAt(a.bias, c));
    }
    if (threadIdx.x == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
  }
}

// --------------------------------------------------------------- backward --

// Shared memory of LnBwdRegister: kBwdStages rows of loads in flight per
// thread, [stage][item][thread] vectors of z, dy (and dz_out), then
// [stage][thread] mean and rstd; reused for the row groups' combine at the end.
template <typename T, int VEC, int ITEMS>
size_t LnBwdSmemBytes(int threads, bool dz_out, int64_t cols, int rows_per_block) {
  const size_t vecs = static_cast<size_t>(kBwdStages) * ITEMS * threads * (dz_out ? 3 : 2);
  const size_t ring = vecs * sizeof(cuda::Vec<T, VEC>) + 2 * kBwdStages * threads * sizeof(float);
  const size_t combine = rows_per_block > 1 ? 2 * cols * sizeof(float) : 0;
  return std::max(ring, combine);
}

// Each row group (threadIdx.y) walks rows grid-stride; the row's z, dy
// (dz_out), mean and rstd arrive through the thread's shared-memory slots
// (cp.async), requested kBwdStages rows ahead, so a row's loads are in flight
// during the rows before it (the kernel is otherwise a chain of load, row sum,
// store per row). The row's values are read from the slots in both passes;
// only scale and the column sums stay in registers.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kBlock, ITEMS <= 2 ? 3 : 1)
    LnBwdRegister(LayerNormBwdArgs<T> a, float* partial_dscale, float* partial_dbias) {
  using V = cuda::Vec<T, VEC>;
  __shared__ float smem[kMaxRowsPerBlock * 64];
  extern __shared__ __align__(16) unsigned char ring[];
  const int nvec = static_cast<int>(a.cols / VEC);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  const int per_input = kBwdStages * ITEMS * threads;
  V* const sz = reinterpret_cast<V*>(ring);
  V* const sdy = sz + per_input;
  V* const sdo = sdy + per_input;  // with dz_out only
  float* const sstat = reinterpret_cast<float*>(sdo + (a.dz_out ? per_input : 0));
  auto slot = [&](int s, int i) { return (s * ITEMS + i) * threads + tid; };
  auto stage = [&](int s, int64_t row) {  // one commit group per row, empty past the end
    if (row < a.rows) {
      const int64_t off = row * a.cols;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int idx = i * blockDim.x + threadIdx.x;
        if (idx < nvec) {
          cuda::CopyVecAsync<T, VEC>(sz + slot(s, i), a.z + off + idx * VEC);
          cuda::CopyVecAsync<T, VEC>(sdy + slot(s, i), a.dy + off + idx * VEC);
          if (a.dz_out) cuda::CopyVecAsync<T, VEC>(sdo + slot(s, i), a.dz_out + off + idx * VEC);
        }
      }
      cuda::CopyAsync<4>(sstat + (2 * s) * threads + tid, a.mean + row);
      cuda::CopyAsync<4>(sstat + (2 * s + 1) * threads + tid, a.rstd + row);
    }
    cuda::CopyAsyncCommit();
  };
  float sc[ITEMS][VEC], dsc[ITEMS][VEC], dbi[ITEMS][VEC];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int s = 0; s < kBwdStages; ++s) stage(s, first + s * stride);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * blockDim.x + threadIdx.x;
    if (idx < nvec) cuda::LoadParams<T, VEC>(a.scale, idx * VEC, sc[i]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dsc[i][k] = dbi[i][k] = 0.f;
  }
  int s = 0;
  // Uniform over the block (RowSum2 has barriers when a row spans several warps).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < a.rows; base += stride) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < a.rows;
    cuda::CopyAsyncWait<kBwdStages - 1>();  // this row's group, the oldest, has landed
    const float mean = sstat[(2 * s) * threads + tid], rstd = sstat[(2 * s + 1) * threads + tid];
    auto xhat_dy = [&](int i, float (&xhat)[VEC], float (&dy)[VEC]) {
      LoadFloats<T, VEC>(sz[slot(s, i)].v, xhat);
      LoadFloats<T, VEC>(sdy[slot(s, i)].v, dy);
#pragma unroll
      for (int k = 0; k < VEC; ++k) xhat[k] = (xhat[k] - mean) * rstd;
    };
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int idx = i * blockDim.x + threadIdx.x;
      if (active && idx < nvec) {
        float xhat[VEC], dy[VEC];
        xhat_dy(i, xhat, dy);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float g = dy[k] * sc[i][k];
          sum_g += g;
          sum_gx += g * xhat[k];
          dsc[i][k] += dy[k] * xhat[k];
          dbi[i][k] += dy[k];
        }
      }
    }
    RowSum2(sum_g, sum_gx, smem);
    const float mean_g = sum_g / a.cols, mean_gx = sum_gx / a.cols;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int idx = i * blockDim.x + threadIdx.x;
      if (active && idx < nvec) {
        float xhat[VEC], dy[VEC], d[VEC];
        xhat_dy(i, xhat, dy);
#pragma unroll
        for (int k = 0; k < VEC; ++k) d[k] = rstd * (dy[k] * sc[i][k] - mean_g - xhat[k] * mean_gx);
        if (a.dz_out) {
          float extra[VEC];
          LoadFloats<T, VEC>(sdo[slot(s, i)].v, extra);
#pragma unroll
          for (int k = 0; k < VEC; ++k) d[k] += extra[k];
        }
        StoreFloats<T, VEC>(a.dz + row * a.cols + idx * VEC, d);
      }
    }
    stage(s, row + kBwdStages * stride);  // after the stores: the slots' values are consumed
    s = s + 1 == kBwdStages ? 0 : s + 1;
  }
  float* out_dscale = partial_dscale + static_cast<int64_t>(blockIdx.x) * a.cols;
  float* out_dbias = partial_dbias + static_cast<int64_t>(blockIdx.x) * a.cols;
  if (blockDim.y == 1) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int idx = i * blockDim.x + threadIdx.x;
      if (idx < nvec) {
        StoreFloats<float, VEC>(out_dscale + idx * VEC, dsc[i]);
        StoreFloats<float, VEC>(out_dbias + idx * VEC, dbi[i]);
      }
    }
    return;
  }
  // Several row groups (threads_per_row < kBlock: cols / vec <= 256, at most 2048
  // 16-bit columns, so 2 * cols floats fit the ring): add them up in
  // shared memory (the ring's, every slot consumed), group 0 first, then write
  // the block's partial row.
  float* const combine = reinterpret_cast<float*>(ring);
  __syncthreads();
  for (int c = tid; c < 2 * a.cols; c += threads) combine[c] = 0.f;
  for (int group = 0; group < blockDim.y; ++group) {
    __syncthreads();
    if (threadIdx.y == group) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int idx = i * blockDim.x + threadIdx.x;
        if (idx < nvec) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            combine[idx * VEC + k] += dsc[i][k];
            combine[a.cols + idx * VEC + k] += dbi[i][k];
          }
        }
      }
    }
  }
  __syncthreads();
  for (int c = tid; c < a.cols; c += threads) {
    out_dscale[c] = combine[c];
    out_dbias[c] = combine[a.cols + c];
  }
}

// Any cols: one block per row (grid-stride); each block accumulates its rows'
// column sums into its own partial row (zeroed beforehand).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    LnBwdGeneric(LayerNormBwdArgs<T> a, float* partial_dscale, float* partial_dbias) {
  __shared__ float smem[64];
  float* pds = partial_dscale + static_cast<int64_t>(blockIdx.x) * a.cols;
  float* pdb = partial_dbias + static_cast<int64_t>(blockIdx.x) * a.cols;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * a.cols;
    const float mean = a.mean[row], rstd = a.rstd[row];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float xhat = (ToFloat(a.z[off + c]) - mean) * rstd;
      const float dy = ToFloat(a.dy[off + c]);
      const float g = dy * cuda::ParamAt(a.scale, c);
      sum_g += g;
      sum_gx += g * xhat;
      pds[c] += dy * xhat;
      pdb[c] += dy;
    }
    RowSum2(sum_g, sum_gx, smem);
    const float mean_g = sum_g / a.cols, mean_gx = sum_gx / a.cols;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float xhat = (ToFloat(a.z[off + c]) - mean) * rstd;
      float d = rstd * (ToFloat(a.dy[off + c]) * cuda::ParamAt(a.scale, c) - mean_g - xhat * mean_gx);
      if (a.dz_out) d += ToFloat(a.dz_out[off + c]);
      a.dz[off + c] = FromFloat<T>(d);
    }
  }
}

// ------------------------------------------------------------ launch plan --

// How a [rows, cols] problem maps onto the kernels.
struct Plan {
  int vec = 1;          // elements per access (1: generic kernel)
  int items = 0;        // vectors per thread; 0 selects the generic kernel
  int threads_per_row = kBlock;
  int rows_per_block = 1;
};

// items_target: vectors per thread to aim for (fewer threads per row when
// larger); the backward keeps 3 register arrays per vector, so it aims lower.
template <typename T>
Plan MakePlan(int64_t cols, int items_target, int max_items, const void* const* ptrs, int n_ptrs) {
  Plan plan;
  constexpr int kVec = cuda::kVec16<T>;
  bool vectorisable = cols % kVec == 0;
  for (int i = 0; i < n_ptrs; ++i) vectorisable = vectorisable && cuda::Aligned(ptrs[i], 16);
  const int vec = vectorisable ? kVec : 1;
  const int64_t nvec = cols / vec;
  // One warp per row at least, 256 threads at most.
  const int tpr = static_cast<int>(
      std::min<int64_t>(kBlock, std::max(32, NextPow2(CeilDiv(nvec, items_target)))));
  const int items = NextPow2(CeilDiv(nvec, tpr));
  if (items > max_items) return plan;  // generic
  plan.vec = vec;
  plan.items = items;
  plan.threads_per_row = tpr;
  plan.rows_per_block = kBlock / tpr;
  return plan;
}

template <typename T>
Plan FwdPlan(const LayerNormFwdArgs<T>& a) {
  const void* ptrs[] = {a.x, a.residual, a.z, a.y, a.scale.data, a.bias.data};
  return MakePlan<T>(a.cols, 4, kMaxItemsFwd, ptrs, 6);
}

template <typename T>
Plan BwdPlan(const LayerNormBwdArgs<T>& a) {
  const void* ptrs[] = {a.dy, a.dz_out, a.z, a.dz, a.scale.data};
  return MakePlan<T>(a.cols, 2, kMaxItemsBwd, ptrs, 5);
}

// Persistent grid for the backward, one wave of `resident_per_sm` blocks per
// SM (one partial row per block): each row group walks the same number of rows
// (at least 16 rows per block, so the partials stay few next to the data).
// At 8192 x 512 that is 3 rows per warp over 342 blocks, where a grid of
// 256 blocks x 4 rows per warp left the schedulers waiting on each warp's
// dependent row chain.
int64_t BwdGrid(const Plan& plan, int64_t rows, int resident_per_sm) {
  const int64_t fill = static_cast<int64_t>(std::max(resident_per_sm, 1)) * cuda::NumSMs();
  const int64_t rows_per_group = std::max(CeilDiv(rows, plan.rows_per_block * fill), CeilDiv(16, plan.rows_per_block));
  return std::max<int64_t>(1, std::min(CeilDiv(rows, plan.rows_per_block * rows_per_group), kLayerNormBwdMaxPartials));
}

}  // namespace

template <typename T>
cudaError_t LayerNormFwdCuda(const LayerNormFwdArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  const Plan plan = FwdPlan(a);
  if (plan.items == 0) {
    const int64_t grid = std::min<int64_t>(a.rows, 65535LL * 16);
    LnFwdGeneric<T><<<grid, kBlock, 0, stream>>>(a);
  } else {
    const dim3 block(plan.threads_per_row, plan.rows_per_block);
    const int64_t grid = CeilDiv(a.rows, plan.rows_per_block);
    cuda::DispatchVecItems<T, kMaxItemsFwd>(plan.vec, plan.items, [&](auto vec, auto items) {
      LnFwdRegister<T, decltype(vec)::value, decltype(items)::value><<<grid, block, 0, stream>>>(a);
    });
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LayerNormBwdCuda(const LayerNormBwdArgs<T>& a, cudaStream_t stream) {
  if (a.cols == 0) return cudaSuccess;
  if (a.rows == 0) {
    cudaMemsetAsync(a.dscale.data, 0, a.cols * a.dscale.ElementBytes(), stream);
    cudaMemsetAsync(a.dbias.data, 0, a.cols * a.dbias.ElementBytes(), stream);
    return cudaGetLastError();
  }
  // a.partials: float32 [2, min(rows, kLayerNormBwdMaxPartials), cols]; the
  // first `grid` rows of each half are used.
  const Plan plan = BwdPlan(a);
  const int64_t capacity = std::min<int64_t>(a.rows, kLayerNormBwdMaxPartials);
  float* partial_dscale = a.partials;
  float* partial_dbias = a.partials + capacity * a.cols;
  int64_t grid = 0;
  cudaError_t err = cudaSuccess;
  if (plan.items == 0) {
    grid = BwdGrid(plan, a.rows, cuda::ResidentBlocksPerSM(LnBwdGeneric<T>, kBlock, 0));
    cudaMemsetAsync(partial_dscale, 0, grid * a.cols * sizeof(float), stream);
    cudaMemsetAsync(partial_dbias, 0, grid * a.cols * sizeof(float), stream);
    LnBwdGeneric<T><<<grid, kBlock, 0, stream>>>(a, partial_dscale, partial_dbias);
  } else {
    const dim3 block(plan.threads_per_row, plan.rows_per_block);
    cuda::DispatchVecItems<T, kMaxItemsBwd>(plan.vec, plan.items, [&](auto vec, auto items) {
      constexpr int kVecN = decltype(vec)::value, kItems = decltype(items)::value;
      const auto kernel = LnBwdRegister<T, kVecN, kItems>;
      const size_t smem = LnBwdSmemBytes<T, kVecN, kItems>(kBlock, a.dz_out != nullptr, a.cols, plan.rows_per_block);
      err = cuda::AllowDynamicSmem(kernel, smem);
      if (err != cudaSuccess) return;
      grid = BwdGrid(plan, a.rows, cuda::ResidentBlocksPerSM(kernel, kBlock, smem));
      kernel<<<grid, block, smem, stream>>>(a, partial_dscale, partial_dbias);
    });
  }
  if (err != cudaSuccess) return err;
  return cuda::LaunchColumnSums<T>(a.partials, capacity, grid, a.cols, a.dscale, a.dbias, stream);
}

#define LSJAX_INSTANTIATE(T)                                                                  \
  template cudaError_t LayerNormFwdCuda<T>(const LayerNormFwdArgs<T>&, cudaStream_t);         \
  template cudaError_t LayerNormBwdCuda<T>(const LayerNormBwdArgs<T>&, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
