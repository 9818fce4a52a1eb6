// CUDA decode attention (csrc/decode_attention.h): one block per (batch, head). Masked keys are not read.
// For head sizes of 4..32 16-byte vectors, one pass: a few lanes share each key, whose K and V vectors
// they load together, and each group of lanes keeps an online softmax (DecodeAttentionLanesKernel).
// Otherwise three steps (DecodeAttentionKernel):
//   1. each thread scores whole keys against q staged in shared memory;
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
using cuda::ToFloat;
using cuda::Vec;

constexpr int kThreads = 128;
// The lanes kernel's block: 2 keys per group of lanes and iteration, 64 keys in flight per block for
// transformer-base heads (8 lanes of 8 values), few instructions between a step's loads and its output.
constexpr int kLanesThreads = 256;

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

// Appending: block (b, h) writes its k_new / v_new rows into the caches at the append position and
// returns it (-1 when not appending). Nothing in the launch reads them back (see KeyAt): no barrier.
template <typename T>
__device__ __forceinline__ int64_t AppendKey(const DecodeAttentionArgs<T>& a, int64_t b, int64_t h) {
  const int64_t t = DecodeAttentionAppendPosition(a.append_at, a.k_len);
  if (t < 0) return t;
  const int64_t dst = (b * a.k_len + t) * a.heads * a.head_dim + h * a.head_dim, src = b * a.q_stride + h * a.head_dim;
  for (int d = threadIdx.x; d < a.head_dim; d += kThreads) {
    a.k_cache[dst + d] = a.k_new[src + d];
    a.v_cache[dst + d] = a.v_new[src + d];
  }
  return t;
}

// Head h of key j of row b (key_src entry `offset`, not masked) in `cache` (k or v), or in `fresh`
// (k_new or v_new) for the appended key.
template <typename T>
__device__ __forceinline__ const T* KeyAt(const DecodeAttentionArgs<T>& a, const T* cache, const T* fresh, int64_t b,
                                          int64_t h, int64_t j, int32_t offset, int64_t appended) {
  if (j == appended) return fresh + b * a.q_stride + h * a.head_dim;
  const int64_t r = DecodeAttentionKeyRow(b, j, offset, a.batch, appended);
  return cache + ((r * a.k_len + j) * a.heads + h) * a.head_dim;
}

// Shared memory: p[L] (scores, then probabilities) and acc[groups, D] (the groups' partial rows).
// Thread (g, c) of `groups` groups accumulates output columns c*VEC.. over the keys j = g, g + groups,
// ...; the partial rows are then summed in a fixed order and scaled by 1 / sum.
template <typename T, int VEC>
__device__ __forceinline__ void WeightedSum(const DecodeAttentionArgs<T>& a, const float* p, float* acc, int D,
                                            int groups, float inv, int64_t appended) {
  const int64_t b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int vecs = D / VEC, L = static_cast<int>(DecodeAttentionKeys(a, appended));
  const int32_t* src = a.key_src + b * a.k_len;
  for (int task = threadIdx.x; task < vecs * groups; task += kThreads) {
    const int c = (task % vecs) * VEC, g = task / vecs;
    float o[VEC] = {};
#pragma unroll 4
    for (int j = g; j < L; j += groups) {
      const float pj = p[j];
      if (pj == 0.f) continue;  // masked (or underflowed) keys add nothing: not read
      float f[VEC];
      LoadFloats<T, VEC>(KeyAt(a, a.v, a.v_new, b, h, j, src[j], appended) + c, f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = fmaf(pj, f[i], o[i]);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g * D + c + i] = o[i];
  }
  __syncthreads();
  T* out = a.out + (b * a.heads + h) * a.head_dim;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.f;
    for (int g = 0; g < groups; ++g) o += acc[g * D + d];
    out[d] = FromFloat<T>(o * inv);
  }
}

