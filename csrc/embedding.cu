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
// ascending token order. SegmentStarts finds every row's segment start (one
// thread per row, binary search). EmbBwdChunks splits the sorted tokens into
// chunks of `chunk` (<= kEmbeddingBwdMaxChunk): one block per chunk walks its tokens in order,
// kBwdStages dy rows in flight per thread, and sums each run of equal keys in
// float32; a segment inside one chunk is written to grad there, a segment cut
// by chunk boundaries leaves one float32 partial per chunk it touches. Then
// EmbBwdRows, one thread group per table row, writes the rest: zeros for rows
// without tokens, and each cut segment's partials added in chunk order. Every
// token is read once however the tokens spread over rows (one frequent token's
// long segment is split across chunks, not summed by one thread), and every
// grad element is written once: the gradient needs no memset.
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

// seg[r] = number of keys < r for r in [0, rows]: row r's segment is
// [seg[r], seg[r + 1]), and seg[rows] counts the tokens that have a row.
// One thread per row, so the binary searches' latency overlaps across the grid.
__global__ void __launch_bounds__(kBlock) SegmentStarts(const int32_t* keys, int64_t tokens, int64_t rows,
                                                         int32_t* seg) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r <= rows) seg[r] = static_cast<int32_t>(LowerBound(keys, tokens, r));
}

constexpr int kBwdStages = 4;  // dy rows of loads in flight per thread

// Block q walks chunk q's sorted tokens [q * chunk, min(q * chunk + chunk,
// seg[rows])) in order, one column vector per thread, and sums each run of
// equal keys in float32 registers. A run that is its row's whole segment is
// written to grad; a run cut by the chunk's start goes to partial row 2q, one
// cut by its end (only) to partial row 2q + 1, for EmbBwdRows to finish. The
// chunk's keys, token order and dropout token indices are read once into
// shared memory; dy rows arrive through the thread's cp.async slots,
// kBwdStages tokens ahead, and each token's keep bits are drawn while its row
// is in flight.
template <typename T, int VEC, bool DROPOUT>
__global__ void __launch_bounds__(kBlock, 4) EmbBwdChunks(EmbeddingBwdArgs<T> a, const int32_t* seg) {
  using V = cuda::Vec<T, VEC>;
  __shared__ int32_t s_key[kEmbeddingBwdMaxChunk + 2];  // keys of sorted positions begin - 1 .. begin + chunk (-1: none)
  __shared__ int32_t s_token[kEmbeddingBwdMaxChunk];
  __shared__ uint32_t s_index[kEmbeddingBwdMaxChunk];  // token_index of each token (dropout)
  __shared__ V ring[kBwdStages][kBlock];
  const int64_t h = a.hidden;
  const int64_t ncv = h / VEC;
  const int64_t n_valid = seg[a.rows];
  DropoutRng rng{};
  if constexpr (DROPOUT) rng = MakeDropoutRng(a.rng, a.rate);
  for (int64_t q = blockIdx.x; q * a.chunk < n_valid; q += gridDim.x) {
    const int64_t begin = q * a.chunk;
    const int len = static_cast<int>(n_valid - begin < a.chunk ? n_valid - begin : a.chunk);
    __syncthreads();  // the previous chunk's reads of the shared arrays are done
    for (int t = threadIdx.x; t < len + 2; t += blockDim.x) {
      const int64_t i = begin - 1 + t;
      s_key[t] = i >= 0 && i < n_valid ? a.keys[i] : -1;
    }
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
      const int32_t n = a.order[begin + t];
      s_token[t] = n;
      if constexpr (DROPOUT) s_index[t] = static_cast<uint32_t>(a.token_index[n]);
    }
    __syncthreads();
    const bool cut_at_start = s_key[0] == s_key[1];
    const bool cut_at_end = s_key[len] == s_key[len + 1];
    for (int64_t cv = threadIdx.x; cv < ncv; cv += blockDim.x) {
      const int64_t c = cv * VEC;
      auto stage = [&](int slot, int p) {  // one commit group per token, empty past the end
        if (p < len) cuda::CopyVecAsync<T, VEC>(&ring[slot][threadIdx.x], a.dy + s_token[p] * h + c);
        cuda::CopyAsyncCommit();
      };
#pragma unroll
      for (int p = 0; p < kBwdStages; ++p) stage(p, p);
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
      int run_start = 0, slot = 0;
      for (int p = 0; p < len; ++p) {
        uint32_t keep = 0;
        if constexpr (DROPOUT) keep = DropoutKeepBits<VEC>(rng, static_cast<uint64_t>(s_index[p]) * h + c);
        cuda::CopyAsyncWait<kBwdStages - 1>();  // token p's group, the oldest, has landed
        float v[VEC];
        LoadFloats<T, VEC>(ring[slot][threadIdx.x].v, v);
        stage(slot, p + kBwdStages);
        slot = slot + 1 == kBwdStages ? 0 : slot + 1;
        if constexpr (DROPOUT) ApplyKeepBits<VEC>(keep, rng.scale, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += v[k];
        if (p + 1 < len && s_key[p + 2] == s_key[p + 1]) continue;  // the run goes on
        if (run_start == 0 && cut_at_start) {
          StoreFloats<float, VEC>(a.partials + (2 * q) * h + c, acc);
        } else if (p + 1 == len && cut_at_end) {
          StoreFloats<float, VEC>(a.partials + (2 * q + 1) * h + c, acc);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] *= a.factor;
          StoreFloats<T, VEC>(a.grad + static_cast<int64_t>(s_key[p + 1]) * h + c, acc);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
        run_start = p + 1;
      }
    }
  }
}

