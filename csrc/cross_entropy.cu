// CUDA softmax cross-entropy with label smoothing (forward and backward),
// LightSeq-style but for any vocab size (256k and beyond) and bf16.
//
// One block per row (grid-stride over rows), threads striding over the vocab
// with 16-byte vector loads. Rows whose start is not 16-byte aligned (vocab
// not a multiple of the vector width) get a scalar head up to the first
// aligned element and a scalar tail; the body stays vectorised.
//
// Forward: one read of the row. Each thread keeps an online (streaming)
// log-sum-exp state (running max m, sum of exp(x - m)) and the plain sum of
// the logits; the block merges the states with warp shuffles and a fixed-order
// pass over the warps (deterministic). Thread 0 reads the label's logit.
// Backward: one read of the row and one write of dlogits, softmax recomputed
// from the saved per-row lse. Ignored rows are never read.
// Exponentials are exp2f of fma(x, log2(e), -m * log2(e)) (one MUFU op).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "csrc/cross_entropy.h"
#include "csrc/cuda_common.cuh"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::FromFloat;
using cuda::NextPow2;
using cuda::ToFloat;
using cuda::Vec;

constexpr int kBlock = 256;  // max threads per block (one row per block)
constexpr int kUnroll = 4;   // vectors loaded per thread before they are used
constexpr float kLog2e = 1.4426950408889634f;

// 0: ignored row, 1: label out of range, 2: valid.
__device__ __forceinline__ int Classify(int32_t label, int32_t ignore_id, int64_t vocab) {
  if (label == ignore_id) return 0;
  return (label < 0 || label >= vocab) ? 1 : 2;
}

// Elements before the first 16-byte aligned element of `row` (0 for VEC == 1).
template <typename T, int VEC>
__device__ __forceinline__ int64_t HeadElements(const T* row, int64_t vocab) {
  if (VEC == 1) return 0;
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(row) % 16);
  const int64_t head = mis == 0 ? 0 : (16 - mis) / sizeof(T);
  return head < vocab ? head : vocab;
}

template <typename T, int VEC>
__device__ __forceinline__ void ToFloats(const Vec<T, VEC>& v, float (&out)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = ToFloat(v.v[k]);
}

// Merges the log-sum-exp state (m2, s2) into (m, s): m a max, s = sum exp(x - m).
__device__ __forceinline__ void Merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty (or all -inf)
  s = s * exp2f((m - mx) * kLog2e) + s2 * exp2f((m2 - mx) * kLog2e);
  m = mx;
}

// Per-thread streaming state of one row.
struct RowState {
  float m = -INFINITY;  // max logit seen
  float s = 0.f;        // sum of exp(x - m)
  float sum = 0.f;      // sum of the logits (label smoothing)

  template <int N>
  __device__ __forceinline__ void Add(const float (&v)[N]) {
    float vmax = v[0];
#pragma unroll
    for (int k = 1; k < N; ++k) vmax = fmaxf(vmax, v[k]);
    if (vmax > m) {  // rare after the first vectors
      s *= exp2f((m - vmax) * kLog2e);
      m = vmax;
    }
    if (m > -INFINITY) {
      const float ml = m * kLog2e;
#pragma unroll
      for (int k = 0; k < N; ++k) s += exp2f(fmaf(v[k], kLog2e, -ml));
    }
#pragma unroll
    for (int k = 0; k < N; ++k) sum += v[k];
  }
};

// Block-wide merge of the RowStates; every thread gets the same result (the
// shuffles are symmetric and the warps are combined in a fixed order).
// `smem` holds 3 * 32 floats. Every thread of the block must call it.
__device__ __forceinline__ void BlockMerge(RowState& st, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, st.m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, st.s, o);
    st.sum += __shfl_xor_sync(0xffffffffu, st.sum, o);
    Merge(st.m, st.s, m2, s2);
  }
  const int warps = blockDim.x / 32;
  if (warps == 1) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // the previous row's readers are done with smem
  if (lane == 0) {
    smem[warp] = st.m;
    smem[32 + warp] = st.s;
    smem[64 + warp] = st.sum;
  }
  __syncthreads();
  st.m = smem[0];
  st.s = smem[32];
  st.sum = smem[64];
  for (int w = 1; w < warps; ++w) {
    Merge(st.m, st.s, smem[w], smem[32 + w]);
    st.sum += smem[64 + w];
  }
}

// ---------------------------------------------------------------- forward --

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) CeFwd(CrossEntropyFwdArgs<T> a) {
  __shared__ float smem[3 * 32];
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int32_t label = a.labels[row];
    const int kind = Classify(label, a.ignore_id, a.vocab);  // uniform over the block
    if (kind != 2) {
      if (tid == 0) a.loss[row] = a.lse[row] = kind == 0 ? 0.f : NAN;
      continue;
    }
    const T* x = a.logits + row * a.vocab;
    const int64_t head = HeadElements<T, VEC>(x, a.vocab);
    const int64_t nvec = (a.vocab - head) / VEC;
    const int64_t tail = head + nvec * VEC;
    RowState st;
    for (int64_t c = tid; c < head; c += nt) {
      const float v[1] = {ToFloat(x[c])};
      st.Add(v);
    }
    const Vec<T, VEC>* xv = reinterpret_cast<const Vec<T, VEC>*>(x + head);
    int64_t i = tid;
    for (; i + (kUnroll - 1) * nt < nvec; i += kUnroll * nt) {
      Vec<T, VEC> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = xv[i + u * nt];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float v[VEC];
        ToFloats(raw[u], v);
        st.Add(v);
      }
    }
    for (; i < nvec; i += nt) {
      float v[VEC];
      ToFloats(xv[i], v);
      st.Add(v);
    }
    for (int64_t c = tail + tid; c < a.vocab; c += nt) {
      const float v[1] = {ToFloat(x[c])};
      st.Add(v);
    }
    BlockMerge(st, smem);
    if (tid == 0) {
      const float lse = st.m + logf(st.s);
      const float nll = lse - ToFloat(x[label]);
      const float smooth = lse - st.sum / static_cast<float>(a.vocab);
      a.loss[row] = (1.f - a.eps) * nll + a.eps * smooth;
      a.lse[row] = lse;
    }
  }
}

