// CUDA all-finite check (csrc/all_finite.h), after apex's multi_tensor_apply
// (as csrc/adam_update_multi.cu).
//
// The result is zeroed by a memset, then a launch checks up to kMaxTensors
// tensors listed in a table passed by value as a __grid_constant__ kernel
// parameter (over 4 KB: CUDA 12.1+ takes up to 32764 parameter bytes on
// sm_70+), so a whole model's gradients are one launch. Each tensor is cut into
// kChunkBytes chunks, one block per chunk; a block finds its tensor by binary
// search of the table's chunk offsets. A thread keeps kUnroll 16-byte loads in
// flight when the tensor is 16-byte aligned (else every element is read alone),
// then reads the scalar tail, and tests the raw bits: an exponent of all ones
// is inf or NaN. The block ORs its threads' findings and one thread of a block
// that found a non-finite element stores 1: every store writes the same value,
// so the result is deterministic without atomics.
#include "csrc/all_finite.h"
#include "csrc/cuda_common.cuh"

namespace lsjax {
namespace {

constexpr int kBlock = 256;
constexpr int kUnroll = 4;               // 16-byte loads in flight per thread
constexpr int kChunkBytes = 32 * 1024;   // per block: 2 rounds of kUnroll loads per thread
constexpr int kMaxTensors = 384;         // tensors per launch
constexpr int kMaxParamBytes = 32764;    // kernel parameter space, CUDA 12.1+ on sm_70+

// Storage bits of an element (Word) and their exponent field (kExponent).
template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using Word = uint32_t;
  static constexpr uint32_t kExponent = 0x7f800000u;
};
template <>
struct FloatBits<__half> {
  using Word = uint16_t;
  static constexpr uint32_t kExponent = 0x7c00u;
};
template <>
struct FloatBits<__nv_bfloat16> {
  using Word = uint16_t;
  static constexpr uint32_t kExponent = 0x7f80u;
};

// Whether the element in the low sizeof(T) bytes of `bits` is inf or NaN.
template <typename T>
__device__ __forceinline__ bool NonFinite(uint32_t bits) {
  constexpr uint32_t kExponent = FloatBits<T>::kExponent;
  return (bits & kExponent) == kExponent;
}

// Whether any of the 16 / sizeof(T) elements of a 16-byte vector is inf or NaN.
template <typename T>
__device__ __forceinline__ bool AnyNonFinite(const uint4& v) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  bool bad = false;
#pragma unroll
  for (const uint32_t w : words) {
    bad |= NonFinite<T>(w);
    if constexpr (sizeof(T) == 2) bad |= NonFinite<T>(w >> 16);
  }
  return bad;
}

template <typename T>
struct TensorTable {
  AllFiniteTensor<T> tensors[kMaxTensors];
  int32_t first_chunk[kMaxTensors + 1];  // tensor t owns chunks [first_chunk[t], first_chunk[t + 1])
  bool vector_aligned[kMaxTensors];      // data 16-byte aligned
  int32_t count;
};
static_assert(sizeof(TensorTable<float>) + sizeof(int32_t*) <= kMaxParamBytes,
              "the table and the result pointer must fit the kernel parameter space");

template <typename T>
__global__ void __launch_bounds__(kBlock)
    AllFiniteKernel(const __grid_constant__ TensorTable<T> table, int32_t* nonfinite) {
  constexpr int kChunk = kChunkBytes / sizeof(T);  // elements
  constexpr int kVec = 16 / sizeof(T);             // elements per 16-byte load
  const int chunk = blockIdx.x;
  const int t = cuda::TableIndex(table.first_chunk, table.count, chunk);
  const AllFiniteTensor<T> a = table.tensors[t];
  const int64_t begin = static_cast<int64_t>(chunk - table.first_chunk[t]) * kChunk;
  const int len = a.n - begin < kChunk ? static_cast<int>(a.n - begin) : kChunk;
  const T* x = a.data + begin;
  bool bad = false;
  int tail = 0;
  if (table.vector_aligned[t]) {
    const uint4* v = reinterpret_cast<const uint4*>(x);
    const int vectors = len / kVec;
    tail = vectors * kVec;
    for (int j = threadIdx.x; j < vectors; j += kBlock * kUnroll) {
      uint4 w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads issued before any test
        const int k = j + u * kBlock;
        w[u] = k < vectors ? __ldg(v + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) bad |= AnyNonFinite<T>(w[u]);
    }
  }
  const auto* bits = reinterpret_cast<const typename FloatBits<T>::Word*>(x);
  for (int i = tail + threadIdx.x; i < len; i += kBlock) bad |= NonFinite<T>(bits[i]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) *nonfinite = 1;
}

}  // namespace

template <typename T>
cudaError_t AllFiniteCuda(const AllFiniteTensor<T>* tensors, int64_t count, int32_t* nonfinite,
                          cudaStream_t stream) {
  if (const cudaError_t err = cudaMemsetAsync(nonfinite, 0, sizeof(int32_t), stream); err != cudaSuccess) {
    return err;
  }
  constexpr int64_t kChunk = kChunkBytes / sizeof(T);
  TensorTable<T> table{};
  int64_t chunks = 0;
  auto launch = [&] {
    table.first_chunk[table.count] = static_cast<int32_t>(chunks);
    AllFiniteKernel<T><<<static_cast<unsigned>(chunks), kBlock, 0, stream>>>(table, nonfinite);
    table.count = 0;
    chunks = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < count; ++i) {
    const AllFiniteTensor<T>& a = tensors[i];
    if (a.n == 0) continue;
    table.tensors[table.count] = a;
    table.vector_aligned[table.count] = cuda::Aligned(a.data, 16);
    table.first_chunk[table.count] = static_cast<int32_t>(chunks);
    chunks += cuda::CeilDiv(a.n, kChunk);
    if (++table.count == kMaxTensors) {
      if (const cudaError_t err = launch(); err != cudaSuccess) return err;
    }
  }
  return table.count > 0 ? launch() : cudaSuccess;
}

template cudaError_t AllFiniteCuda<float>(const AllFiniteTensor<float>*, int64_t, int32_t*, cudaStream_t);
template cudaError_t AllFiniteCuda<__half>(const AllFiniteTensor<__half>*, int64_t, int32_t*, cudaStream_t);
template cudaError_t AllFiniteCuda<__nv_bfloat16>(const AllFiniteTensor<__nv_bfloat16>*, int64_t, int32_t*,
                                                  cudaStream_t);

}  // namespace lsjax