// Block max of the scores in p (-inf = masked), then p = exp(p - max); returns 1 / sum (0 if none).
// The barriers of the reductions publish p.
__device__ __forceinline__ float Softmax(float* p, int L, float mx, float* red) {
  mx = BlockReduce<true>(mx, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < L; j += kThreads) {
    const float e = p[j] == -INFINITY ? 0.f : __expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = BlockReduce<false>(sum, red);
  return sum > 0.f ? 1.f / sum : 0.f;
}

// Head sizes D = VEC * LANES with LANES in {4, 8, 16, 32}, in one pass over the cache: LANES threads
// share a key (each holds one 16-byte vector of q, K and V) and sum the partial dot product with
// shuffles, so every lane of a group gets the same score. The kGroups = kLanesThreads / LANES groups take
// keys j = g, g + kGroups, ... in chunks of kUnroll keys, whose offsets, then K and V vectors, are
// all loaded before any is used; each group keeps a running max, sum and partial output row (online
// softmax). The latency chain is two loads deep: the append position, q, the first chunk's offsets
// and the fresh key/value vectors are loaded together, then the cached K and V (the appended key is
// used from registers and written to the caches at the end). The groups' partials are combined by
// shuffles within each warp, then across the warps in shared memory, in a fixed order.
template <typename T, int VEC, int LANES>
__global__ void __launch_bounds__(kLanesThreads) DecodeAttentionLanesKernel(DecodeAttentionArgs<T> a) {
  constexpr int D = VEC * LANES, kGroups = kLanesThreads / LANES, kUnroll = 2, kWarps = kLanesThreads / 32;
  using V = Vec<T, VEC>;
  __shared__ float part_o[kWarps][D];
  __shared__ float part_m[kWarps], part_l[kWarps];
  const int64_t b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int c = (threadIdx.x % LANES) * VEC, g = threadIdx.x / LANES;
  const int32_t* src = a.key_src + b * a.k_len;
  const int64_t row = b * a.q_stride + h * D + c;  // this lane's vector of q, k_new and v_new
  const auto load_offsets = [&](int j0, int32_t(&off)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kGroups + g;
      off[u] = j < a.k_len ? src[j] : kDecodeAttentionMasked;
    }
  };
  const int64_t appended = DecodeAttentionAppendPosition(a.append_at, a.k_len);
  const V qv = *reinterpret_cast<const V*>(a.q + row);
  V k_fresh{}, v_fresh{};
  if (a.k_new != nullptr) {
    k_fresh = *reinterpret_cast<const V*>(a.k_new + row);
    v_fresh = *reinterpret_cast<const V*>(a.v_new + row);
  }
  int32_t off[kUnroll];
  load_offsets(0, off);
  const int L = static_cast<int>(DecodeAttentionKeys(a, appended));
  float q[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) q[i] = ToFloat(qv.v[i]) * a.scale;
  float m = -INFINITY, l = 0.f, o[VEC] = {};
  for (int j0 = 0; j0 < L; j0 += kGroups * kUnroll) {  // uniform trip count: every lane reaches the shuffles
    if (j0 > 0) load_offsets(j0, off);
    bool take[kUnroll];
    V kv[kUnroll], vv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kGroups + g;
      take[u] = j < L && off[u] != kDecodeAttentionMasked;
      if (!take[u]) continue;
      if (j == appended) {
        kv[u] = k_fresh;
        vv[u] = v_fresh;
      } else {
        const int64_t r = DecodeAttentionKeyRow(b, j, off[u], a.batch, appended);
        const int64_t at = ((r * a.k_len + j) * a.heads + h) * D + c;
        kv[u] = *reinterpret_cast<const V*>(a.k + at);
        vv[u] = *reinterpret_cast<const V*>(a.v + at);
      }
    }
    float s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      s[u] = 0.f;
      if (take[u]) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[u] = fmaf(q[i], ToFloat(kv[u].v[i]), s[u]);
      }
#pragma unroll
      for (int x = LANES / 2; x > 0; x >>= 1) s[u] += __shfl_xor_sync(0xffffffffu, s[u], x);
    }
    float chunk_max = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (take[u]) chunk_max = fmaxf(chunk_max, s[u]);
    }
    if (chunk_max == -INFINITY) continue;  // no attended key yet
    const float rescale = __expf(m - chunk_max);  // 0 while m is -inf
    m = chunk_max;
    l *= rescale;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] *= rescale;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!take[u]) continue;
      const float p = __expf(s[u] - m);
      l += p;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = fmaf(p, ToFloat(vv[u].v[i]), o[i]);
    }
  }
  // The groups of a warp combine by shuffles (lanes LANES, 2 LANES, ... apart hold the same columns).
#pragma unroll
  for (int x = LANES; x < 32; x <<= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, x), l2 = __shfl_xor_sync(0xffffffffu, l, x);
    const float mx = fmaxf(m, m2);
    const float w1 = m == -INFINITY ? 0.f : __expf(m - mx), w2 = m2 == -INFINITY ? 0.f : __expf(m2 - mx);
    l = l * w1 + l2 * w2;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = o[i] * w1 + __shfl_xor_sync(0xffffffffu, o[i], x) * w2;
    m = mx;
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 < LANES) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) part_o[warp][c + i] = o[i];
    if (c == 0) {
      part_m[warp] = m;
      part_l[warp] = l;
    }
  }
  if (appended >= 0 && g == 0) {  // the step's key and value into the caches (read from registers above)
    const int64_t at = ((b * a.k_len + appended) * a.heads + h) * D + c;
    *reinterpret_cast<V*>(a.k_cache + at) = k_fresh;
    *reinterpret_cast<V*>(a.v_cache + at) = v_fresh;
  }
  __syncthreads();
  float mx = -INFINITY;