// --------------------------------------------------------------- backward --

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) CeBwd(CrossEntropyBwdArgs<T> a) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const float off_target = a.eps / static_cast<float>(a.vocab);
  const float on_target = 1.f - a.eps;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int32_t label = a.labels[row];
    const int kind = Classify(label, a.ignore_id, a.vocab);
    const T* x = a.logits + row * a.vocab;
    T* dx = a.dlogits + row * a.vocab;
    const int64_t head = HeadElements<T, VEC>(x, a.vocab);  // dx has the same alignment
    const int64_t nvec = (a.vocab - head) / VEC;
    const int64_t tail = head + nvec * VEC;
    Vec<T, VEC>* dxv = reinterpret_cast<Vec<T, VEC>*>(dx + head);
    if (kind != 2) {  // ignored: zeros; bad label: NaN. The logits are not read.
      const T fill = FromFloat<T>(kind == 0 ? 0.f : NAN);
      Vec<T, VEC> fv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) fv.v[k] = fill;
      for (int64_t c = tid; c < head; c += nt) dx[c] = fill;
      for (int64_t i = tid; i < nvec; i += nt) dxv[i] = fv;
      for (int64_t c = tail + tid; c < a.vocab; c += nt) dx[c] = fill;
      continue;
    }
    const float g = a.dloss[row];
    const float lse_l = a.lse[row] * kLog2e;
    auto grad = [&](float v, int64_t c) {
      const float p = exp2f(fmaf(v, kLog2e, -lse_l));
      const float q = off_target + (c == label ? on_target : 0.f);
      return g * (p - q);
    };
    for (int64_t c = tid; c < head; c += nt) dx[c] = FromFloat<T>(grad(ToFloat(x[c]), c));
    const Vec<T, VEC>* xv = reinterpret_cast<const Vec<T, VEC>*>(x + head);
    auto one = [&](const Vec<T, VEC>& raw, int64_t i) {
      Vec<T, VEC> out;
      const int64_t c0 = head + i * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = FromFloat<T>(grad(ToFloat(raw.v[k]), c0 + k));
      dxv[i] = out;
    };
    int64_t i = tid;
    for (; i + (kUnroll - 1) * nt < nvec; i += kUnroll * nt) {
      Vec<T, VEC> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = xv[i + u * nt];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) one(raw[u], i + u * nt);
    }
    for (; i < nvec; i += nt) one(xv[i], i);
    for (int64_t c = tail + tid; c < a.vocab; c += nt) dx[c] = FromFloat<T>(grad(ToFloat(x[c]), c));
  }
}

// ------------------------------------------------------------ launch plan --

// Threads per row: about 4 vectors per thread, one warp at least, kBlock at most.
template <typename T>
int Threads(int64_t vocab) {
  const int64_t nvec = CeilDiv(vocab, cuda::kVec16<T>);
  return static_cast<int>(std::min<int64_t>(kBlock, std::max<int64_t>(32, NextPow2(CeilDiv(nvec, 4)))));
}

int64_t Grid(int64_t rows) { return std::min<int64_t>(rows, int64_t{1} << 20); }

}  // namespace

template <typename T>
cudaError_t CrossEntropyFwdCuda(const CrossEntropyFwdArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  // Only the logits are read in vectors, and each row is realigned: always vectorised.
  CeFwd<T, cuda::kVec16<T>><<<Grid(a.rows), Threads<T>(a.vocab), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t CrossEntropyBwdCuda(const CrossEntropyBwdArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  // The per-row realignment serves both logits and dlogits only when their
  // base addresses agree modulo 16 (always, for XLA's buffers); else scalar.
  const bool same_alignment = reinterpret_cast<uintptr_t>(a.logits) % 16 ==
                              reinterpret_cast<uintptr_t>(a.dlogits) % 16;
  if (same_alignment) {
    CeBwd<T, cuda::kVec16<T>><<<Grid(a.rows), Threads<T>(a.vocab), 0, stream>>>(a);
  } else {
    CeBwd<T, 1><<<Grid(a.rows), Threads<T>(a.vocab), 0, stream>>>(a);
  }
  return cudaGetLastError();
}

#define LSJAX_INSTANTIATE(T)                                                                 \
  template cudaError_t CrossEntropyFwdCuda<T>(const CrossEntropyFwdArgs<T>&, cudaStream_t); \
  template cudaError_t CrossEntropyBwdCuda<T>(const CrossEntropyBwdArgs<T>&, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
