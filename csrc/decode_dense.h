// Decode-step dense layer over a few rows (one beam-search step's batch * beam):
//   a = ln ? layer_norm(x) rounded to T : x        (float32 two-pass statistics: mean, centred variance)
//   y = act(a @ kernel + bias) (+ residual)         (float32 accumulation, rounded once to T)
// x [rows, K], kernel [K, N] row-major, residual / y [rows, N], all T; bias [N], ln_scale / ln_bias [K]
// float32. Framework-free: pointers, sizes, stream.
//
// CUDA (float16 / bfloat16, rows <= kDecodeDenseMaxRows): one launch. Each block owns 8 or 16 output
// columns and all rows: it stages the (normalised) rows in shared memory a K-chunk at a time, its
// warps split the chunk's K and multiply on the tensor cores, and the warps' partial tiles are summed
// in a fixed order before the epilogue. Deterministic; no atomics.
#pragma once

#include <cstdint>

#include "csrc/bias_dropout.h"  // Activation

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct DecodeDenseArgs {
  const T* x;             // [rows, k]
  const T* kernel;        // [k, n]
  const float* bias;      // [n]
  const float* ln_scale;  // [k], or null: no layer norm
  const float* ln_bias;   // [k], null iff ln_scale is
  const T* residual;      // [rows, n], or null
  T* y;                   // [rows, n]
  int64_t rows;
  int64_t k;
  int64_t n;
  float eps;
  Activation act;
};

constexpr int64_t kDecodeDenseMaxRows = 64;  // CUDA limit (lsjax/ops/decode_dense.py: MAX_ROWS)

template <typename T>
void DecodeDenseCpu(const DecodeDenseArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
// T in {__half, __nv_bfloat16}; rows in [1, kDecodeDenseMaxRows]; an unknown act gives cudaErrorInvalidValue.
template <typename T>
cudaError_t DecodeDenseCuda(const DecodeDenseArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