constexpr int kRowsPerGroup = 8;  // table rows per EmbBwdRows thread group and iteration

// The rows EmbBwdChunks did not write: zeros for rows without tokens, and for
// a segment cut by chunk boundaries, its partial in its first chunk (2q + 1)
// then those of the following chunks it reaches (2q), in order. Each thread
// group (threadIdx.y) takes kRowsPerGroup consecutive rows at a time and reads
// their segment starts at once (most rows need nothing: one latency for all).
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) EmbBwdRows(EmbeddingBwdArgs<T> a, const int32_t* seg) {
  const int64_t h = a.hidden;
  const int64_t ncv = h / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y * kRowsPerGroup;
  for (int64_t r0 = (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * kRowsPerGroup; r0 < a.rows;
       r0 += stride) {
    int64_t starts[kRowsPerGroup + 1];
#pragma unroll
    for (int u = 0; u <= kRowsPerGroup; ++u) starts[u] = seg[r0 + u <= a.rows ? r0 + u : a.rows];
#pragma unroll
    for (int u = 0; u < kRowsPerGroup; ++u) {
      const int64_t r = r0 + u, lo = starts[u], hi = starts[u + 1];
      const int64_t q0 = lo / a.chunk, q1 = lo < hi ? (hi - 1) / a.chunk : q0;
      if (r >= a.rows || (lo < hi && q0 == q1)) continue;
      for (int64_t cv = threadIdx.x; cv < ncv; cv += blockDim.x) {
        const int64_t c = cv * VEC;
        float acc[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
        for (int64_t q = q0; q < q1 + (lo < hi); ++q) {
          float v[VEC];
          LoadFloats<float, VEC>(a.partials + (q == q0 ? 2 * q + 1 : 2 * q) * h + c, v);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += v[k];
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] *= a.factor;
        StoreFloats<T, VEC>(a.grad + r * h + c, acc);
      }
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
  if (a.chunk < 1 || a.chunk > kEmbeddingBwdMaxChunk) return cudaErrorInvalidValue;
  int32_t* seg = a.segment_starts;
  SegmentStarts<<<static_cast<unsigned>(CeilDiv(a.rows + 1, kBlock)), kBlock, 0, stream>>>(a.keys, a.tokens,
                                                                                         a.rows, seg);
  constexpr int kVec = cuda::kVec16<T>;
  const bool vectorisable = a.hidden % kVec == 0 && cuda::Aligned(a.dy, 16) && cuda::Aligned(a.grad, 16);
  const int vec = vectorisable ? kVec : 1;
  const int tx = ColumnThreads(a.hidden / vec);
  const dim3 rows_block(tx, kBlock / tx);
  const int64_t rows_grid = Grid(CeilDiv(a.rows, kRowsPerGroup), kBlock / tx);
  const bool dropout = a.rate > 0.f;
  auto launch = [&](auto v, auto d) {
    constexpr int kV = decltype(v)::value;
    const auto chunks = EmbBwdChunks<T, kV, decltype(d)::value>;
    if (a.tokens > 0) {
      const int64_t chunks_grid = std::min<int64_t>(CeilDiv(a.tokens, a.chunk),
                                                    cuda::ResidentBlocksPerSM(chunks, tx, 0) * cuda::NumSMs());
      chunks<<<chunks_grid, tx, 0, stream>>>(a, seg);
    }
    EmbBwdRows<T, kV><<<rows_grid, rows_block, 0, stream>>>(a, seg);
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
