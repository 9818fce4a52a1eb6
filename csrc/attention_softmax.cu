// CUDA attention softmax (forward and backward) with key-padding / causal
// masks and Philox dropout, LightSeq-style but with no length cap.
//
// Launch plan by k_len (as LightSeq picks block sizes by sequence length):
// * "register" kernels: the row is read once into fp32 registers with 16-byte
//   vector loads, reduced (max, then sum of exp) with warp shuffles (plus one
//   shared-memory step when a row spans several warps) and written once.
//   Threads per row = next_pow2(vectors / 4) in [1, 256], so short rows pack
//   many rows into one 256-thread block (k=128 bf16: 4 threads per row, 64
//   rows per block) and long rows use up to 8 warps; each thread holds
//   ITEMS (template: 1, 2, 4, 8) vectors. That covers k <= 16384 (bf16/fp16)
//   and k <= 8192 (fp32) in the forward, half of that in the backward.
// * "generic" kernels: any k, one block per row (grid-stride), the row
//   streamed twice from L2 (online max/sum, then the write).
// Dropout: one Philox call per group of 8 consecutive elements in the vector
// path (when the rng offset is a multiple of 8, the usual case), per element
// otherwise (DropoutKeepBits, csrc/philox.h). The register kernels issue the
// row's loads first, then draw the keep bits (they need no data) while the
// loads are in flight, then consume the row: the Philox work overlaps the
// memory latency instead of adding to it. The backward regenerates the mask
// and recomputes p from the scores and the saved row statistics.
// Deterministic: no atomics.
#include <algorithm>
#include <type_traits>

#include "csrc/attention_softmax.h"
#include "csrc/cuda_common.cuh"
#include "csrc/fast_math.h"
#include "csrc/philox.h"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::FromFloat;
using cuda::LoadFloats;
using cuda::NextPow2;
using cuda::StoreFloats;
using cuda::ToFloat;

constexpr int kBlock = 256;  // threads per block, all kernels
constexpr int kMaxItemsFwd = 8;
constexpr int kMaxItemsBwd = 4;
constexpr float kLog2e = 1.4426950408889634f;

// Blocks per SM the register kernels' registers must allow, by elements per
// thread: 3 (<= 80 registers) up to 32, else 2. Uncapped, the compiler took 128
// registers for the bf16 backward at 32 elements (2 blocks, 25% occupancy).
constexpr int MinBlocks(int elements) { return elements <= 32 ? 3 : 2; }

// Reduction (max or sum) over the `tpr` consecutive threads of a row slot
// (tpr a power of two in [1, kBlock]); smem holds kBlock / 32 floats. Every
// thread of the block must call it: it has barriers when tpr > 32.
template <bool kMax>
__device__ __forceinline__ float RowReduce(float v, int tpr, float* smem) {
  const int width = tpr < 32 ? tpr : 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {  // unrolled: width is uniform, each step a predicate
    if (o < width) {
      const float other = __shfl_xor_sync(0xffffffffu, v, o);
      v = kMax ? fmaxf(v, other) : v + other;
    }
  }
  if (tpr <= 32) return v;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wpr = tpr / 32;
  __syncthreads();  // the previous reduction's reads of smem are done
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int first = warp & ~(wpr - 1);
  float r = smem[first];
#pragma unroll
  for (int w = 1; w < kBlock / 32; ++w) {
    if (w < wpr) r = kMax ? fmaxf(r, smem[first + w]) : r + smem[first + w];
  }
  return r;
}

struct Origin {
  int32_t b0, h0, q0;
};

__device__ __forceinline__ Origin ReadOrigin(const AttnSoftmaxGeometry& g) {
  if (g.origin == nullptr) return Origin{0, 0, 0};
  return Origin{g.origin[0], g.origin[1], g.origin[2]};
}

// Bit k (k < 4) = bit 0 of byte k of w: the key-padding mask is XLA PRED,
// whose bytes are 0 or 1. One multiply gathers the four bits into bits 24-27
// (byte k's bit lands at 8k + 7i + 3 for the multiplier's byte i: distinct
// positions, so nothing carries, and i = 3 - k puts it at 24 + k).
__device__ __forceinline__ uint32_t PredBits4(uint32_t w) { return (w * 0x01020408u) >> 24; }

