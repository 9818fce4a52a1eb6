// CUDA split_heads (csrc/split_heads.h), forward and backward: memory-bound
// copies between the [rows = batch * length, cols = n * heads * head_dim]
// view of x / dx and the n head-major outputs / cotangents.
//
// Layout: a 2-D grid over (column vectors, rows); blocks of kBlockX column
// vectors (one warp) x kBlockY row lanes. Each thread owns VEC consecutive
// columns (16-byte accesses when head_dim and the pointers allow, else 8, 4,
// 2 bytes: a vector never straddles two heads), so its output j, head h and
// offset in head_dim are fixed: computed once, with the bias in registers. It
// walks runs of kRowsInFlight consecutive positions (same batch index; runs
// along batch when length is shorter) with a grid stride, issuing a run's
// loads before its stores: rows a fixed stride apart in both layouts, so one
// division per run. A warp reads or writes 32 consecutive vectors of one row
// of x: whole head_dim segments, each contiguous in its output too (128 bytes
// for head_dim 64 in 16-bit types), so both sides are fully coalesced. One
// row lane per run (grid-stride only past 65535 row blocks, or past the
// dbias workspace's partial rows): kMinBlocks blocks per SM resident, 64
// bytes of loads in flight per thread with 16-byte vectors, 64 KiB per SM.
//
// Backward dbias is deterministic: each thread accumulates its columns over
// its rows in float32 registers, the block sums its row lanes through shared
// memory in a fixed order into one partial row per blockIdx.y, and
// cuda::LaunchColumnSums sums the partial rows in a fixed order. No float
// atomics. The cotangents are copied to dx as they are (no float round trip).
#include <algorithm>

#include "csrc/cuda_common.cuh"
#include "csrc/split_heads.h"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::Int;
using cuda::LoadFloats;
using cuda::StoreFloats;
using cuda::Vec;

constexpr int kBlockX = 32;  // column vectors per block (one warp)
constexpr int kBlockY = 8;   // row lanes per block
constexpr int kBlock = kBlockX * kBlockY;
constexpr int kMinBlocks = 4;      // blocks per SM: <= 64 registers per thread
constexpr int kRowsInFlight = 4;   // rows of loads a thread issues before their stores
constexpr int kMaxVec = 8;         // 16 bytes of 16-bit elements

// The thread's column vector [c0, c0 + VEC) of the [rows, cols] view: output
// j, and head_offset = where (h, l = 0, k0) sits in out_j.
struct Column {
  int64_t c0;
  int64_t j;
  int64_t head_offset;

  template <int VEC>
  __device__ static Column Of(const SplitHeadsDims& d) {  // 32-bit divisions: cols < 2^31 (checked by the handler)
    const uint32_t c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    const uint32_t head_dim = static_cast<uint32_t>(d.head_dim), heads = static_cast<uint32_t>(d.heads);
    const uint32_t jh = c0 / head_dim, k0 = c0 - jh * head_dim;
    const uint32_t j = jh / heads, h = jh - j * heads;
    return {c0, j, static_cast<int64_t>(h) * d.length * d.head_dim + k0};
  }
};

// The rows of the [batch, length] grid in runs of up to kRowsInFlight
// consecutive indices along one axis (length; batch when length is shorter
// than a run): run g covers indices [a0, a0 + kRowsInFlight) of the run axis
// at index o of the other axis, o = g / per_outer, a0 = (g % per_outer) *
// kRowsInFlight. Consecutive rows of a run are a fixed stride apart in both
// layouts (row r = (b, l) sits at r * cols in the [rows, cols] view and at
// (b * heads * length + l) * head_dim in an output). Computed on the host.
struct Runs {
  uint32_t count;      // runs in all
  uint32_t per_outer;  // runs per index of the other axis
  int64_t run_size;    // the run axis' size
  int64_t outer_rows, outer_heads;  // the other axis' strides: [rows, cols] view, outputs (elements)
  int64_t run_rows, run_heads;      // the run axis' strides

  static Runs Of(const SplitHeadsDims& d) {
    const int64_t cols = d.Cols(), plane = d.heads * d.length * d.head_dim;  // one batch index of an output
    const bool along_length = d.length >= kRowsInFlight || d.length >= d.batch;
    Runs runs{};
    runs.run_size = along_length ? d.length : d.batch;
    const int64_t outer = along_length ? d.batch : d.length;
    runs.per_outer = static_cast<uint32_t>(CeilDiv(runs.run_size, kRowsInFlight));
    runs.count = static_cast<uint32_t>(outer * runs.per_outer);
    runs.outer_rows = along_length ? d.length * cols : cols;
    runs.outer_heads = along_length ? plane : d.head_dim;
    runs.run_rows = along_length ? cols : d.length * cols;
    runs.run_heads = along_length ? d.head_dim : plane;
    return runs;
  }
};

