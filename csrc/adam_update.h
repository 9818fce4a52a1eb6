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

// a * b and a + b each rounded on its own: nvcc would otherwise contract a * b + c
// into an FMA where it chooses (differently from one kernel to the next), so the
// kernels would differ from each other and from the CPU twin in the last bit.
LSJAX_HOST_DEVICE float MulRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LSJAX_HOST_DEVICE float AddRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// One element's step in float32; the operation order of the jnp reference.
LSJAX_HOST_DEVICE float AdamStep(const float (&s)[kNumAdamScalars], float p, float g, float& m,
                                 float& v) {
  g = MulRn(g, s[kAdamGradScale]);
  m = AddRn(MulRn(1.f - s[kAdamB1], g), MulRn(s[kAdamB1], m));
  v = AddRn(MulRn(1.f - s[kAdamB2], MulRn(g, g)), MulRn(s[kAdamB2], v));
  const float direction = AddRn((m / s[kAdamBiasCorrection1]) /
                                    (sqrtf(v / s[kAdamBiasCorrection2]) + s[kAdamEps]),
                                MulRn(s[kAdamWeightDecay], p));
  return AddRn(p, MulRn(-s[kAdamLr], direction));
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

// X(P, G) for every (param, grad) dtype pair the Adam kernels are built for, given the three float types.
#define LSJAX_ADAM_DTYPE_PAIRS(X, F32, F16, BF16) \
  X(F32, F32) X(F32, F16) X(F32, BF16) X(F16, F32) X(F16, F16) X(F16, BF16) X(BF16, F32) X(BF16, F16) X(BF16, BF16)