// Validity of VEC consecutive columns starting at col of a register-kernel row
// (k_len fits int32 there): bit k for column col + k. The causal limit is one
// mask per vector; mask_row (the row's key-padding mask, or nullptr) is read
// four bytes at a time when VEC % 4 == 0.
template <int VEC>
__device__ __forceinline__ uint32_t ValidBits(const uint8_t* mask_row, int limit, int col) {
  constexpr uint32_t kAll = VEC == 32 ? 0xFFFFFFFFu : (1u << VEC) - 1u;
  const int room = limit - col;  // columns before the causal limit
  const uint32_t valid = room >= VEC ? kAll : (room <= 0 ? 0u : (1u << room) - 1u);
  if (mask_row == nullptr) return valid;
  uint32_t keep = 0;
  if constexpr (VEC % 4 == 0) {
    const auto words = *reinterpret_cast<const cuda::Vec<uint32_t, VEC / 4>*>(mask_row + col);
#pragma unroll
    for (int j = 0; j < VEC / 4; ++j) keep |= PredBits4(words.v[j]) << (4 * j);
  } else {
    const auto bytes = *reinterpret_cast<const cuda::Vec<uint8_t, VEC>*>(mask_row + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) keep |= static_cast<uint32_t>(bytes.v[k] != 0) << k;
  }
  return valid & keep;
}

// Bits of a register kernel's ITEMS * VEC elements, bit i * VEC + k for
// element k of vector i: one or two registers.
template <int VEC, int ITEMS>
using RowMask = std::conditional_t<(VEC * ITEMS > 32), uint64_t, uint32_t>;

template <int VEC, int ITEMS>
__device__ __forceinline__ uint32_t VecBits(RowMask<VEC, ITEMS> bits, int i) {
  return static_cast<uint32_t>(bits >> (i * VEC));
}

// Validity and keep bits of a register kernel's vectors (vector i at column
// (i * tpr + t) * VEC), computed after the caller issued its loads of the row
// and before it uses them. Inactive vectors get no bits; without dropout no
// keep bits are drawn.
template <int VEC, int ITEMS>
__device__ __forceinline__ void RowBits(const AttnSoftmaxGeometry& g, const AttnRow& row, bool active, int nvec,
                                        int tpr, int t, bool dropout, const DropoutRng& rng,
                                        RowMask<VEC, ITEMS>& valid, RowMask<VEC, ITEMS>& keep) {
  using M = RowMask<VEC, ITEMS>;
  valid = keep = 0;
  const uint8_t* mask_row = g.mask == nullptr ? nullptr : g.mask + row.b * g.k_len;
  const int limit = static_cast<int>(row.limit);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * tpr + t;
    if (active && idx < nvec) valid |= M{ValidBits<VEC>(mask_row, limit, idx * VEC)} << (i * VEC);
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * tpr + t;
    const uint64_t e = row.global_row * g.k_len + static_cast<uint64_t>(idx) * VEC;
    if (dropout && active && idx < nvec) keep |= M{DropoutKeepBits<VEC>(rng, e)} << (i * VEC);
  }
}

// An empty asm the compiler must assume rewrites v's words: values it derived
// from v before are not reused after (no common subexpression kept alive in
// registers); they are recomputed instead. No instructions.
template <typename V>
__device__ __forceinline__ void Opaque(V& v) {
  if constexpr (sizeof(V) % 4 == 0) {
    auto* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(V) / 4); ++j) asm("" : "+r"(w[j]));
  }
}

// A register kernel thread's row slot: tpr (a power of two) consecutive
// threads share row r; t is the thread's rank in it. Shifts, not divisions.
struct RowSlot {
  int t;
  int64_t r;
  bool active;
  __device__ __forceinline__ RowSlot(const AttnSoftmaxGeometry& g, int tpr) {
    const int shift = __ffs(tpr) - 1;
    t = threadIdx.x & (tpr - 1);
    r = static_cast<int64_t>(blockIdx.x) * (kBlock >> shift) + (threadIdx.x >> shift);
    active = r < g.rows();
  }
};

