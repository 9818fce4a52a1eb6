// Beam-search top-k: per batch row, the k best of
//   v(i, t) = scores[i] + (logits[i, t] - max_i) - log(sum_t exp(logits[i, t] - max_i))
// over the beam * vocab candidates (i = beam, t = token), as float32 values and
// flat int32 indices i * vocab + t, sorted by value descending, equal values by
// index ascending (lax.top_k's order). Framework-free: pointers, sizes, stream.
//
// CUDA (LightSeq's hierarchical "R-top-k", no host synchronisation):
//   1. per (row, beam): max and log-sum-exp, and R_i = v(min of k group maxima),
//      split into k contiguous groups: k elements of the beam are >= R_i, so
//      R = max_i R_i is a lower bound of the row's k-th best value;
//   2. per (row, beam, chunk): candidates v >= R appended to a fixed-size
//      workspace of `capacity` entries per row (atomic counter);
//   3. per row: exact k-pass selection over the candidates, or, when they
//      overflowed the workspace, over the full row (slow but exact).
#pragma once

#include <cstdint>

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct BeamTopkArgs {
  const T* logits;      // [batch, beam, vocab]
  const float* scores;  // [batch, beam]
  float* values;        // [batch, k]
  int32_t* indices;     // [batch, k]
  int64_t batch;
  int64_t beam;
  int64_t vocab;
  int64_t k;
};

// CUDA workspace (extra FFI outputs, sized by the caller).
struct BeamTopkWorkspace {
  float* cand_values;    // [batch, capacity]
  int32_t* cand_indices;  // [batch, capacity]
  float* beam_stats;     // [batch, beam, 3]: (R_i, max, log(sum exp(x - max)))
  int32_t* counts;       // [batch] candidates found (may exceed capacity)
  int64_t capacity;
};

template <typename T>
void BeamTopkCpu(const BeamTopkArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t BeamTopkCuda(const BeamTopkArgs<T>& a, const BeamTopkWorkspace& w, cudaStream_t stream);
#endif

}  // namespace lsjax