#pragma unroll
  for (int x = 0; x < kWarps; ++x) mx = fmaxf(mx, part_m[x]);
  T* out = a.out + (b * a.heads + h) * D;
  for (int d = threadIdx.x; d < D; d += kLanesThreads) {
    float sum = 0.f, acc = 0.f;
    if (mx != -INFINITY) {  // else no attended key: zeros
#pragma unroll
      for (int x = 0; x < kWarps; ++x) {
        const float w = part_m[x] == -INFINITY ? 0.f : __expf(part_m[x] - mx);
        sum = fmaf(part_l[x], w, sum);
        acc = fmaf(part_o[x][d], w, acc);
      }
    }
    out[d] = FromFloat<T>(sum > 0.f ? acc / sum : 0.f);
  }
}

// Any head size: thread j scores keys j, j + kThreads, ... with a dot product over the whole head.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) DecodeAttentionKernel(DecodeAttentionArgs<T> a, int groups) {
  extern __shared__ float smem[];
  __shared__ float red[32];
  const int64_t b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int D = static_cast<int>(a.head_dim);
  float* qs = smem;          // [D]
  float* p = smem + D;       // [k_len]
  float* acc = p + a.k_len;  // [groups, D]
  const int64_t appended = AppendKey(a, b, h);
  const int L = static_cast<int>(DecodeAttentionKeys(a, appended));
  const T* q = a.q + b * a.q_stride + h * a.head_dim;
  for (int d = threadIdx.x; d < D; d += kThreads) qs[d] = ToFloat(q[d]) * a.scale;
  __syncthreads();
  const int32_t* src = a.key_src + b * a.k_len;
  float mx = -FLT_MAX;
  for (int j = threadIdx.x; j < L; j += kThreads) {
    float s = -INFINITY;
    if (src[j] != kDecodeAttentionMasked) {
      const T* kj = KeyAt(a, a.k, a.k_new, b, h, j, src[j], appended);
      s = 0.f;
#pragma unroll 4
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
  const float inv = Softmax(p, L, mx, red);
  WeightedSum<T, VEC>(a, p, acc, D, groups, inv, appended);
}

}  // namespace

template <typename T>
cudaError_t DecodeAttentionCuda(const DecodeAttentionArgs<T>& a, cudaStream_t stream) {
  constexpr int vec16 = cuda::kVec16<T>;
  const bool vectorised = a.head_dim % vec16 == 0 && a.q_stride % vec16 == 0 && cuda::Aligned(a.q, 16) &&
                          cuda::Aligned(a.k, 16) && cuda::Aligned(a.v, 16) && cuda::Aligned(a.out, 16);
  const auto blocks = static_cast<unsigned>(a.batch * a.heads);
  const int64_t lanes = vectorised ? a.head_dim / vec16 : 0;
  auto lanes_kernel = [&](auto n) {
    constexpr int kLanes = decltype(n)::value;
    DecodeAttentionLanesKernel<T, vec16, kLanes><<<blocks, kLanesThreads, 0, stream>>>(a);
  };
  switch (lanes) {
    case 4: lanes_kernel(Int<4>{}); break;
    case 8: lanes_kernel(Int<8>{}); break;
    case 16: lanes_kernel(Int<16>{}); break;
    case 32: lanes_kernel(Int<32>{}); break;
    default: {
      const int vec = vectorised ? vec16 : 1;
      const int vecs = static_cast<int>(a.head_dim / vec);
      const int groups = vecs >= kThreads ? 1 : kThreads / vecs;
      const size_t smem = sizeof(float) * (a.head_dim + a.k_len + static_cast<int64_t>(groups) * a.head_dim);
      if (vectorised) {
        DecodeAttentionKernel<T, vec16><<<blocks, kThreads, smem, stream>>>(a, groups);
      } else {
        DecodeAttentionKernel<T, 1><<<blocks, kThreads, smem, stream>>>(a, groups);
      }
    }
  }
  return cudaGetLastError();
}

template cudaError_t DecodeAttentionCuda<float>(const DecodeAttentionArgs<float>&, cudaStream_t);
template cudaError_t DecodeAttentionCuda<__half>(const DecodeAttentionArgs<__half>&, cudaStream_t);
template cudaError_t DecodeAttentionCuda<__nv_bfloat16>(const DecodeAttentionArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace lsjax