// ---------------------------------------------------------------- forward --

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kBlock, MinBlocks(VEC * ITEMS)) FwdRegister(AttnSoftmaxFwdArgs<T> a, int tpr) {
  __shared__ float smem[kBlock / 32];
  const AttnSoftmaxGeometry& g = a.g;
  const RowSlot rs(g, tpr);
  const int t = rs.t;
  const int64_t r = rs.r, K = g.k_len, off = r * K;
  const bool active = rs.active;
  const int nvec = static_cast<int>(K / VEC);
  float z[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * tpr + t;
    if (active && idx < nvec) LoadFloats<T, VEC>(a.x + off + static_cast<int64_t>(idx) * VEC, z[i]);
  }
  // Only now what the loads do not need (row position, rng), while they are in flight.
  const Origin o = ReadOrigin(g);
  const AttnRow row = LocateRow(g, active ? r : 0, o.b0, o.h0, o.q0);
  const float zscale = g.scale * kLog2e;  // work in log2 units: exp(z) = exp2(z * log2 e)
  const bool dropout = g.rate > 0.f;
  DropoutRng rng{};
  if (dropout) rng = MakeDropoutRng(g.rng, g.rate);
  RowMask<VEC, ITEMS> valid, keep;
  RowBits<VEC, ITEMS>(g, row, active, nvec, tpr, t, dropout, rng, valid, keep);
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      z[i][k] = (VecBits<VEC, ITEMS>(valid, i) >> k) & 1u ? z[i][k] * zscale : -INFINITY;
      m = fmaxf(m, z[i][k]);
    }
  }
  m = RowReduce<true>(m, tpr, smem);
  if (m == -INFINITY) m = 0.f;  // no valid column: all p are 0, never NaN
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      z[i][k] = Exp2(z[i][k] - m);
      s += z[i][k];
    }
  }
  s = RowReduce<false>(s, tpr, smem);
  const float inv = s > 0.f ? 1.f / s : 0.f;
  const float kept_inv = inv * rng.scale;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * tpr + t;
    if (active && idx < nvec) {
      if (dropout) {
        ApplyKeepBits<VEC>(VecBits<VEC, ITEMS>(keep, i), kept_inv, z[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[i][k] *= inv;
      }
      StoreFloats<T, VEC>(a.y + off + static_cast<int64_t>(idx) * VEC, z[i]);
    }
  }
  if (active && t == 0) {
    a.row_max[r] = m;
    a.row_inv[r] = inv;
  }
}

// Any k: one block per row (grid-stride); online max/sum, then the write.
template <typename T>
__global__ void __launch_bounds__(kBlock) FwdGeneric(AttnSoftmaxFwdArgs<T> a) {
  __shared__ float smem[kBlock / 32];
  const AttnSoftmaxGeometry& g = a.g;
  const int64_t K = g.k_len;
  const Origin o = ReadOrigin(g);
  const float zscale = g.scale * kLog2e;
  const bool dropout = g.rate > 0.f;
  DropoutRng rng{};
  if (dropout) rng = MakeDropoutRng(g.rng, g.rate);
  for (int64_t r = blockIdx.x; r < g.rows(); r += gridDim.x) {
    const AttnRow row = LocateRow(g, r, o.b0, o.h0, o.q0);
    const int64_t off = r * K;
    const uint8_t* mask = g.mask ? g.mask + row.b * K : nullptr;
    auto load = [&](int64_t c) {
      const bool valid = c < row.limit && (mask == nullptr || mask[c] != 0);
      return valid ? ToFloat(a.x[off + c]) * zscale : -INFINITY;
    };
    float m = -INFINITY, s = 0.f;
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
      const float z = load(c);
      if (z == -INFINITY) continue;
      if (z > m) {
        s = s * Exp2(m - z) + 1.f;
        m = z;
      } else {
        s += Exp2(z - m);
      }
    }
    float row_m = RowReduce<true>(m, kBlock, smem);
    if (row_m == -INFINITY) row_m = 0.f;
    s = m == -INFINITY ? 0.f : s * Exp2(m - row_m);
    s = RowReduce<false>(s, kBlock, smem);
    const float inv = s > 0.f ? 1.f / s : 0.f;
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
      float p = Exp2(load(c) - row_m) * inv;
      if (dropout) p = rng.Keep(row.global_row * K + c) ? p * rng.scale : 0.f;
      a.y[off + c] = FromFloat<T>(p);
    }
    if (threadIdx.x == 0) {
      a.row_max[r] = row_m;
      a.row_inv[r] = inv;
    }
  }
}

