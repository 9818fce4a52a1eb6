// CUDA multi-tensor Adam update (csrc/adam_update_multi.h), after apex's
// multi_tensor_apply.
//
// A launch takes up to kMaxTensors tensors in a table passed by value as a
// __grid_constant__ kernel parameter (under the 4 KB parameter limit of every
// architecture), so the update of a whole model is a few launches. Each tensor
// is cut into kChunk-element chunks, one block per chunk; a block finds its
// tensor by binary search of the table's chunk offsets. Within a chunk each
// thread takes kVec consecutive elements per step (16-byte moment accesses)
// when the tensor's pointers allow it, then the scalar tail. No atomics: every
// element is written by one thread.
#include "csrc/adam_update.cuh"
#include "csrc/adam_update_multi.h"

namespace lsjax {
namespace {

using adam::kVec;
using adam::UpdateAt;

constexpr int kBlock = 256;
constexpr int64_t kChunk = 16 * 1024;
constexpr int kMaxTensors = 48;

enum TensorFlag : uint8_t { kDecay = 1, kVectorAligned = 2 };

template <typename P, typename G>
struct TensorTable {
  AdamUpdateArgs<P, G> tensors[kMaxTensors];
  int32_t first_chunk[kMaxTensors + 1];  // tensor t owns chunks [first_chunk[t], first_chunk[t + 1])
  uint8_t flags[kMaxTensors];            // TensorFlag bits
  int32_t count;
};
static_assert(sizeof(TensorTable<float, float>) <= 4000, "the table must fit the 4 KB kernel parameter space");

template <typename P, typename G>
__global__ void __launch_bounds__(kBlock) AdamUpdateMultiKernel(const __grid_constant__ TensorTable<P, G> table) {
  const int chunk = blockIdx.x;
  int t = 0;
  for (int hi = table.count - 1; t < hi;) {  // the last t with first_chunk[t] <= chunk
    const int mid = (t + hi + 1) / 2;
    if (table.first_chunk[mid] <= chunk) {
      t = mid;
    } else {
      hi = mid - 1;
    }
  }
  const AdamUpdateArgs<P, G> a = table.tensors[t];  // in registers: read once
  const uint8_t flags = table.flags[t];
  float s[kNumAdamScalars];
#pragma unroll
  for (int k = 0; k < kNumAdamScalars; ++k) s[k] = a.scalars[k];
  if (!(flags & kDecay)) s[kAdamWeightDecay] = 0.f;
  const int64_t begin = (chunk - table.first_chunk[t]) * kChunk;
  const int64_t end = begin + kChunk < a.n ? begin + kChunk : a.n;
  int64_t tail = begin;
  if (flags & kVectorAligned) {
    tail = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + threadIdx.x * kVec; i < tail; i += kBlock * kVec) UpdateAt<P, G, kVec>(a, s, i);
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kBlock) UpdateAt<P, G, 1>(a, s, i);
}

}  // namespace

template <typename P, typename G>
cudaError_t AdamUpdateMultiCuda(const AdamUpdateArgs<P, G>* tensors, const int32_t* decay,
                                int64_t count, cudaStream_t stream) {
  TensorTable<P, G> table{};
  int64_t chunks = 0;
  auto launch = [&] {
    table.first_chunk[table.count] = static_cast<int32_t>(chunks);
    AdamUpdateMultiKernel<P, G><<<static_cast<unsigned>(chunks), kBlock, 0, stream>>>(table);
    table.count = 0;
    chunks = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < count; ++i) {
    const AdamUpdateArgs<P, G>& a = tensors[i];
    if (a.n == 0) continue;
    table.tensors[table.count] = a;
    table.flags[table.count] = (decay[i] ? kDecay : 0) | (adam::VectorAligned(a) ? kVectorAligned : 0);
    table.first_chunk[table.count] = static_cast<int32_t>(chunks);
    chunks += cuda::CeilDiv(a.n, kChunk);
    if (++table.count == kMaxTensors) {
      if (const cudaError_t err = launch(); err != cudaSuccess) return err;
    }
  }
  return table.count > 0 ? launch() : cudaSuccess;
}

#define LSJAX_INSTANTIATE(P, G)                                                                   \
  template cudaError_t AdamUpdateMultiCuda<P, G>(const AdamUpdateArgs<P, G>*, const int32_t*, int64_t, \
                                                 cudaStream_t);
LSJAX_ADAM_DTYPE_PAIRS(LSJAX_INSTANTIATE, float, __half, __nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
