// Single-query attention over a key/value cache (one decode step):
//   out[b, h, :] = sum_j p[b, h, j] * v[b, j, h, :],
//   p[b, h, :]   = softmax_j(scale * <q[b, h, :], k[b, j, h, :]>) over the keys j with mask[b, j],
// scores, softmax and the weighted sum in float32; a row with no attended key
// gives zeros. Masked keys are not read. Framework-free: pointers, sizes, stream.
//
// CUDA: one block of 128 threads per (b, h); the keys' scores live
// in shared memory (k_len <= kDecodeAttentionMaxKeys), then one pass over V.
#pragma once

#include <cstdint>

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct DecodeAttentionArgs {
  const T* q;             // [batch, heads, head_dim]
  const T* k;             // [batch, k_len, heads, head_dim]
  const T* v;             // [batch, k_len, heads, head_dim]
  const uint8_t* mask;    // [batch, k_len] (bool): the keys attended
  T* out;                 // [batch, heads, head_dim]
  int64_t batch;
  int64_t k_len;
  int64_t heads;
  int64_t head_dim;
  float scale;
};

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
