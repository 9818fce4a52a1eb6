// CUDA decode attention (csrc/decode_attention.h): one block per (batch, head).
//   1. q * scale into shared memory; each thread scores keys j = tid, tid + 128, ...
//      (a 16-byte-vector dot product over head_dim; masked keys are skipped, not read);
//   2. block max, exp, block sum over the scores kept in shared memory;
//   3. groups of threads take keys j = g, g + groups, ...; each thread of a group
//      accumulates VEC output columns; the groups' partial rows are summed in a fixed order.
#include <cfloat>

#include "csrc/cuda_common.cuh"
#include "csrc/decode_attention.h"

namespace lsjax {
namespace {

using cuda::FromFloat;
using cuda::Int;
using cuda::LoadFloats;
using cuda::StoreFloats;

constexpr int kThreads = 128;

// All threads of the block get the block-wide max (kMax) or sum of v; `red` has 32 floats.
template <bool kMax>
__device__ __forceinline__ float BlockReduce(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < kThreads / 32; ++w) v = kMax ? fmaxf(v, red[w]) : v + red[w];
  return v;
}

// HEAD_DIM: the head size as a compile-time constant (its loops unroll fully), or 0: a.head_dim.
template <typename T, int VEC, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads) DecodeAttentionKernel(DecodeAttentionArgs<T> a, int groups) {
  extern __shared__ float smem[];
  __shared__ float red[32];
  const int64_t b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int D = HEAD_DIM ? HEAD_DIM : static_cast<int>(a.head_dim), L = static_cast<int>(a.k_len), tid = threadIdx.x;
  const int64_t row = a.heads * a.head_dim;
  constexpr int kDotUnroll = HEAD_DIM ? HEAD_DIM / VEC : 4;  // whole rows of a known head size
  float* qs = smem;              // [D]
  float* p = smem + D;           // [L]
  float* acc = p + L;            // [groups, D]

  const T* q = a.q + (b * a.heads + h) * a.head_dim;
  for (int d = tid; d < D; d += kThreads) qs[d] = cuda::ToFloat(q[d]) * a.scale;
  __syncthreads();

  const uint8_t* mask = a.mask + b * L;
  const T* k = a.k + b * L * row + h * a.head_dim;
  float mx = -FLT_MAX;
  for (int j = tid; j < L; j += kThreads) {
    float s = -INFINITY;
    if (mask[j]) {
      const T* kj = k + j * row;
      s = 0.f;
#pragma unroll(kDotUnroll)  // several 16-byte loads in flight per thread
      for (int d = 0; d < D; d += VEC) {
        float f[VEC];
        LoadFloats<T, VEC>(kj + d, f);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s = fmaf(qs[d + i], f[i], s);
      }
      mx = fmaxf(mx, s);
    }
    p[j] = s;
  }
  mx = BlockReduce<true>(mx, red);
  float sum = 0.f;
  for (int j = tid; j < L; j += kThreads) {
    const float e = p[j] == -INFINITY ? 0.f : __expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = BlockReduce<false>(sum, red);  // its barriers also publish p
  const float inv = sum > 0.f ? 1.f / sum : 0.f;

  const int vecs = D / VEC;
  const T* v = a.v + b * L * row + h * a.head_dim;
  for (int task = tid; task < vecs * groups; task += kThreads) {
    const int c = (task % vecs) * VEC, g = task / vecs;
    float o[VEC] = {};
#pragma unroll 4
    for (int j = g; j < L; j += groups) {
      const float pj = p[j];
      if (pj == 0.f) continue;  // masked (or underflowed) keys add nothing: not read
      float f[VEC];
      LoadFloats<T, VEC>(v + j * row + c, f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = fmaf(pj, f[i], o[i]);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g * D + c + i] = o[i];
  }
  __syncthreads();
  T* out = a.out + (b * a.heads + h) * a.head_dim;
  for (int d = tid; d < D; d += kThreads) {
    float o = 0.f;
    for (int g = 0; g < groups; ++g) o += acc[g * D + d];
    out[d] = FromFloat<T>(o * inv);
  }
}

}  // namespace

template <typename T>
cudaError_t DecodeAttentionCuda(const DecodeAttentionArgs<T>& a, cudaStream_t stream) {
  const int vec16 = cuda::kVec16<T>;
  const bool vectorised = a.head_dim % vec16 == 0 && cuda::Aligned(a.q, 16) && cuda::Aligned(a.k, 16) &&
                          cuda::Aligned(a.v, 16) && cuda::Aligned(a.out, 16);
  const int vec = vectorised ? vec16 : 1;
  const int vecs = static_cast<int>(a.head_dim / vec);
  const int groups = vecs >= kThreads ? 1 : kThreads / vecs;
  const size_t smem = sizeof(float) * (a.head_dim + a.k_len + static_cast<int64_t>(groups) * a.head_dim);
  const auto blocks = static_cast<unsigned>(a.batch * a.heads);
  auto launch = [&](auto v, auto head_dim) {
    DecodeAttentionKernel<T, decltype(v)::value, decltype(head_dim)::value>
        <<<blocks, kThreads, smem, stream>>>(a, groups);
  };
  if (vec == 1) {
    launch(Int<1>{}, Int<0>{});
  } else if (a.head_dim == 64) {
    launch(Int<cuda::kVec16<T>>{}, Int<64>{});
  } else if (a.head_dim == 128) {
    launch(Int<cuda::kVec16<T>>{}, Int<128>{});
  } else {
    launch(Int<cuda::kVec16<T>>{}, Int<0>{});
  }
  return cudaGetLastError();
}

template cudaError_t DecodeAttentionCuda<float>(const DecodeAttentionArgs<float>&, cudaStream_t);
template cudaError_t DecodeAttentionCuda<__half>(const DecodeAttentionArgs<__half>&, cudaStream_t);
template cudaError_t DecodeAttentionCuda<__nv_bfloat16>(const DecodeAttentionArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace lsjax