// The first n pointers of an output/cotangent table, picked without indexing
// the kernel parameter (which would copy it to the stack).
template <typename P>
__device__ __forceinline__ P Pick(P const (&table)[kSplitHeadsMaxN], int64_t j) {
  static_assert(kSplitHeadsMaxN == 3, "Pick selects among 3 pointers");
  return j == 0 ? table[0] : (j == 1 ? table[1] : table[2]);
}

// Moves the thread's column vector of each of its rows from src to dst, both
// already offset to the thread's column: kToHeads (forward) reads row r of
// the [rows, cols] view and writes the output layout, else (backward) the
// reverse. visit(v) sees (and may change) each vector between its load and
// its store.
template <bool kToHeads, typename T, int VEC, typename Visit>
__device__ __forceinline__ void MoveRows(const Runs& runs, const T* src, T* dst, Visit&& visit) {
  using V = Vec<T, VEC>;
  const int64_t src_step = kToHeads ? runs.run_rows : runs.run_heads;
  const int64_t dst_step = kToHeads ? runs.run_heads : runs.run_rows;
  for (uint32_t g = blockIdx.y * blockDim.y + threadIdx.y; g < runs.count; g += gridDim.y * blockDim.y) {
    const uint32_t o = g / runs.per_outer;
    const int64_t a0 = static_cast<int64_t>(g - o * runs.per_outer) * kRowsInFlight;
    const int64_t valid = runs.run_size - a0;  // this run's rows: min(valid, kRowsInFlight)
    const int64_t in_rows = o * runs.outer_rows + a0 * runs.run_rows;
    const int64_t in_heads = o * runs.outer_heads + a0 * runs.run_heads;
    const T* from = src + (kToHeads ? in_rows : in_heads);
    T* to = dst + (kToHeads ? in_heads : in_rows);
    if (valid < kRowsInFlight) {  // a short run (the run axis' end): one row at a time
      for (int u = 0; u < valid; ++u) {
        V v = *reinterpret_cast<const V*>(from + u * src_step);
        visit(v);
        *reinterpret_cast<V*>(to + u * dst_step) = v;
      }
      continue;
    }
    V v[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) v[u] = *reinterpret_cast<const V*>(from + u * src_step);
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      visit(v[u]);
      *reinterpret_cast<V*>(to + u * dst_step) = v[u];
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock, kMinBlocks) SplitHeadsFwdKernel(SplitHeadsFwdArgs<T> a, Runs runs) {
  const Column col = Column::Of<VEC>(a.dims);
  if (col.c0 >= a.dims.Cols()) return;  // no barriers below
  float bias[VEC];
  if (a.bias.data) {
    cuda::LoadParams<T, VEC>(a.bias, col.c0, bias);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) bias[k] = -0.f;  // the identity of float addition, even for -0
  }
  MoveRows<true, T, VEC>(runs, a.x + col.c0, Pick(a.out, col.j) + col.head_offset, [&](Vec<T, VEC>& v) {
    float f[VEC];
    LoadFloats<T, VEC>(v.v, f);
#pragma unroll
    for (int k = 0; k < VEC; ++k) f[k] += bias[k];
    StoreFloats<T, VEC>(v.v, f);
  });
}