// --------------------------------------------------------------- backward --

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kBlock, MinBlocks(VEC * ITEMS)) BwdRegister(AttnSoftmaxBwdArgs<T> a, int tpr) {
  __shared__ float smem[kBlock / 32];
  const AttnSoftmaxGeometry& g = a.g;
  const RowSlot rs(g, tpr);
  const int t = rs.t;
  const int64_t r = rs.r, K = g.k_len, off = r * K;
  const bool active = rs.active;
  const int nvec = static_cast<int>(K / VEC);
  // x and dy are loaded in their storage type (half the registers of fp32 for
  // 16-bit types) and dy is dropped out again in the second pass: at 32
  // elements per thread, fp32 copies did not fit the 80 registers next to the
  // Philox work without spills.
  using V = cuda::Vec<T, VEC>;
  V x[ITEMS], dy[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * tpr + t;
    if (active && idx < nvec) {
      const int64_t col = static_cast<int64_t>(idx) * VEC;
      x[i] = *reinterpret_cast<const V*>(a.x + off + col);
      dy[i] = *reinterpret_cast<const V*>(a.dy + off + col);
    }
  }
  // Only now what the loads do not need (row statistics, position, rng), while they are in flight.
  const float m = active ? a.row_max[r] : 0.f;
  const float inv = active ? a.row_inv[r] : 0.f;
  const Origin o = ReadOrigin(g);
  const AttnRow row = LocateRow(g, active ? r : 0, o.b0, o.h0, o.q0);
  const float zscale = g.scale * kLog2e;
  const bool dropout = g.rate > 0.f;
  DropoutRng rng{};
  if (dropout) rng = MakeDropoutRng(g.rng, g.rate);
  RowMask<VEC, ITEMS> valid, keep;
  RowBits<VEC, ITEMS>(g, row, active, nvec, tpr, t, dropout, rng, valid, keep);
  auto grad = [&](int i, float (&gr)[VEC]) {  // dropout(dy) of vector i
#pragma unroll
    for (int k = 0; k < VEC; ++k) gr[k] = ToFloat(dy[i].v[k]);
    if (dropout) ApplyKeepBits<VEC>(VecBits<VEC, ITEMS>(keep, i), rng.scale, gr);
  };
  float p[ITEMS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * tpr + t;
    if (active && idx < nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        p[i][k] = (VecBits<VEC, ITEMS>(valid, i) >> k) & 1u ? Exp2(ToFloat(x[i].v[k]) * zscale - m) * inv : 0.f;
      }
      float gr[VEC];
      grad(i, gr);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += gr[k] * p[i][k];
    }
  }
  sum = RowReduce<false>(sum, tpr, smem);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = i * tpr + t;
    if (active && idx < nvec) {
      Opaque(dy[i]);  // convert and drop out again rather than keep fp32 copies
      float d[VEC];
      grad(i, d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) d[k] = g.scale * p[i][k] * (d[k] - sum);
      StoreFloats<T, VEC>(a.dx + off + static_cast<int64_t>(idx) * VEC, d);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock) BwdGeneric(AttnSoftmaxBwdArgs<T> a) {
  __shared__ float smem[kBlock / 32];
  const AttnSoftmaxGeometry& g = a.g;
  const int64_t K = g.k_len;
  const Origin o = ReadOrigin(g);
  const float zscale = g.scale * kLog2e;
  const bool dropout = g.rate > 0.f;
  DropoutRng rng{};
  if (dropout) rng = MakeDropoutRng(g.rng, g.rate);
  for (int64_t r = blockIdx.x; r < g.rows(); r += gridDim.x) {
    const AttnRow row = LocateRow(g, r, o.b0, o.h0, o.q0);
    const int64_t off = r * K;
    const uint8_t* mask = g.mask ? g.mask + row.b * K : nullptr;
    const float m = a.row_max[r], inv = a.row_inv[r];
    auto prob = [&](int64_t c) {
      const bool valid = c < row.limit && (mask == nullptr || mask[c] != 0);
      return valid ? Exp2(ToFloat(a.x[off + c]) * zscale - m) * inv : 0.f;
    };
    auto grad = [&](int64_t c) {
      const float d = ToFloat(a.dy[off + c]);
      if (!dropout) return d;
      return rng.Keep(row.global_row * K + c) ? d * rng.scale : 0.f;
    };
    float sum = 0.f;
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) sum += grad(c) * prob(c);
    sum = RowReduce<false>(sum, kBlock, smem);
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
      a.dx[off + c] = FromFloat<T>(g.scale * prob(c) * (grad(c) - sum));
    }
  }
}

