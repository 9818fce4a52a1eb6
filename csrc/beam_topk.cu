// CUDA beam-search top-k: LightSeq's hierarchical "R-top-k" in three kernels,
// all stream-ordered (no host synchronisation). See csrc/beam_topk.h.
#include <cfloat>
#include <climits>
#include <cmath>

#include "csrc/beam_topk.h"
#include "csrc/cuda_common.cuh"

namespace lsjax {

using cuda::CeilDiv;

namespace {

using cuda::ToFloat;

constexpr int kThreads = 1024;  // one block streams a whole beam in pass 1: many loads in flight
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 4096;  // vocab elements per compaction block

// A candidate: value, flat index; ordered by value descending, then index ascending.
struct Cand {
  float v;
  int32_t i;
};
__device__ __forceinline__ bool Better(const Cand& a, const Cand& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

__device__ __forceinline__ Cand WarpBest(Cand c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Cand other{__shfl_xor_sync(0xffffffffu, c.v, o), __shfl_xor_sync(0xffffffffu, c.i, o)};
    if (Better(other, c)) c = other;
  }
  return c;
}

// Best candidate of the block, returned to every thread (has barriers).
__device__ Cand BlockBest(Cand c) {
  __shared__ Cand smem[kWarps];
  c = WarpBest(c);
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = c;
  __syncthreads();
  c = smem[0];
  for (int w = 1; w < kWarps; ++w) {
    if (Better(smem[w], c)) c = smem[w];
  }
  return c;
}

__device__ __forceinline__ float BlockMax(float v) {
  return BlockBest(Cand{v, 0}).v;
}

// Running (max, sum of exp(x - max)) of a stream of values.
struct MaxSum {
  float m = -INFINITY;
  float s = 0.f;
  __device__ void Add(float x) {
    if (x == -INFINITY) return;
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
  __device__ void Merge(const MaxSum& o) {
    if (o.m == -INFINITY) return;
    if (m == -INFINITY) {
      *this = o;
      return;
    }
    const float mx = fmaxf(m, o.m);
    s = s * expf(m - mx) + o.s * expf(o.m - mx);
    m = mx;
  }
};

__device__ MaxSum BlockMaxSum(MaxSum a) {
  __shared__ MaxSum smem[kWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other;
    other.m = __shfl_xor_sync(0xffffffffu, a.m, o);
    other.s = __shfl_xor_sync(0xffffffffu, a.s, o);
    a.Merge(other);
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = a;
  __syncthreads();
  a = smem[0];
  for (int w = 1; w < kWarps; ++w) a.Merge(smem[w]);
  return a;
}

// The candidate value of logit x of a beam with stats (max, log_sum) and running score.
__device__ __forceinline__ float Value(float x, const float* stats, float score) {
  return ((x - stats[1]) - stats[2]) + score;
}

// Pass 1, one block per (row, beam): max, log-sum-exp and the threshold R_i,
// the value of the smallest of k group maxima (-inf when vocab < k).
template <typename T>
__global__ void BeamStatsKernel(BeamTopkArgs<T> a, float* stats) {
  const int64_t rb = blockIdx.x;
  const T* x = a.logits + rb * a.vocab;
  const int64_t groups = a.vocab >= a.k ? a.k : 1;
  MaxSum ms;
  float min_group_max = INFINITY;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t lo = g * a.vocab / groups, hi = (g + 1) * a.vocab / groups;
    float gm = -INFINITY;
    for (int64_t t = lo + threadIdx.x; t < hi; t += blockDim.x) {
      const float v = ToFloat(x[t]);
      gm = fmaxf(gm, v);
      ms.Add(v);
    }
    min_group_max = fminf(min_group_max, BlockMax(gm));
  }
  ms = BlockMaxSum(ms);
  if (threadIdx.x == 0) {
    float* st = stats + rb * 3;
    st[1] = ms.m;
    st[2] = logf(ms.s);
    st[0] = a.vocab >= a.k ? Value(min_group_max, st, a.scores[rb]) : -INFINITY;
  }
}

__device__ __forceinline__ float RowThreshold(const float* stats, int64_t beam) {
  float r = -INFINITY;
  for (int64_t i = 0; i < beam; ++i) r = fmaxf(r, stats[i * 3]);
  return r;
}

// Pass 2, grid (row * beam, chunks): append every candidate >= R to the row's workspace.
template <typename T>
__global__ void CompactKernel(BeamTopkArgs<T> a, BeamTopkWorkspace w) {
  const int64_t rb = blockIdx.x, b = rb / a.beam, beam_i = rb % a.beam;
  const float* row_stats = w.beam_stats + b * a.beam * 3;
  const float r = RowThreshold(row_stats, a.beam);
  const float* st = row_stats + beam_i * 3;
  const float score = a.scores[rb];
  const T* x = a.logits + rb * a.vocab;
  const int64_t end = min(a.vocab, static_cast<int64_t>(blockIdx.y + 1) * kChunk);
  for (int64_t t = static_cast<int64_t>(blockIdx.y) * kChunk + threadIdx.x; t < end; t += blockDim.x) {
    const float v = Value(ToFloat(x[t]), st, score);
    if (v >= r) {
      const int slot = atomicAdd(w.counts + b, 1);
      if (slot < w.capacity) {
        w.cand_values[b * w.capacity + slot] = v;
        w.cand_indices[b * w.capacity + slot] = static_cast<int32_t>(beam_i * a.vocab + t);
      }
    }
  }
}

// Pass 3, one block per row: k rounds of "best candidate after the previous
// pick" over the workspace, or over the full row when the workspace overflowed.
template <typename T>
__global__ void SelectKernel(BeamTopkArgs<T> a, BeamTopkWorkspace w) {
  const int64_t b = blockIdx.x;
  const int64_t n = w.counts[b];
  const bool full_scan = n > w.capacity;
  const int64_t size = full_scan ? a.beam * a.vocab : n;
  const float* cv = w.cand_values + b * w.capacity;
  const int32_t* ci = w.cand_indices + b * w.capacity;
  const float* row_stats = w.beam_stats + b * a.beam * 3;
  Cand prev{INFINITY, -1};
  for (int64_t j = 0; j < a.k; ++j) {
    Cand best{-INFINITY, INT_MAX};
    for (int64_t e = threadIdx.x; e < size; e += blockDim.x) {
      Cand c;
      if (full_scan) {
        const int64_t beam_i = e / a.vocab;
        c = Cand{Value(ToFloat(a.logits[b * a.beam * a.vocab + e]), row_stats + beam_i * 3,
                       a.scores[b * a.beam + beam_i]),
                 static_cast<int32_t>(e)};
      } else {
        c = Cand{cv[e], ci[e]};
      }
      if (Better(prev, c) && Better(c, best)) best = c;
    }
    best = BlockBest(best);
    if (threadIdx.x == 0) {
      a.values[b * a.k + j] = best.v;
      a.indices[b * a.k + j] = best.i;
    }
    prev = best;
  }
}

}  // namespace

template <typename T>
cudaError_t BeamTopkCuda(const BeamTopkArgs<T>& a, const BeamTopkWorkspace& w, cudaStream_t stream) {
  const int64_t rows = a.batch * a.beam;
  if (rows == 0) return cudaSuccess;
  if (auto err = cudaMemsetAsync(w.counts, 0, a.batch * sizeof(int32_t), stream); err != cudaSuccess) return err;
  BeamStatsKernel<T><<<rows, kThreads, 0, stream>>>(a, w.beam_stats);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(CeilDiv(a.vocab, kChunk)));
  CompactKernel<T><<<grid, kThreads, 0, stream>>>(a, w);
  SelectKernel<T><<<a.batch, kThreads, 0, stream>>>(a, w);
  return cudaGetLastError();
}

template cudaError_t BeamTopkCuda<float>(const BeamTopkArgs<float>&, const BeamTopkWorkspace&, cudaStream_t);
template cudaError_t BeamTopkCuda<__half>(const BeamTopkArgs<__half>&, const BeamTopkWorkspace&, cudaStream_t);
template cudaError_t BeamTopkCuda<__nv_bfloat16>(const BeamTopkArgs<__nv_bfloat16>&, const BeamTopkWorkspace&,
                                                 cudaStream_t);

}  // namespace lsjax
