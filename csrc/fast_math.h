// 2^v and 1 / v as single hardware instructions on the GPU (ex2.approx, ~2 ulp;
// rcp.approx, ~1 ulp; subnormal results flushed to 0: exp2f's denormal
// handling costs three more instructions per call), libm on the CPU.
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

}  // namespace lsjax