// partial: [gridDim.y, cols] float32, or nullptr without dbias.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock, kMinBlocks) SplitHeadsBwdKernel(SplitHeadsBwdArgs<T> a, Runs runs,
                                                                             float* partial) {
  __shared__ float lanes[kBlockY][kMaxVec][kBlockX];
  const Column col = Column::Of<VEC>(a.dims);
  const bool active = col.c0 < a.dims.Cols();  // inactive threads still reach the barrier
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  if (active) {
    MoveRows<false, T, VEC>(runs, Pick(a.dout, col.j) + col.head_offset, a.dx + col.c0, [&](const Vec<T, VEC>& v) {
      if (partial == nullptr) return;
      float f[VEC];
      LoadFloats<T, VEC>(v.v, f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += f[k];
    });
  }
  if (partial == nullptr) return;  // uniform over the block
#pragma unroll
  for (int k = 0; k < VEC; ++k) lanes[threadIdx.y][k][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  for (int y = 1; y < kBlockY; ++y) {  // lane 0 first, then in order
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += lanes[y][k][threadIdx.x];
  }
  float* out = partial + static_cast<int64_t>(blockIdx.y) * a.dims.Cols() + col.c0;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = acc[k];
}

// ------------------------------------------------------------ launch plan --

// Widest vector (elements) that divides head_dim and that every pointer's
// alignment allows: 16 bytes, then halving down to one element. The
// parameter vector (elem_bytes per element) is read VEC elements at a time too.
template <typename T>
int PickVec(int64_t head_dim, const void* const* ptrs, int n_ptrs, const void* param, size_t param_elem_bytes) {
  for (int vec = cuda::kVec16<T>; vec > 1; vec /= 2) {
    bool fits = head_dim % vec == 0 &&
                cuda::Aligned(param, static_cast<int>(std::min<size_t>(16, vec * param_elem_bytes)));
    for (int i = 0; i < n_ptrs; ++i) fits = fits && cuda::Aligned(ptrs[i], vec * static_cast<int>(sizeof(T)));
    if (fits) return vec;
  }
  return 1;
}

// Calls f(Int<VEC>) for vec in {16 bytes of T, ..., 1 element}.
template <typename T, typename F>
void DispatchVec(int vec, F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (vec == 8) return f(Int<8>{});
  }
  if (vec == 4) return f(Int<4>{});
  if (vec == 2) return f(Int<2>{});
  f(Int<1>{});
}

// A launch: vector width, grid (column vectors, run lanes) and the runs.
struct Plan {
  int vec;
  dim3 grid;
  Runs runs;
};

// One run per row lane, at most max_row_blocks (and 65535) blocks along y.
// Session 18 swept capping the grid at 1, 2 and 4 waves of kMinBlocks blocks per
// SM against this: only one lane per run was at or above XLA at every benchmarked
// shape (RESULTS.md). ptrs: the n + 1 tensors' data.
template <typename T>
Plan MakePlan(const SplitHeadsDims& d, const void* const* ptrs, const void* param, size_t param_elem_bytes,
              int64_t max_row_blocks) {
  Plan plan{PickVec<T>(d.head_dim, ptrs, static_cast<int>(1 + d.n), param, param_elem_bytes), dim3(), Runs::Of(d)};
  const int64_t grid_x = CeilDiv(d.Cols() / plan.vec, kBlockX);
  const int64_t grid_y = std::min({CeilDiv(plan.runs.count, kBlockY), max_row_blocks, int64_t{65535}});
  plan.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(std::max<int64_t>(1, grid_y)));
  return plan;
}

const dim3 kBlockShape(kBlockX, kBlockY);

}  // namespace

template <typename T>
cudaError_t SplitHeadsFwdCuda(const SplitHeadsFwdArgs<T>& a, cudaStream_t stream) {
  if (a.dims.Rows() == 0 || a.dims.Cols() == 0) return cudaSuccess;
  const void* ptrs[1 + kSplitHeadsMaxN] = {a.x, a.out[0], a.out[1], a.out[2]};
  const Plan plan = MakePlan<T>(a.dims, ptrs, a.bias.data, a.bias.ElementBytes(), a.dims.Rows());
  DispatchVec<T>(plan.vec, [&](auto v) {
    SplitHeadsFwdKernel<T, decltype(v)::value><<<plan.grid, kBlockShape, 0, stream>>>(a, plan.runs);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t SplitHeadsBwdCuda(const SplitHeadsBwdArgs<T>& a, cudaStream_t stream) {
  const int64_t rows = a.dims.Rows(), cols = a.dims.Cols();
  if (cols == 0) return cudaSuccess;
  if (rows == 0) {
    if (a.dbias.data) cudaMemsetAsync(a.dbias.data, 0, cols * a.dbias.ElementBytes(), stream);
    return cudaGetLastError();
  }
  const void* ptrs[1 + kSplitHeadsMaxN] = {a.dx, a.dout[0], a.dout[1], a.dout[2]};
  const int64_t capacity = ColumnSumPartialRows(rows);  // a.partials' rows
  float* partial = a.dbias.data ? a.partials : nullptr;
  const Plan plan = MakePlan<T>(a.dims, ptrs, nullptr, 0, partial ? capacity : rows);
  DispatchVec<T>(plan.vec, [&](auto v) {
    SplitHeadsBwdKernel<T, decltype(v)::value><<<plan.grid, kBlockShape, 0, stream>>>(a, plan.runs, partial);
  });
  if (partial) {
    return cuda::LaunchColumnSums<T>(partial, capacity, plan.grid.y, cols, a.dbias, ParamGrad<T>{}, stream);
  }
  return cudaGetLastError();
}

#define LSJAX_INSTANTIATE(T)                                                              \
  template cudaError_t SplitHeadsFwdCuda<T>(const SplitHeadsFwdArgs<T>&, cudaStream_t); \
  template cudaError_t SplitHeadsBwdCuda<T>(const SplitHeadsBwdArgs<T>&, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
