// CUDA fused Adam update (csrc/adam_update.h): one elementwise pass.
//
// Each thread handles kVec consecutive elements per iteration of a grid-stride
// loop (16-byte float32 moment accesses, 8-byte 16-bit param/grad accesses)
// when every pointer is aligned; the n % kVec tail and unaligned inputs take
// the scalar path. The scalars are read once per thread into registers.
#include <algorithm>

#include "csrc/adam_update.h"
#include "csrc/cuda_common.cuh"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::LoadFloats;
using cuda::StoreFloats;

constexpr int kBlock = 256;
constexpr int kVec = 4;
constexpr int kBlocksPerSM = 8;

template <typename P, typename G, int VEC>
__device__ __forceinline__ void UpdateAt(const AdamUpdateArgs<P, G>& a,
                                         const float (&s)[kNumAdamScalars], int64_t i) {
  float p[VEC], g[VEC], m[VEC], v[VEC];
  LoadFloats<P, VEC>(a.param + i, p);
  LoadFloats<G, VEC>(a.grad + i, g);
  LoadFloats<float, VEC>(a.m + i, m);
  LoadFloats<float, VEC>(a.v + i, v);
#pragma unroll
  for (int k = 0; k < VEC; ++k) p[k] = AdamStep(s, p[k], g[k], m[k], v[k]);
  StoreFloats<P, VEC>(a.new_param + i, p);
  StoreFloats<float, VEC>(a.new_m + i, m);
  StoreFloats<float, VEC>(a.new_v + i, v);
}

template <typename P, typename G, int VEC>
__global__ void __launch_bounds__(kBlock) AdamUpdateKernel(AdamUpdateArgs<P, G> a) {
  float s[kNumAdamScalars];
#pragma unroll
  for (int k = 0; k < kNumAdamScalars; ++k) s[k] = a.scalars[k];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = a.n / VEC;
  for (int64_t j = tid; j < n_vec; j += stride) UpdateAt<P, G, VEC>(a, s, j * VEC);
  const int64_t tail = n_vec * VEC + tid;
  if (VEC > 1 && tail < a.n) UpdateAt<P, G, 1>(a, s, tail);
}

template <typename P, typename G>
bool VectorAligned(const AdamUpdateArgs<P, G>& a) {
  return cuda::Aligned(a.param, sizeof(P) * kVec) && cuda::Aligned(a.new_param, sizeof(P) * kVec) &&
         cuda::Aligned(a.grad, sizeof(G) * kVec) && cuda::Aligned(a.m, 16) &&
         cuda::Aligned(a.v, 16) && cuda::Aligned(a.new_m, 16) && cuda::Aligned(a.new_v, 16);
}

}  // namespace

template <typename P, typename G>
cudaError_t AdamUpdateCuda(const AdamUpdateArgs<P, G>& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const bool vec = VectorAligned(a);
  const int64_t work = vec ? CeilDiv(a.n, kVec) : a.n;
  const int64_t max_blocks = static_cast<int64_t>(cuda::NumSMs()) * kBlocksPerSM;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(CeilDiv(work, kBlock), max_blocks)));
  if (vec) {
    AdamUpdateKernel<P, G, kVec><<<blocks, kBlock, 0, stream>>>(a);
  } else {
    AdamUpdateKernel<P, G, 1><<<blocks, kBlock, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

#define LSJAX_INSTANTIATE(P, G) \
  template cudaError_t AdamUpdateCuda<P, G>(const AdamUpdateArgs<P, G>&, cudaStream_t);
#define LSJAX_INSTANTIATE_GRADS(P) \
  LSJAX_INSTANTIATE(P, float)      \
  LSJAX_INSTANTIATE(P, __half)     \
  LSJAX_INSTANTIATE(P, __nv_bfloat16)
LSJAX_INSTANTIATE_GRADS(float)
LSJAX_INSTANTIATE_GRADS(__half)
LSJAX_INSTANTIATE_GRADS(__nv_bfloat16)
#undef LSJAX_INSTANTIATE_GRADS
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
