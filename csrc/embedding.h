// Token embedding: lookup x scale + positions (sinusoidal or learned) +
// dropout, and its deterministic backward (a sorted segment sum into the
// table rows). Framework-free: pointers, sizes, stream.
//
// Forward, per token n of ids [rows of `seq` tokens] (ids == padding_id gives
// an all-zero row):
//   y[n, :] = dropout(table[clamp(ids[n])] * scale + pe(p(n)))
//   p(n) = offset + (number of non-pad tokens before n in its row of `seq`)
//   (fairseq's make_positions shifted to start at offset; pads do not count)
//   pe(p)[j] = sin(p * f_j) (j < half), cos(p * f_{j-half}) (half <= j < 2 half),
//              0 (j = hidden - 1 when hidden is odd);  half = hidden / 2,
//              f_i = exp(i * -(log(10000) / max(half - 1, 1)))   (fairseq layout)
//   or pe(p) = pos_table[clamp(p)] for a learned table.
//   Dropout element e = n * hidden + j plus the rng offset (the flat index into
//   the unsharded output when the offset is advanced to a shard's first
//   element; see csrc/philox.h).
// Sort (for the backward, done by the forward on request): the stable
// ascending argsort of the tokens by key(n) = vocab for a pad, else
// clamp(ids[n]): sorted_keys[i] = key(order[i]).
// Backward (segment sum), for a key per token sorted ascending with `order`
// the token permutation (excluded tokens carry a key outside [0, rows), below
// or above the valid ones, so the keys stay sorted):
//   grad[r, :] = factor * sum_{i : keys[i] == r, ascending i} keep(dy[order[i], :])
//   where keep() applies the forward's dropout mask (token order[i]'s
//   elements) and 1 / (1 - rate).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct EmbeddingFwdArgs {
  const int32_t* ids;     // [tokens]: rows of `seq` tokens
  const int32_t* offset;  // int32[1]: the position of each row's first non-pad token
  const uint32_t* rng;    // uint32[4]; read only when rate > 0
  const T* table;         // [vocab, hidden]
  const T* pos_table;     // [max_positions, hidden]; nullptr: sinusoidal positions
  T* y;                   // [tokens, hidden]
  int32_t* positions;     // [tokens] workspace: each token's position p(n), written first
  int64_t tokens;
  int64_t seq;  // tokens per row (positions restart at each row)
  int64_t hidden;
  int64_t vocab;
  int64_t max_positions;
  int32_t padding_id;
  float scale;
  float rate;
};

struct EmbeddingSortArgs {
  const int32_t* ids;    // [tokens]
  int32_t* sorted_keys;  // [tokens]
  int32_t* order;        // [tokens]
  int64_t tokens;
  int64_t vocab;
  int32_t padding_id;
};

// Most sorted tokens per block of the CUDA backward (EmbeddingBwdArgs::chunk).
constexpr int64_t kEmbeddingBwdMaxChunk = 64;

template <typename T>
struct EmbeddingBwdArgs {
  const T* dy;           // [tokens, hidden]
  const int32_t* keys;   // [tokens] sorted ascending (those outside [0, rows) skipped)
  const int32_t* order;  // [tokens] token of each sorted key
  const uint32_t* rng;   // uint32[4]; read only when rate > 0
  T* grad;               // [rows, hidden], every element written
  float* partials;       // CUDA only: workspace float32 [2 * ceil(tokens / chunk), hidden]
  uint32_t* counters;    // CUDA only: workspace uint32 [ceil(tokens / chunk) + 1]: chunks done per cut
                         // segment, then the queue of slices
  uint32_t* row_bits;    // CUDA only: workspace uint32 [ceil(rows / 32)], a bit per grad row with tokens
  int64_t chunk;         // CUDA only: sorted tokens per partial sum, in [1, kEmbeddingBwdMaxChunk]
  int64_t slice;         // CUDA only: sorted tokens per block's turn, dividing chunk
  int64_t tokens;
  int64_t hidden;
  int64_t rows;
  float factor;  // scale for the table, 1 for a learned position table
  float rate;
};

template <typename T>
void EmbeddingFwdCpu(const EmbeddingFwdArgs<T>& a);
template <typename T>
void EmbeddingBwdCpu(const EmbeddingBwdArgs<T>& a);
void EmbeddingSortCpu(const EmbeddingSortArgs& s);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t EmbeddingFwdCuda(const EmbeddingFwdArgs<T>& a, cudaStream_t stream);
// Device workspace bytes EmbeddingFwdSortCuda needs for `tokens` tokens (any alignment).
size_t EmbeddingSortWorkspaceBytes(int64_t tokens, int64_t vocab);
// The forward on `stream` and, concurrently on a second stream (the sort is
// latency-bound, the forward bandwidth-bound), the sort: both are done when
// `stream`'s next work runs. workspace: EmbeddingSortWorkspaceBytes.
template <typename T>
cudaError_t EmbeddingFwdSortCuda(const EmbeddingFwdArgs<T>& a, const EmbeddingSortArgs& s, void* workspace,
                                 cudaStream_t stream);
// a.partials, a.counters and a.row_bits (extra XLA outputs) are workspace:
// the partial sums of segments cut by chunks, how many of a cut segment's
// chunks are done (and the next slice), and which grad rows have tokens. The rows without tokens
// are zeroed on a second stream, concurrently.
template <typename T>
cudaError_t EmbeddingBwdCuda(const EmbeddingBwdArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
