// CUDA fused Adam update (csrc/adam_update.h): one elementwise pass.
//
// Each thread handles kVec consecutive elements per iteration of a grid-stride
// loop (16-byte float32 moment accesses, 8-byte 16-bit param/grad accesses)
// when every pointer is aligned; the n % kVec tail and unaligned inputs take
// the scalar path. The scalars are read once per thread into registers.
#include <algorithm>

#include "csrc/adam_update.cuh"

namespace lsjax {
namespace {

using adam::kVec;
using adam::UpdateAt;
using adam::VectorAligned;
using cuda::CeilDiv;

constexpr int kBlock = 256;
constexpr int kBlocksPerSM = 8;

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
LSJAX_ADAM_DTYPE_PAIRS(LSJAX_INSTANTIATE, float, __half, __nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
