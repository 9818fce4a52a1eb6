// Attention softmax over the key axis of [batch, heads, q_len, k_len] scores,
// with an optional key-padding mask, an optional causal mask and dropout.
// Math in float32. Framework-free: pointers, sizes, stream.
//
// Rows are the (b, h, q) triples of the local block (row r = (b * H + h) * Q + q).
// A key column k of row (b, h, q) is *valid* iff
//   (mask == nullptr || mask[b * K + k] != 0)                       key padding: 1 = keep
//   && (!causal || k <= gq + K - q_total)                           bottom-right causal
// where gq = origin[2] + q is the query's global index.
//
// Forward:  z = scale * log2(e) * x  (log2 units: exp(scale * x) = exp2(z))
//           m = max over valid z;  s = sum over valid exp2(z - m)
//           p = valid ? exp2(z - m) / s : 0   (a fully masked row gives all zeros)
//           y = dropout(p) = keep ? p / (1 - rate) : 0
//           row_max = m, row_inv = 1 / s (0 and 0 for a fully masked row)
// Backward: p is recomputed from (x, row_max, row_inv) exactly as in the forward,
//           the dropout mask is regenerated from the rng operand, and
//           g = keep ? dy / (1 - rate) : 0;  dx = scale * p * (g - sum(g * p)).
//           (Saving y would not do: y loses p where the mask dropped it, and
//           dx = -scale * p * sum(g * p) is not zero there.)
//
// Dropout element index (csrc/philox.h): the flat row-major index into the
// *global* [B, heads_total, q_total, K] output, so that a block of a sharded
// tensor (origin = its first (b, h, q)) draws exactly the bits of the
// unsharded op:  e = (((origin[0] + b) * heads_total + origin[1] + h) * q_total
//                     + origin[2] + q) * K + k.
#pragma once

#include <cstddef>
#include <cstdint>

#include "csrc/philox.h"  // LSJAX_HD

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

// Shape, masking and dropout parameters shared by forward and backward.
struct AttnSoftmaxGeometry {
  const uint8_t* mask;    // nullable: [batch, k_len] bool (nonzero = keep)
  const uint32_t* rng;    // nullable when rate == 0: uint32[4] Philox operand
  const int32_t* origin;  // nullable (= zeros): int32[3] global (b, h, q) of this block
  int64_t batch, heads, q_len, k_len;  // local block
  int64_t heads_total, q_total;        // global sizes (dropout index, causal offset)
  float scale;
  float rate;  // dropout rate in [0, 1); 0 disables dropout
  bool causal;

  LSJAX_HD int64_t rows() const { return batch * heads * q_len; }
};

// Where local row r sits: its batch index (the mask row), its flat index in
// the global [B, heads_total, q_total] rows (dropout), and how many leading
// columns the causal mask leaves (cols >= limit are masked; K if not causal).
struct AttnRow {
  int64_t b;
  uint64_t global_row;
  int64_t limit;
};

LSJAX_HD AttnRow LocateRow(const AttnSoftmaxGeometry& g, int64_t r, int32_t b0, int32_t h0,
                           int32_t q0) {
  const int64_t q = r % g.q_len;
  const int64_t bh = r / g.q_len;
  const int64_t h = bh % g.heads;
  const int64_t b = bh / g.heads;
  const int64_t gq = q0 + q;
  AttnRow row;
  row.b = b;
  row.global_row =
      static_cast<uint64_t>(((b0 + b) * g.heads_total + h0 + h) * g.q_total + gq);
  int64_t limit = g.k_len;
  if (g.causal) {
    limit = gq + g.k_len - g.q_total + 1;
    limit = limit < 0 ? 0 : (limit > g.k_len ? g.k_len : limit);
  }
  row.limit = limit;
  return row;
}

template <typename T>
struct AttnSoftmaxFwdArgs {
  AttnSoftmaxGeometry g;
  const T* x;
  T* y;
  float* row_max;  // [rows]
  float* row_inv;  // [rows]
};

template <typename T>
struct AttnSoftmaxBwdArgs {
  AttnSoftmaxGeometry g;
  const T* dy;
  const T* x;
  const float* row_max;
  const float* row_inv;
  T* dx;
};

template <typename T>
void AttnSoftmaxFwdCpu(const AttnSoftmaxFwdArgs<T>& a);
template <typename T>
void AttnSoftmaxBwdCpu(const AttnSoftmaxBwdArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t AttnSoftmaxFwdCuda(const AttnSoftmaxFwdArgs<T>& a, cudaStream_t stream);
template <typename T>
cudaError_t AttnSoftmaxBwdCuda(const AttnSoftmaxBwdArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
