// Single-query attention over a key/value cache (one decode step):
//   out[b, h, :] = sum_j p[b, h, j] * v[b, j, h, :],
//   p[b, h, :]   = softmax_j(scale * <q[b, h, :], k[r, j, h, :]>) over the attended keys j,
// where key j of row b lives in row r = b + key_src[b, j] (clamped to [0, batch)): a beam
// search reorders a small table of row offsets instead of its caches (FasterTransformer's
// cache indirection); key_src[b, j] == kDecodeAttentionMasked leaves key j out. Scores,
// softmax and the weighted sum in float32; a row with no attended key gives zeros. Keys
// left out are not read. Framework-free: pointers, sizes, stream.
//
// CUDA: one block of 128 threads per (b, h); the keys' scores live
// in shared memory (k_len <= kDecodeAttentionMaxKeys), then one pass over V.
#pragma once

#include <cstdint>

#include "csrc/philox.h"  // LSJAX_HD

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct DecodeAttentionArgs {
  const T* q;             // [batch, heads, head_dim]
  const T* k;             // [batch, k_len, heads, head_dim]
  const T* v;             // [batch, k_len, heads, head_dim]
  const int32_t* key_src;  // [batch, k_len]: row offset of each key, or kDecodeAttentionMasked
  T* out;                 // [batch, heads, head_dim]
  int64_t batch;
  int64_t k_len;
  int64_t heads;
  int64_t head_dim;
  float scale;
};

constexpr int32_t kDecodeAttentionMasked = INT32_MIN;

// The row holding key j of row b (key_src[b * k_len + j] must not be kDecodeAttentionMasked).
LSJAX_HD int64_t DecodeAttentionKeyRow(int64_t b, int32_t offset, int64_t batch) {
  const int64_t r = b + offset;
  return r < 0 ? 0 : (r >= batch ? batch - 1 : r);
}

// CUDA limits (the Python wrapper checks them first).
constexpr int64_t kDecodeAttentionMaxKeys = 8192;  // float scores in 32 KiB of shared memory
constexpr int64_t kDecodeAttentionMaxHeadDim = 512;

template <typename T>
void DecodeAttentionCpu(const DecodeAttentionArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t DecodeAttentionCuda(const DecodeAttentionArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
