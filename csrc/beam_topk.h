// Beam-search top-k: per batch row, the k best of
//   v(i, t) = scores[i] + (logits[i, t] - max_i) - log(sum_t exp(logits[i, t] - max_i))
// over the beam * vocab candidates (i = beam, t = token), as float32 values and
// flat int32 indices i * vocab + t, sorted by value descending. Equal values
// come in index order (lax.top_k's order), with one refinement: where float32
// rounding maps two different logits of one beam onto the same value, the
// larger logit comes first. A dead beam (score -inf or NaN) counts its logits
// as -inf. Framework-free: pointers, sizes, stream.
//
// CUDA, two launches, no host synchronisation (details in beam_topk.cu):
//   1. one warp per (row, beam, chunk of kBeamTopkChunk tokens): the chunk's
//      partial (max, sum exp) and its k best tokens by logit, a sorted list;
//   2. one block per row: per-beam log-sum-exp from the partials, then the
//      exact top k of the few list entries that can still make it.
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

// CUDA limits (the Python wrapper runs the reference beyond them).
constexpr int64_t kBeamTopkChunk = 1024;     // tokens per pass-1 list
constexpr int64_t kBeamTopkMaxK = 64;
constexpr int64_t kBeamTopkMaxBeam = 1024;
constexpr int64_t kBeamTopkMaxLists = 4096;  // beam * ceil(vocab / kBeamTopkChunk)

// CUDA workspace (extra FFI outputs), with chunks = ceil(vocab / kBeamTopkChunk).
struct BeamTopkWorkspace {
  uint64_t* lists;  // [batch, beam, chunks, k] pass-1 token keys
  float* partials;  // [batch, beam, chunks, 2] (max, sum exp(x - max)) per chunk
  int64_t chunks;
};

template <typename T>
void BeamTopkCpu(const BeamTopkArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t BeamTopkCuda(const BeamTopkArgs<T>& a, const BeamTopkWorkspace& w, cudaStream_t stream);
#endif

}  // namespace lsjax
