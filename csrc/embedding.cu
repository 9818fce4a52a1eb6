// CUDA embedding (forward and backward).
//
// Forward: a 2-D block (column vectors x tokens); each thread owns fixed
// 16-byte column vectors and walks tokens grid-stride, so the sinusoid
// frequencies exp(i * c) are computed once per thread. Table/position rows are
// gathered with 16-byte loads, math is float32 in registers, one 16-byte store.
// With sinusoidal positions and hidden/2 a multiple of the vector width a
// thread owns column vector c of the sin half and the same vector of the cos
// half ("paired"): one SinCos (one range reduction, csrc/fast_math.h) feeds
// two outputs.
// Dropout draws one Philox call per 8 consecutive elements (8-aligned element
// index), falling back to one call per element when misaligned
// (DropoutKeepBits, csrc/philox.h). Each token's gathers are issued first; the
// keep bits and the sinusoid (neither needs the gathered data) are computed
// while they are in flight, and only then are the rows combined.
//
// Backward: deterministic segment sum, no atomics. The caller sorts the tokens
// by key (stable), so each table row's tokens form one contiguous segment in
// ascending token order. A first kernel finds every row's segment start (one
// thread per row, binary search); then one (block row, threadIdx.y) per table
// row sums the segment's dy rows in that order in
// float32 registers (2-4 rows' loads in flight), then writes the whole row once:
// unused rows get zeros, so the gradient needs no memset.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "csrc/cuda_common.cuh"
#include "csrc/embedding.h"
#include "csrc/fast_math.h"
#include "csrc/philox.h"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::LoadFloats;
using cuda::NextPow2;
using cuda::StoreFloats;

constexpr int kBlock = 256;

using cuda::Int;
template <bool B>
using Bool = std::bool_constant<B>;

__device__ __forceinline__ int64_t ClampRow(int64_t v, int64_t rows) {
  return v < 0 ? 0 : (v >= rows ? rows - 1 : v);
}

// ---------------------------------------------------------------- forward --

// LEARNED: positions from pos_table. PAIRED (sinusoidal only, hidden even,
// half % VEC == 0): column vector cv covers [cv*VEC, +VEC) and the same
// columns + half.
template <typename T, int VEC, bool LEARNED, bool PAIRED, bool DROPOUT>
__global__ void __launch_bounds__(kBlock, 3) EmbFwd(EmbeddingFwdArgs<T> a, float freq_exp) {
  const int64_t h = a.hidden;
  const int64_t half = h / 2;
  const int64_t ncv = PAIRED ? half / VEC : h / VEC;
  DropoutRng rng{};
  if constexpr (DROPOUT) rng = MakeDropoutRng(a.rng, a.rate);
  const int64_t token_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t cv = threadIdx.x; cv < ncv; cv += blockDim.x) {
    const int64_t c = cv * VEC;
    float freq[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = c + k;
      const int64_t i = (PAIRED || j < half) ? j : j - half;
      freq[k] = LEARNED ? 0.f : expf(static_cast<float>(i) * freq_exp);
    }
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; n < a.tokens; n += token_stride) {
      T* out = a.y + n * h + c;
      // All per-token loads at once: the gathers then wait for one latency.
      const int32_t id = a.ids[n];
      const int32_t pos = a.positions[n];
      const uint64_t tok = DROPOUT ? static_cast<uint64_t>(a.token_index[n]) : 0u;
      float v[VEC], w[VEC];
      if (id == a.padding_id) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = 0.f;
        StoreFloats<T, VEC>(out, v);
        if constexpr (PAIRED) StoreFloats<T, VEC>(out + half, v);
        continue;
      }
      const T* row = a.table + ClampRow(id, a.vocab) * h + c;
      float pv[VEC], pw[VEC];  // positional values of v's and w's columns
      LoadFloats<T, VEC>(row, v);
      if constexpr (PAIRED) LoadFloats<T, VEC>(row + half, w);
      if constexpr (LEARNED) LoadFloats<T, VEC>(a.pos_table + ClampRow(pos, a.max_positions) * h + c, pv);
      uint32_t keep_v = 0, keep_w = 0;
      if constexpr (DROPOUT) {
        const uint64_t e = tok * static_cast<uint64_t>(h) + c;
        keep_v = DropoutKeepBits<VEC>(rng, e);
        if constexpr (PAIRED) keep_w = DropoutKeepBits<VEC>(rng, e + half);
      }
      if constexpr (!LEARNED) {
        const float p = static_cast<float>(pos);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float sin_pf, cos_pf;
          SinCos(p * freq[k], &sin_pf, &cos_pf);
          if constexpr (PAIRED) {
            pv[k] = sin_pf;
            pw[k] = cos_pf;
          } else {
            const int64_t j = c + k;
            pv[k] = j < half ? sin_pf : (j < 2 * half ? cos_pf : 0.f);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v[k] = v[k] * a.scale + pv[k];
        if constexpr (PAIRED) w[k] = w[k] * a.scale + pw[k];
      }
      if constexpr (DROPOUT) {
        ApplyKeepBits<VEC>(keep_v, rng.scale, v);
        if constexpr (PAIRED) ApplyKeepBits<VEC>(keep_w, rng.scale, w);
      }
      StoreFloats<T, VEC>(out, v);
      if constexpr (PAIRED) StoreFloats<T, VEC>(out + half, w);
    }
  }
}

