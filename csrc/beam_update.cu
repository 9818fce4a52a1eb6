// CUDA beam-search step bookkeeping (csrc/beam_update.h): one block per batch row. Threads below
// 2k / 3k rank the candidates and the finished entries; then each thread moves one sequence
// position (column) of all k alive and k finished rows at a time, through its own column of a
// shared tile, so rows are updated in place without barriers.
#include <cmath>

#include "csrc/beam_update.h"
#include "csrc/cuda_common.cuh"

namespace lsjax {
namespace {

constexpr int kThreads = 128;  // >= 3 * kBeamUpdateMaxBeam
static_assert(kThreads >= 3 * kBeamUpdateMaxBeam);

__global__ void __launch_bounds__(kThreads) BeamUpdateKernel(BeamUpdateArgs a) {
  constexpr int kMax = kBeamUpdateMaxBeam;
  __shared__ float alive_keys[2 * kMax], finished_keys[3 * kMax];
  __shared__ int32_t parent[2 * kMax], token[2 * kMax], keep[kMax], best[kMax];
  __shared__ bool eos[2 * kMax];
  extern __shared__ int32_t tile[];  // [2k][kThreads]: old alive rows, then old finished rows
  const int k = static_cast<int>(a.k), n = 2 * k, t = threadIdx.x;
  const int64_t b = blockIdx.x, T = a.max_len, step = *a.step;
  const float* score = a.cand_scores + b * n;
  if (t < n) {
    const int32_t idx = a.cand_idx[b * n + t];
    parent[t] = static_cast<int32_t>(min(max(idx / a.vocab, int64_t{0}), a.k - 1));
    token[t] = static_cast<int32_t>(idx % a.vocab);
    eos[t] = token[t] == a.eos_id && score[t] > -INFINITY;
    alive_keys[t] = eos[t] ? -INFINITY : score[t];
    finished_keys[k + t] = eos[t] ? score[t] * BeamUpdateInvPenalty(a, step) : -INFINITY;
  }
  if (t < k) {
    finished_keys[t] = a.finished_scores[b * k + t];
    keep[t] = best[t] = 0;  // every slot is written below unless a NaN breaks the ranking
  }
  __syncthreads();
  if (t < n) {
    if (const int64_t r = BeamUpdateRank(alive_keys, n, t); r < k) keep[r] = t;
  }
  if (t < 3 * k) {
    if (const int64_t r = BeamUpdateRank(finished_keys, 3 * k, t); r < k) best[r] = t;
  }
  __syncthreads();
  float new_score = 0.f;
  bool new_flag = false;
  if (t < k) {
    const int c = keep[t], f = best[t];
    a.alive_tokens[b * k + t] = token[c];
    a.alive_parents[b * k + t] = parent[c];
    a.alive_scores[b * k + t] = score[c];
    new_score = finished_keys[f];
    new_flag = f < k ? a.finished_flags[b * k + f] : eos[f - k];
  }
  __syncthreads();  // every old flag is read before any is overwritten
  if (t < k) {
    a.finished_scores[b * k + t] = new_score;
    a.finished_flags[b * k + t] = new_flag;
  }
  int32_t* alive = a.alive_seqs + b * k * T;
  int32_t* finished = a.finished_seqs + b * k * T;
  int32_t* old_alive = tile + t;                   // row j at old_alive[j * kThreads]
  int32_t* old_finished = tile + k * kThreads + t;
  for (int64_t p = t; p < T; p += kThreads) {
    for (int j = 0; j < k; ++j) {
      old_alive[j * kThreads] = alive[j * T + p];
      old_finished[j * kThreads] = finished[j * T + p];
    }
    auto cand_at = [&](int c) { return p == step ? token[c] : old_alive[parent[c] * kThreads]; };
    for (int j = 0; j < k; ++j) {
      const int f = best[j];
      alive[j * T + p] = cand_at(keep[j]);
      finished[j * T + p] = f < k ? old_finished[f * kThreads] : cand_at(f - k);
    }
  }
}

}  // namespace

cudaError_t BeamUpdateCuda(const BeamUpdateArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  const size_t tile = 2 * a.k * kThreads * sizeof(int32_t);
  BeamUpdateKernel<<<static_cast<unsigned>(a.batch), kThreads, tile, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace lsjax
