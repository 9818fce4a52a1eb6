// CUDA multi-tensor Adam update (csrc/adam_update_multi.h), after apex's
// multi_tensor_apply.
//
// A launch takes up to kMaxTensors tensors in a table passed by value as a
// __grid_constant__ kernel parameter (CUDA 12.1+ allows 32 KB of parameters on
// sm_70+), so the update of a whole Transformer is one launch. Each tensor is
// cut into kChunk-element chunks, one block per chunk; a block finds its tensor
// by binary search of the table's chunk offsets. Within a chunk each thread
// takes kRuns runs of kVec consecutive elements at a time (16-byte moment
// accesses, all runs' loads in flight together) when the tensor's pointers
// allow it, then the scalar tail. No atomics: every element is written by one
// thread. With an `apply` flag that reads 0 every block returns at once: the
// (aliased) outputs keep their contents, so a skipped step leaves the state as it was.
#include "csrc/adam_update.cuh"
#include "csrc/adam_update_multi.h"

namespace lsjax {
namespace {

using adam::kVec;
using adam::UpdateAt;

constexpr int kBlock = 256;
constexpr int64_t kChunk = 16 * 1024;
constexpr int kRuns = 2;  // kVec-element runs per thread in flight
constexpr int kMaxTensors = 256;

enum TensorFlag : uint8_t { kDecay = 1, kVectorAligned = 2 };

template <typename P, typename G>
struct TensorTable {
  AdamUpdateArgs<P, G> tensors[kMaxTensors];
  int32_t first_chunk[kMaxTensors + 1];  // tensor t owns chunks [first_chunk[t], first_chunk[t + 1])
  uint8_t flags[kMaxTensors];            // TensorFlag bits
  const int32_t* apply;                  // nullptr, or device int32: 0 skips the update
  int32_t count;
};
static_assert(sizeof(TensorTable<float, float>) <= 32000, "the table must fit the 32 KB kernel parameter space");

template <typename P, typename G>
__global__ void __launch_bounds__(kBlock, 4) AdamUpdateMultiKernel(const __grid_constant__ TensorTable<P, G> table) {
  if (table.apply != nullptr && *table.apply == 0) return;
  const int chunk = blockIdx.x;
  const int t = cuda::TableIndex(table.first_chunk, table.count, chunk);
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
    for (int64_t i = begin + threadIdx.x * kVec; i < tail; i += kRuns * kBlock * kVec) {
      UpdateAt<P, G, kVec, kRuns>(a, s, i, kBlock * kVec, tail);
    }
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kBlock) UpdateAt<P, G, 1>(a, s, i);
}

}  // namespace

template <typename P, typename G>
cudaError_t AdamUpdateMultiCuda(const AdamUpdateArgs<P, G>* tensors, const int32_t* decay,
                                int64_t count, const int32_t* apply, cudaStream_t stream) {
  TensorTable<P, G> table{};
  table.apply = apply;
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
                                                 const int32_t*, cudaStream_t);
LSJAX_ADAM_DTYPE_PAIRS(LSJAX_INSTANTIATE, float, __half, __nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