// --------------------------------------------------------------- backward --

// First index i in [0, n) with keys[i] >= key (keys sorted ascending).
__device__ __forceinline__ int64_t LowerBound(const int32_t* keys, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(keys[mid]) < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The dropped-out dy columns [c, c + VEC) of the ROWS tokens at sorted
// positions [i, i + ROWS): all loads first, then the keep bits (while the loads
// are in flight), then the mask.
template <typename T, int VEC, int ROWS, bool DROPOUT>
__device__ __forceinline__ void LoadGrads(const EmbeddingBwdArgs<T>& a, const DropoutRng& rng, int64_t i, int64_t c,
                                          float (&v)[ROWS][VEC]) {
  int64_t n[ROWS];
#pragma unroll
  for (int u = 0; u < ROWS; ++u) {
    n[u] = a.order[i + u];
    LoadFloats<T, VEC>(a.dy + n[u] * a.hidden + c, v[u]);
  }
  if constexpr (DROPOUT) {
    uint32_t keep[ROWS];
#pragma unroll
    for (int u = 0; u < ROWS; ++u) {
      const uint64_t e = static_cast<uint64_t>(a.token_index[n[u]]) * static_cast<uint64_t>(a.hidden) + c;
      keep[u] = DropoutKeepBits<VEC>(rng, e);
    }
#pragma unroll
    for (int u = 0; u < ROWS; ++u) ApplyKeepBits<VEC>(keep[u], rng.scale, v[u]);
  }
}

// seg[r] = number of keys < r for r in [0, rows]: row r's segment is
// [seg[r], seg[r + 1]). One thread per row, so the binary searches' latency
// overlaps across the whole grid instead of serialising in EmbBwd.
__global__ void __launch_bounds__(kBlock) SegmentStarts(const int32_t* keys, int64_t tokens, int64_t rows,
                                                         int32_t* seg) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r <= rows) seg[r] = static_cast<int32_t>(LowerBound(keys, tokens, r));
}

template <typename T, int VEC, bool DROPOUT>
__global__ void __launch_bounds__(kBlock, 3) EmbBwd(EmbeddingBwdArgs<T> a, const int32_t* seg) {
  const int64_t h = a.hidden;
  const int64_t ncv = h / VEC;
  DropoutRng rng{};
  if constexpr (DROPOUT) rng = MakeDropoutRng(a.rng, a.rate);
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < a.rows; r += row_stride) {
    const int64_t lo = seg[r], hi = seg[r + 1];
    for (int64_t cv = threadIdx.x; cv < ncv; cv += blockDim.x) {
      const int64_t c = cv * VEC;
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
      int64_t i = lo;
      // UNROLL rows in flight (fewer with 8-wide dropout, to stay in 80
      // registers without spills); summed in ascending segment order, as the
      // CPU twin does.
      constexpr int UNROLL = (DROPOUT && VEC >= 8) ? 2 : 4;
      for (; i + UNROLL <= hi; i += UNROLL) {
        float v[UNROLL][VEC];
        LoadGrads<T, VEC, UNROLL, DROPOUT>(a, rng, i, c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) acc[k] += v[u][k];
        }
      }
      for (; i < hi; ++i) {
        float v[1][VEC];
        LoadGrads<T, VEC, 1, DROPOUT>(a, rng, i, c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += v[0][k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] *= a.factor;
      StoreFloats<T, VEC>(a.grad + r * h + c, acc);
    }
  }
}

// ------------------------------------------------------------ launch plan --

