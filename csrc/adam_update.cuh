// Device side shared by the Adam kernels (adam_update.cu, adam_update_multi.cu):
// one tensor's update of VEC consecutive elements, and whether a tensor's
// pointers allow the kVec-wide accesses.
#pragma once

#include "csrc/adam_update.h"
#include "csrc/cuda_common.cuh"

namespace lsjax::adam {

// Elements per vector access: 16 bytes of float32 moments, 8 of 16-bit params/grads.
constexpr int kVec = 4;

// Updates N runs of VEC consecutive elements, at i, i + stride, ... (a run at or past
// `end` is skipped; the first is always done). All loads are issued before any math,
// so the N runs' memory latencies overlap (a new_param aliasing param would
// otherwise keep the compiler from hoisting the next run's loads above this one's stores).
template <typename P, typename G, int VEC, int N = 1>
__device__ __forceinline__ void UpdateAt(const AdamUpdateArgs<P, G>& a, const float (&s)[kNumAdamScalars],
                                         int64_t i, int64_t stride = 0, int64_t end = 0) {
  float p[N][VEC], g[N][VEC], m[N][VEC], v[N][VEC];
  bool live[N];
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const int64_t j = i + u * stride;
    live[u] = u == 0 || j < end;
    if (!live[u]) continue;
    cuda::LoadFloats<P, VEC>(a.param + j, p[u]);
    cuda::LoadFloats<G, VEC>(a.grad + j, g[u]);
    cuda::LoadFloats<float, VEC>(a.m + j, m[u]);
    cuda::LoadFloats<float, VEC>(a.v + j, v[u]);
  }
#pragma unroll
  for (int u = 0; u < N; ++u) {
    if (!live[u]) continue;
    const int64_t j = i + u * stride;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[u][k] = AdamStep(s, p[u][k], g[u][k], m[u][k], v[u][k]);
    cuda::StoreFloats<P, VEC>(a.new_param + j, p[u]);
    cuda::StoreFloats<float, VEC>(a.new_m + j, m[u]);
    cuda::StoreFloats<float, VEC>(a.new_v + j, v[u]);
  }
}

template <typename P, typename G>
bool VectorAligned(const AdamUpdateArgs<P, G>& a) {
  return cuda::Aligned(a.param, sizeof(P) * kVec) && cuda::Aligned(a.new_param, sizeof(P) * kVec) &&
         cuda::Aligned(a.grad, sizeof(G) * kVec) && cuda::Aligned(a.m, 16) &&
         cuda::Aligned(a.v, 16) && cuda::Aligned(a.new_m, 16) && cuda::Aligned(a.new_v, 16);
}

}  // namespace lsjax::adam
