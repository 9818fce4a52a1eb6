// Device side shared by the Adam kernels (adam_update.cu, adam_update_multi.cu):
// one tensor's update of VEC consecutive elements, and whether a tensor's
// pointers allow the kVec-wide accesses.
#pragma once

#include "csrc/adam_update.h"
#include "csrc/cuda_common.cuh"

namespace lsjax::adam {

// Elements per vector access: 16 bytes of float32 moments, 8 of 16-bit params/grads.
constexpr int kVec = 4;

template <typename P, typename G, int VEC>
__device__ __forceinline__ void UpdateAt(const AdamUpdateArgs<P, G>& a,
                                         const float (&s)[kNumAdamScalars], int64_t i) {
  float p[VEC], g[VEC], m[VEC], v[VEC];
  cuda::LoadFloats<P, VEC>(a.param + i, p);
  cuda::LoadFloats<G, VEC>(a.grad + i, g);
  cuda::LoadFloats<float, VEC>(a.m + i, m);
  cuda::LoadFloats<float, VEC>(a.v + i, v);
#pragma unroll
  for (int k = 0; k < VEC; ++k) p[k] = AdamStep(s, p[k], g[k], m[k], v[k]);
  cuda::StoreFloats<P, VEC>(a.new_param + i, p);
  cuda::StoreFloats<float, VEC>(a.new_m + i, m);
  cuda::StoreFloats<float, VEC>(a.new_v + i, v);
}

template <typename P, typename G>
bool VectorAligned(const AdamUpdateArgs<P, G>& a) {
  return cuda::Aligned(a.param, sizeof(P) * kVec) && cuda::Aligned(a.new_param, sizeof(P) * kVec) &&
         cuda::Aligned(a.grad, sizeof(G) * kVec) && cuda::Aligned(a.m, 16) &&
         cuda::Aligned(a.v, 16) && cuda::Aligned(a.new_m, 16) && cuda::Aligned(a.new_v, 16);
}

}  // namespace lsjax::adam