// Threads per block along columns (a power of two in [32, 256]) for ncv vectors.
int ColumnThreads(int64_t ncv) { return static_cast<int>(std::min<int64_t>(kBlock, std::max(32, NextPow2(ncv)))); }

// Grid over `items` (tokens or rows) with `per_block` per block-iteration:
// about four waves of resident blocks, the rest grid-stride.
int64_t Grid(int64_t items, int per_block) {
  const int64_t cap = static_cast<int64_t>(cuda::NumSMs()) * (2048 / kBlock) * 4;
  return std::max<int64_t>(1, std::min<int64_t>(CeilDiv(items, per_block), cap));
}

}  // namespace

template <typename T>
cudaError_t EmbeddingFwdCuda(const EmbeddingFwdArgs<T>& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.hidden == 0) return cudaSuccess;
  constexpr int kVec = cuda::kVec16<T>;
  const bool learned = a.pos_table != nullptr;
  const bool vectorisable = a.hidden % kVec == 0 && cuda::Aligned(a.table, 16) && cuda::Aligned(a.pos_table, 16) &&
                            cuda::Aligned(a.y, 16);
  const int vec = vectorisable ? kVec : 1;
  const int64_t half = a.hidden / 2;
  const bool paired = !learned && 2 * half == a.hidden && half % vec == 0;
  const float freq_exp =
      static_cast<float>(-std::log(10000.0) / static_cast<double>(std::max<int64_t>(half - 1, 1)));
  const int64_t ncv = paired ? half / vec : a.hidden / vec;
  const int tx = ColumnThreads(ncv);
  const dim3 block(tx, kBlock / tx);
  const int64_t grid = Grid(a.tokens, kBlock / tx);
  const bool dropout = a.rate > 0.f;
  auto launch = [&](auto v, auto l, auto p, auto d) {
    EmbFwd<T, decltype(v)::value, decltype(l)::value, decltype(p)::value, decltype(d)::value>
        <<<grid, block, 0, stream>>>(a, freq_exp);
  };
  auto by_dropout = [&](auto v, auto l, auto p) {
    if (dropout) {
      launch(v, l, p, Bool<true>{});
    } else {
      launch(v, l, p, Bool<false>{});
    }
  };
  auto by_mode = [&](auto v) {
    if (learned) {
      by_dropout(v, Bool<true>{}, Bool<false>{});
    } else if (paired) {
      by_dropout(v, Bool<false>{}, Bool<true>{});
    } else {
      by_dropout(v, Bool<false>{}, Bool<false>{});
    }
  };
  if (vec == 1) {
    by_mode(Int<1>{});
  } else {
    by_mode(Int<kVec>{});
  }
  return cudaGetLastError();
}


template <typename T>
cudaError_t EmbeddingBwdCuda(const EmbeddingBwdArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0 || a.hidden == 0) return cudaSuccess;
  int32_t* seg = a.segment_starts;
  SegmentStarts<<<static_cast<unsigned>(CeilDiv(a.rows + 1, kBlock)), kBlock, 0, stream>>>(a.keys, a.tokens,
                                                                                         a.rows, seg);
  constexpr int kVec = cuda::kVec16<T>;
  const bool vectorisable = a.hidden % kVec == 0 && cuda::Aligned(a.dy, 16) && cuda::Aligned(a.grad, 16);
  const int vec = vectorisable ? kVec : 1;
  const int tx = ColumnThreads(a.hidden / vec);
  const dim3 block(tx, kBlock / tx);
  const int64_t grid = Grid(a.rows, kBlock / tx);
  const bool dropout = a.rate > 0.f;
  auto launch = [&](auto v, auto d) {
    EmbBwd<T, decltype(v)::value, decltype(d)::value><<<grid, block, 0, stream>>>(a, seg);
  };
  auto by_dropout = [&](auto v) {
    if (dropout) {
      launch(v, Bool<true>{});
    } else {
      launch(v, Bool<false>{});
    }
  };
  if (vec == 1) {
    by_dropout(Int<1>{});
  } else {
    by_dropout(Int<kVec>{});
  }
  return cudaGetLastError();
}

#define LSJAX_INSTANTIATE(T)                                                                  \
  template cudaError_t EmbeddingFwdCuda<T>(const EmbeddingFwdArgs<T>&, cudaStream_t);         \
  template cudaError_t EmbeddingBwdCuda<T>(const EmbeddingBwdArgs<T>&, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
