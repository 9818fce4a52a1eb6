// Softmax cross-entropy with label smoothing and an ignored label, over the
// last axis of a [rows, vocab] logits tensor. Math in float32; the logits stay
// in their storage dtype and no [rows, vocab] float32 tensor is ever formed.
// Framework-free: pointers, sizes, stream.
//
// Target distribution (fairseq / LightSeq): q = (1 - eps) * onehot(label) + eps / V.
// With lse = log(sum_c exp(x_c)):
// Forward:  loss = (1 - eps) * (lse - x[label]) + eps * (lse - sum_c x_c / V)
//           (= -sum_c q_c * log softmax(x)_c);  the per-row lse is saved.
// Backward: dx_c = dloss * (exp(x_c - lse) - q_c)
//
// Special rows:
//   label == ignore_id               -> loss 0, lse 0, dx 0 (the logits are not read);
//   label outside [0, V) otherwise   -> loss NaN, lse NaN, dx NaN (surfaces the bad label
//                                       inside jit, where Python cannot check it).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct CrossEntropyFwdArgs {
  const T* logits;        // [rows, vocab]
  const int32_t* labels;  // [rows]
  float* loss;            // [rows]
  float* lse;             // [rows] log-sum-exp of the row (saved for the backward)
  int64_t rows;
  int64_t vocab;
  float eps;  // label smoothing
  int32_t ignore_id;
};

template <typename T>
struct CrossEntropyBwdArgs {
  const T* logits;        // [rows, vocab]
  const int32_t* labels;  // [rows]
  const float* lse;       // [rows]
  const float* dloss;     // [rows]
  T* dlogits;             // [rows, vocab]
  int64_t rows;
  int64_t vocab;
  float eps;
  int32_t ignore_id;
};

template <typename T>
void CrossEntropyFwdCpu(const CrossEntropyFwdArgs<T>& a);
template <typename T>
void CrossEntropyBwdCpu(const CrossEntropyBwdArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t CrossEntropyFwdCuda(const CrossEntropyFwdArgs<T>& a, cudaStream_t stream);
template <typename T>
cudaError_t CrossEntropyBwdCuda(const CrossEntropyBwdArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
