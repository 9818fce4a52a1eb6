// Fused Adam/AdamW update of one tensor: reads param, grad, m, v; writes the
// new param (rounded once to its dtype) and the float32 moments. Elementwise;
// new_m/new_v may alias m/v (in place). Framework-free: pointers, sizes, stream.
//
//   g = grad * grad_scale
//   m = (1 - b1) g + b1 m;   v = (1 - b2) g^2 + b2 v
//   new_param = param - lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * param)
//
// The scalars are one float32[kNumAdamScalars] array (device memory on CUDA),
// so a compiled step is reused as the learning rate and the bias corrections
// (bc = 1 - b^t) change.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifdef __CUDACC__
#define LSJAX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LSJAX_HOST_DEVICE inline
#endif

namespace lsjax {

// Entries of the scalars operand (lsjax/ops/adam_update.py: ADAM_SCALARS).
enum AdamScalar : int {
  kAdamLr,
  kAdamB1,
  kAdamB2,
  kAdamEps,
  kAdamWeightDecay,
  kAdamBiasCorrection1,
  kAdamBiasCorrection2,
  kAdamGradScale,
  kNumAdamScalars,
};

// One element's step in float32; the operation order of the jnp reference.
LSJAX_HOST_DEVICE float AdamStep(const float (&s)[kNumAdamScalars], float p, float g, float& m,
                                 float& v) {
  g = g * s[kAdamGradScale];
  m = (1.f - s[kAdamB1]) * g + s[kAdamB1] * m;
  v = (1.f - s[kAdamB2]) * (g * g) + s[kAdamB2] * v;
  const float direction = (m / s[kAdamBiasCorrection1]) /
                              (sqrtf(v / s[kAdamBiasCorrection2]) + s[kAdamEps]) +
                          s[kAdamWeightDecay] * p;
  return p + -s[kAdamLr] * direction;
}

template <typename P, typename G>
struct AdamUpdateArgs {
  const P* param;
  const G* grad;
  const float* m;
  const float* v;
  const float* scalars;  // float32[kNumAdamScalars]
  P* new_param;
  float* new_m;  // may equal m
  float* new_v;  // may equal v
  int64_t n;
};

template <typename P, typename G>
void AdamUpdateCpu(const AdamUpdateArgs<P, G>& a);

#ifdef LSJAX_WITH_CUDA
template <typename P, typename G>
cudaError_t AdamUpdateCuda(const AdamUpdateArgs<P, G>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
