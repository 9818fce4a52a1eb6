// 2^v and 1 / v as single hardware instructions on the GPU (ex2.approx, ~2 ulp;
// rcp.approx, ~1 ulp; subnormal results flushed to 0: exp2f's denormal
// handling costs three more instructions per call), libm on the CPU; and, on
// the GPU only, sin and cos by an explicit range reduction and the hardware's
// sin.approx/cos.approx.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LSJAX_FAST_HD __host__ __device__ __forceinline__
#else
#define LSJAX_FAST_HD inline
#endif

namespace lsjax {

LSJAX_FAST_HD float Exp2(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return std::exp2(v);
#endif
}

LSJAX_FAST_HD float Rcp(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return 1.f / v;
#endif
}

#if defined(__CUDACC__)
// sin(x) and cos(x) for float32 |x| < 2^22, within ~1e-6 absolute of the
// correctly rounded values (GPU only; the CPU twins call libm): x is reduced
// to r = x / (2 pi) - k revolutions, |r| <= 1/2, with 1 / (2 pi) split over
// two floats and the product's rounding error recovered by an fma, then
// sin.approx/cos.approx of 2 pi r (absolute error ~2^-21 on [-pi, pi]): ~10
// instructions for both, against ~40 for sincosf's fast path (and its slow
// path's code).
__device__ __forceinline__ void SinCos(float x, float* s, float* c) {
  constexpr float kInv2PiHi = 0.15915494f;     // float(1 / (2 pi))
  constexpr float kInv2PiLo = 6.4206382e-09f;  // 1 / (2 pi) - kInv2PiHi
  const float t = x * kInv2PiHi;
  const float e = fmaf(x, kInv2PiLo, fmaf(x, kInv2PiHi, -t));  // x / (2 pi) - t
  const float r = 6.28318531f * ((t - rintf(t)) + e);          // t - rint(t) is exact
  asm("sin.approx.ftz.f32 %0, %1;" : "=f"(*s) : "f"(r));
  asm("cos.approx.ftz.f32 %0, %1;" : "=f"(*c) : "f"(r));
}
#endif

}  // namespace lsjax
