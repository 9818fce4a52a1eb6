// Single-query attention over a key/value cache (one decode step):
//   out[b, h, :] = sum_j p[b, h, j] * v[b, j, h, :],
//   p[b, h, :]   = softmax_j(scale * <q[b, h, :], k[r, j, h, :]>) over the attended keys j,
// where key j of row b lives in row r = b + key_src[b, j] (clamped to [0, batch)): a beam
// search reorders a small table of row offsets instead of its caches (FasterTransformer's
// cache indirection); key_src[b, j] == kDecodeAttentionMasked leaves key j out. Scores,
// softmax and the weighted sum in float32; a row with no attended key gives zeros. Keys
// left out are not read. Framework-free: pointers, sizes, stream.
//
// Appending (a self-attention decode step, k_new != nullptr): each (b, h) first writes its row of
// k_new / v_new into the caches at key position t = *append_at (clamped to [0, k_len)), then
// attends with key t read from row b itself (whatever key_src[b, t] offsets, unless masked; the
// CUDA kernels read it from k_new / v_new). The caches are k / v themselves (k_cache == k,
// v_cache == v): XLA aliases them to the results. With `causal`, the keys after t (the cache not
// yet written) are left out as if masked, so a decode step needs no per-step mask.
//
// CUDA: one block per (b, h): for head sizes of 4..32 16-byte vectors one pass with an online
// softmax; otherwise the keys' scores live in shared memory (k_len <= kDecodeAttentionMaxKeys),
// then one pass over V.
#pragma once

#include <cstdint>

#include "csrc/philox.h"  // LSJAX_HD

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct DecodeAttentionArgs {
  const T* q;             // [batch, heads, head_dim], rows q_stride elements apart
  const T* k;             // [batch, k_len, heads, head_dim]
  const T* v;             // [batch, k_len, heads, head_dim]
  const int32_t* key_src;  // [batch, k_len]: row offset of each key, or kDecodeAttentionMasked
  T* out;                 // [batch, heads, head_dim]
  int64_t batch;
  int64_t k_len;
  int64_t heads;
  int64_t head_dim;
  float scale;
  int64_t q_stride;  // heads * head_dim, or 3x that when q is the first third of a packed [batch, 3, heads, head_dim]
  // Appending (all null otherwise): k_new / v_new [batch, heads, head_dim] with q's row stride;
  // k_cache / v_cache = k / v, written; append_at: int32 key position (device memory on CUDA).
  const T* k_new = nullptr;
  const T* v_new = nullptr;
  T* k_cache = nullptr;
  T* v_cache = nullptr;
  const int32_t* append_at = nullptr;
  bool causal = false;  // appending only: attend keys 0..t
};

constexpr int32_t kDecodeAttentionMasked = INT32_MIN;

// The key position an append writes: *append_at clamped to [0, k_len) (as dynamic_update_slice
// clamps), or -1 when not appending.
LSJAX_HD int64_t DecodeAttentionAppendPosition(const int32_t* append_at, int64_t k_len) {
  if (append_at == nullptr) return -1;
  const int64_t t = *append_at;
  return t < 0 ? 0 : (t >= k_len ? k_len - 1 : t);
}

// Keys a row can attend: all k_len, or 0..t with `causal` (t = the append position).
template <typename Args>
LSJAX_HD int64_t DecodeAttentionKeys(const Args& a, int64_t appended) {
  return a.causal && appended >= 0 ? appended + 1 : a.k_len;
}

// The row holding key j of row b, whose key_src entry is `offset` (not kDecodeAttentionMasked):
// b itself for the appended key j == appended, else b + offset clamped to [0, batch).
LSJAX_HD int64_t DecodeAttentionKeyRow(int64_t b, int64_t j, int32_t offset, int64_t batch, int64_t appended) {
  const int64_t r = j == appended ? b : b + offset;
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
