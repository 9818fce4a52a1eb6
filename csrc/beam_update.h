// One beam-search step's bookkeeping for each batch row, after the top 2k candidates are known
// (lsjax.ops.beam_update; k = beams per row, T = max_len):
//   parent c = idx[c] / vocab (clamped to [0, k)), token c = idx[c] % vocab, eos c = token == eos_id && score[c] > -inf;
//   alive: the first k candidates in order of (score if not eos else -inf) descending, ties by
//     candidate index (lax.top_k's order); each continues its parent's alive sequence with its
//     token written at position `step` (if step < T);
//   finished: the best k of the k finished entries then the 2k candidates, scored
//     finished_scores / (eos ? score * inv_penalty : -inf), same order; a candidate brings its
//     continued sequence and its eos flag; inv_penalty = entry min(step, penalties - 1) of a table
//     (a scalar is a table of one), so a search can precompute it for every step.
// Sequences are updated in place (alive_seqs / finished_seqs are also outputs). Framework-free.
#pragma once

#include <cstdint>

#include "csrc/philox.h"  // LSJAX_HD

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

struct BeamUpdateArgs {
  const float* cand_scores;  // [batch, 2k] sum of log-probs, sorted descending
  const int32_t* cand_idx;   // [batch, 2k] parent * vocab + token
  int32_t* alive_seqs;       // [batch, k, T], in place
  int32_t* finished_seqs;    // [batch, k, T], in place
  float* finished_scores;    // [batch, k], in place
  bool* finished_flags;      // [batch, k], in place
  const int32_t* step;       // scalar: the position this step writes (device memory on CUDA)
  const float* inv_penalty;  // [penalties]: 1 / the length penalty of s + 1 tokens at s (device memory on CUDA)
  int32_t* alive_tokens;     // [batch, k]
  int32_t* alive_parents;    // [batch, k] in [0, k)
  float* alive_scores;       // [batch, k]
  int64_t batch;
  int64_t k;
  int64_t max_len;
  int64_t vocab;
  int64_t eos_id;
  int64_t penalties = 1;
};

// This step's 1 / length penalty: inv_penalty[step], clamped to the table.
LSJAX_HD float BeamUpdateInvPenalty(const BeamUpdateArgs& a, int64_t step) {
  return a.inv_penalty[step < 0 ? 0 : (step >= a.penalties ? a.penalties - 1 : step)];
}

// CUDA: one block per batch row; sequences move through shared memory in column tiles.
constexpr int64_t kBeamUpdateMaxBeam = 32;

// Position of key i among n keys in lax.top_k's order (descending, ties by index).
LSJAX_HD int64_t BeamUpdateRank(const float* keys, int64_t n, int64_t i) {
  int64_t rank = 0;
  for (int64_t j = 0; j < n; ++j) rank += keys[j] > keys[i] || (keys[j] == keys[i] && j < i);
  return rank;
}

void BeamUpdateCpu(const BeamUpdateArgs& a);

#ifdef LSJAX_WITH_CUDA
cudaError_t BeamUpdateCuda(const BeamUpdateArgs& a, cudaStream_t stream);
#endif

}  // namespace lsjax
