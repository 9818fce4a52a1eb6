// CPU twin of the beam-search step bookkeeping (csrc/beam_update.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "csrc/beam_update.h"

namespace lsjax {

void BeamUpdateCpu(const BeamUpdateArgs& a) {
  const int64_t k = a.k, n = 2 * k, T = a.max_len, step = *a.step;
  const float inv_penalty = BeamUpdateInvPenalty(a, step);
  std::vector<float> alive_keys(n), finished_keys(3 * k);
  std::vector<int32_t> parent(n), token(n), keep(k), best(k), old_alive(k * T), old_finished(k * T);
  std::vector<bool> eos(n), old_flags(k);
  for (int64_t b = 0; b < a.batch; ++b) {
    const float* score = a.cand_scores + b * n;
    for (int64_t c = 0; c < n; ++c) {
      const int32_t idx = a.cand_idx[b * n + c];
      parent[c] = static_cast<int32_t>(std::clamp<int64_t>(idx / a.vocab, 0, k - 1));
      token[c] = static_cast<int32_t>(idx % a.vocab);
      eos[c] = token[c] == a.eos_id && score[c] > -INFINITY;
      alive_keys[c] = eos[c] ? -INFINITY : score[c];
      finished_keys[k + c] = eos[c] ? score[c] * inv_penalty : -INFINITY;
    }
    for (int64_t j = 0; j < k; ++j) finished_keys[j] = a.finished_scores[b * k + j];
    for (int64_t c = 0; c < n; ++c) {
      if (const int64_t r = BeamUpdateRank(alive_keys.data(), n, c); r < k) keep[r] = static_cast<int32_t>(c);
    }
    for (int64_t e = 0; e < 3 * k; ++e) {
      if (const int64_t r = BeamUpdateRank(finished_keys.data(), 3 * k, e); r < k) best[r] = static_cast<int32_t>(e);
    }
    int32_t* alive = a.alive_seqs + b * k * T;
    int32_t* finished = a.finished_seqs + b * k * T;
    old_alive.assign(alive, alive + k * T);
    old_finished.assign(finished, finished + k * T);
    for (int64_t j = 0; j < k; ++j) old_flags[j] = a.finished_flags[b * k + j];
    // Candidate c's sequence at position p: its parent's alive sequence, its token at `step`.
    auto cand_at = [&](int64_t c, int64_t p) { return p == step ? token[c] : old_alive[parent[c] * T + p]; };
    for (int64_t j = 0; j < k; ++j) {
      const int64_t c = keep[j], f = best[j];
      a.alive_tokens[b * k + j] = token[c];
      a.alive_parents[b * k + j] = parent[c];
      a.alive_scores[b * k + j] = score[c];
      a.finished_scores[b * k + j] = finished_keys[f];
      a.finished_flags[b * k + j] = f < k ? old_flags[f] : eos[f - k];
      for (int64_t p = 0; p < T; ++p) {
        alive[j * T + p] = cand_at(c, p);
        finished[j * T + p] = f < k ? old_finished[f * T + p] : cand_at(f - k, p);
      }
    }
  }
}

}  // namespace lsjax