// ------------------------------------------------------------ launch plan --

struct Plan {
  int vec = 1;    // elements per access
  int items = 0;  // vectors per thread; 0 selects the generic kernel
  int tpr = kBlock;
};

template <typename T>
Plan MakePlan(const AttnSoftmaxGeometry& g, int max_items, const void* const* ptrs, int n_ptrs) {
  Plan plan;
  constexpr int kVec = cuda::kVec16<T>;
  bool vectorisable = g.k_len % kVec == 0 && cuda::Aligned(g.mask, kVec);
  for (int i = 0; i < n_ptrs; ++i) vectorisable = vectorisable && cuda::Aligned(ptrs[i], 16);
  const int vec = vectorisable ? kVec : 1;
  const int64_t nvec = g.k_len / vec;
  // Aim for 4 vectors per thread (loads in flight), 1..256 threads per row.
  const int tpr = static_cast<int>(std::min<int64_t>(kBlock, NextPow2(CeilDiv(nvec, 4))));
  const int items = NextPow2(CeilDiv(nvec, tpr));
  if (items > max_items) return plan;  // generic
  plan.vec = vec;
  plan.items = items;
  plan.tpr = tpr;
  return plan;
}

int64_t GenericGrid(int64_t rows) { return std::min<int64_t>(rows, 65535LL * 16); }

}  // namespace

template <typename T>
cudaError_t AttnSoftmaxFwdCuda(const AttnSoftmaxFwdArgs<T>& a, cudaStream_t stream) {
  const int64_t rows = a.g.rows();
  if (rows == 0 || a.g.k_len == 0) return cudaSuccess;
  const void* ptrs[] = {a.x, a.y};
  const Plan plan = MakePlan<T>(a.g, kMaxItemsFwd, ptrs, 2);
  if (plan.items == 0) {
    FwdGeneric<T><<<GenericGrid(rows), kBlock, 0, stream>>>(a);
  } else {
    const int64_t grid = CeilDiv(rows, kBlock / plan.tpr);
    cuda::DispatchVecItems<T, kMaxItemsFwd>(plan.vec, plan.items, [&](auto vec, auto items) {
      FwdRegister<T, decltype(vec)::value, decltype(items)::value>
          <<<grid, kBlock, 0, stream>>>(a, plan.tpr);
    });
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t AttnSoftmaxBwdCuda(const AttnSoftmaxBwdArgs<T>& a, cudaStream_t stream) {
  const int64_t rows = a.g.rows();
  if (rows == 0 || a.g.k_len == 0) return cudaSuccess;
  const void* ptrs[] = {a.dy, a.x, a.dx};
  const Plan plan = MakePlan<T>(a.g, kMaxItemsBwd, ptrs, 3);
  if (plan.items == 0) {
    BwdGeneric<T><<<GenericGrid(rows), kBlock, 0, stream>>>(a);
  } else {
    const int64_t grid = CeilDiv(rows, kBlock / plan.tpr);
    cuda::DispatchVecItems<T, kMaxItemsBwd>(plan.vec, plan.items, [&](auto vec, auto items) {
      BwdRegister<T, decltype(vec)::value, decltype(items)::value>
          <<<grid, kBlock, 0, stream>>>(a, plan.tpr);
    });
  }
  return cudaGetLastError();
}

#define LSJAX_INSTANTIATE(T)                                                              \
  template cudaError_t AttnSoftmaxFwdCuda<T>(const AttnSoftmaxFwdArgs<T>&, cudaStream_t); \
  template cudaError_t AttnSoftmaxBwdCuda<T>(const AttnSoftmaxBwdArgs<T>&, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
