// Layer norm over the last axis of a [rows, cols] tensor, optionally of
// (x + residual). Statistics and math in float32; scale/bias and their
// gradients are [cols], float32 or T (csrc/param_vec.h, one dtype for all
// four). Framework-free: pointers, sizes, stream.
//
// Forward:  z = x (+ residual, rounded to the input dtype);  mean, rstd = stats(z);  y = (z - mean) * rstd * scale + bias
// Backward: xhat = (z - mean) * rstd;  g = dy * scale
//           dz = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dz_out)
//           dscale = sum_rows(dy * xhat);  dbias = sum_rows(dy)
#pragma once

#include <cstddef>
#include <cstdint>

#include "csrc/param_vec.h"

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

// Rows of the backward's partial-sum workspace: min(rows, this).
constexpr int64_t kLayerNormBwdMaxPartials = 512;

template <typename T>
struct LayerNormFwdArgs {
  const T* x;
  const T* residual;  // nullable: no residual add
  ParamVec<T> scale;
  ParamVec<T> bias;
  T* y;
  T* z;  // x + residual, written only when residual != nullptr
  float* mean;
  float* rstd;
  int64_t rows;
  int64_t cols;
  float eps;
};

template <typename T>
struct LayerNormBwdArgs {
  const T* dy;
  const T* dz_out;  // nullable: cotangent of the z output (residual form)
  const T* z;       // the normalised input (x, or x + residual)
  ParamVec<T> scale;
  const float* mean;
  const float* rstd;
  T* dz;  // gradient w.r.t. z (= dx = dresidual)
  ParamGrad<T> dscale;
  ParamGrad<T> dbias;
  // Workspace for deterministic column sums (used by the CUDA kernels only):
  // float32 [2, min(rows, kLayerNormBwdMaxPartials), cols].
  float* partials;
  int64_t rows;
  int64_t cols;
};

template <typename T>
void LayerNormFwdCpu(const LayerNormFwdArgs<T>& a);
template <typename T>
void LayerNormBwdCpu(const LayerNormBwdArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t LayerNormFwdCuda(const LayerNormFwdArgs<T>& a, cudaStream_t stream);
// The backward's column sums go through per-block partial rows in
// a.partials (XLA allocates it as an extra output), reduced in a fixed order.
template <typename T>
cudaError_t LayerNormBwdCuda(const LayerNormBwdArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
