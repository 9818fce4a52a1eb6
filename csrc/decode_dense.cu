// CUDA decode dense layer (csrc/decode_dense.h), one launch: grid = ceil(N / BN) blocks of 16 warps, block b
// owning output columns [b * BN, b * BN + BN) (BN = 16, or 8 when that leaves too few blocks) of all rows,
// padded to MP = 16 * MT. K is taken in chunks of up to KC columns (KC * MP * 2 bytes of staged rows):
//   - the block's kernel tile W[k0:k0 + KC, n0:n0 + BN] is copied into shared memory with cp.async, two
//     chunks in flight; the first copies are issued before anything else, so they overlap the
//     layer-norm statistics and the staging of the rows;
//   - the rows' chunk is staged in shared memory as T, normalised (per-row float32 mean and rstd,
//     computed first over the whole row) when there is a layer norm, zero-padded to MP rows and to
//     a multiple of 16 columns;
//   - warp w multiplies the chunk's 16-column steps w, w + 16, ... with mma.sync m16n8k16 (float
//     accumulators kept across chunks).
// Then the warps' partial tiles meet in shared memory and are summed in warp order (deterministic), and
// bias, activation and residual are applied before the only write of y.
#include <algorithm>
#include <type_traits>

#include "csrc/cuda_common.cuh"
#include "csrc/decode_dense.h"

namespace lsjax {
namespace {

using cuda::FromFloat;
using cuda::Int;
using cuda::LoadFloats;
using cuda::ToFloat;
using cuda::SmemAddr;
using cuda::Vec;
using cuda::WarpSum;

constexpr int kWarps = 16;
constexpr int kThreads = 32 * kWarps;
constexpr int kStagedElems = 32768;  // staged row elements per chunk: MP * KC <= this (64 KiB of T)
constexpr int kMinBlocksBn16 = 64;   // fewer blocks of 16 columns than this: use blocks of 8

// A fragment (16 x 16, row-major in shared memory): lane l gives row l % 16, columns (l / 16) * 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
// B fragments of 1 or 2 n8 tiles from [k][8] rows of shared memory, transposed.
__device__ __forceinline__ void LdMatrixTrans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void LdMatrixTrans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(p)));
}

// c += a (16 x 16) * b (16 x 8), float accumulators.
template <typename T>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The K range of one chunk: [k0, k0 + len), staged as len16 (len rounded up to 16) columns.
struct Chunk {
  int64_t k0;
  int len;
  int len16;
};

// The block's kernel tile of a chunk into ws, laid out [BN / 8][kc][8] (rows of 16 bytes: conflict-free
// ldmatrix), zero beyond the chunk and beyond N. vec: N % 8 == 0 and kernel 16-byte aligned.
template <typename T, int BN>
__device__ __forceinline__ void LoadW(const DecodeDenseArgs<T>& a, T* ws, int kc, Chunk ch, int64_t n0, bool vec) {
  if (vec) {
    constexpr int H = BN / 8;
    for (int p = threadIdx.x; p < ch.len16 * H; p += kThreads) {
      const int kk = p / H, h = p % H;
      const int64_t n = n0 + h * 8;
      const bool valid = kk < ch.len && n < a.n;
      cuda::CopyAsync<16>(ws + (h * kc + kk) * 8, valid ? a.kernel + (ch.k0 + kk) * a.n + n : a.kernel, valid);
    }
  } else {
    for (int p = threadIdx.x; p < ch.len16 * BN; p += kThreads) {
      const int kk = p / BN, j = p % BN;
      const int64_t n = n0 + j;
      ws[((j / 8) * kc + kk) * 8 + j % 8] =
          kk < ch.len && n < a.n ? a.kernel[(ch.k0 + kk) * a.n + n] : FromFloat<T>(0.f);
    }
  }
  cuda::CopyAsyncCommit();
}

// Layer-norm statistics of every row: warp w takes rows w, w + kWarps, ... (RPW of them), lanes V columns
// at a time; float32, mean first, then the centred variance.
template <typename T, int V, int RPW>
__device__ __forceinline__ void RowStats(const DecodeDenseArgs<T>& a, float* mean, float* rstd) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const auto each_value = [&](auto&& fn) {  // fn(r, value) over this lane's columns of its rows
#pragma unroll 2
    for (int64_t k = lane * V; k < a.k; k += 32 * V) {
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const int64_t m = warp + r * kWarps;
        if (m >= a.rows) continue;
        float f[V];
        LoadFloats<T, V>(a.x + m * a.k + k, f);
#pragma unroll
        for (int i = 0; i < V; ++i) fn(r, f[i]);
      }
    }
  };
  float s[RPW] = {}, q[RPW] = {};
  each_value([&](int r, float v) { s[r] += v; });
#pragma unroll
  for (int r = 0; r < RPW; ++r) s[r] = WarpSum(s[r]) / static_cast<float>(a.k);
  each_value([&](int r, float v) { q[r] += (v - s[r]) * (v - s[r]); });
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int m = warp + r * kWarps;
    const float var = WarpSum(q[r]) / static_cast<float>(a.k);
    if (lane == 0 && m < a.rows) {
      mean[m] = s[r];
      rstd[m] = rsqrtf(var + a.eps);
    }
  }
}

// The rows' chunk into as ([MP][sa] T), V columns per access (V = 8: K % 8 == 0, x 16-byte aligned).
// Thread t takes column pieces j = t % jt, t % jt + jt, ... (jt: the largest power of two <= the pieces
// per row) and, for each, rows t / jt + i * (kThreads / jt): the layer-norm vectors are read once per
// piece, and kBatch rows' loads are in flight before their stores.
template <typename T, int V, int MP>
__device__ __forceinline__ void StageRows(const DecodeDenseArgs<T>& a, T* as, int sa, Chunk ch, const float* mean,
                                          const float* rstd) {
  constexpr int kBatch = 4;
  const int per_row = ch.len16 / V;
  int jt = kThreads;
  while (jt > per_row) jt /= 2;
  const int rstep = kThreads / jt;
  const bool ln = a.ln_scale != nullptr;
  for (int j = threadIdx.x % jt; j < per_row; j += jt) {
    const int kk = j * V;
    const bool col = kk < ch.len;
    float scale[V], shift[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      scale[i] = ln && col ? a.ln_scale[ch.k0 + kk + i] : 0.f;
      shift[i] = ln && col ? a.ln_bias[ch.k0 + kk + i] : 0.f;
    }
    for (int m0 = threadIdx.x / jt; m0 < MP; m0 += rstep * kBatch) {
      Vec<T, V> v[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int m = m0 + b * rstep;
        if (col && m < a.rows) {
          v[b] = *reinterpret_cast<const Vec<T, V>*>(a.x + m * a.k + ch.k0 + kk);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) v[b].v[i] = FromFloat<T>(0.f);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int m = m0 + b * rstep;
        if (m >= MP) continue;
        if (ln && col && m < a.rows) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            v[b].v[i] = FromFloat<T>((ToFloat(v[b].v[i]) - mean[m]) * rstd[m] * scale[i] + shift[i]);
          }
        }
        *reinterpret_cast<Vec<T, V>*>(as + m * sa + kk) = v[b];
      }
    }
  }
}

// Dynamic shared memory: the staged rows [MP][kc + 8] T (later the warps' partial tiles
// [kWarps][MP][BN] float), then, from byte w_offset on, min(chunks, 2) kernel tiles [BN / 8][kc][8] T.
template <typename T, int BN, int MT>
size_t SmemWOffset(int kc) {
  constexpr int MP = 16 * MT;
  return std::max(sizeof(T) * MP * (kc + 8), sizeof(float) * kWarps * MP * BN);
}

template <typename T, int BN, int MT, typename Act>
__global__ void __launch_bounds__(kThreads, 1)
    DecodeDenseKernel(DecodeDenseArgs<T> a, int kc, int64_t chunks, size_t w_offset, bool x_vec, bool w_vec) {
  constexpr int MP = 16 * MT, NT = BN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float mean[MP], rstd[MP];
  const int sa = kc + 8;  // row stride of the staged rows: an odd multiple of 16 bytes, conflict-free ldmatrix
  T* as = reinterpret_cast<T*>(smem);
  T* wbuf = reinterpret_cast<T*>(smem + w_offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  auto chunk = [&](int64_t c) {
    const int64_t k0 = c * kc;
    const int len = static_cast<int>(a.k - k0 < kc ? a.k - k0 : kc);
    return Chunk{k0, len, (len + 15) / 16 * 16};
  };

  LoadW<T, BN>(a, wbuf, kc, chunk(0), n0, w_vec);
  // This thread's outputs o = threadIdx.x + i * kThreads are (row o / BN, column n0 + o % BN); their bias
  // and residual are read now, off the critical path.
  constexpr int kOuts = (MP * BN + kThreads - 1) / kThreads;
  float bias[kOuts], res[kOuts];
#pragma unroll
  for (int i = 0; i < kOuts; ++i) {
    const int o = threadIdx.x + i * kThreads, m = o / BN;
    const int64_t n = n0 + o % BN;
    const bool valid = m < a.rows && n < a.n;
    bias[i] = valid ? a.bias[n] : 0.f;
    res[i] = valid && a.residual != nullptr ? ToFloat(a.residual[m * a.n + n]) : 0.f;
  }
  if (chunks > 1) LoadW<T, BN>(a, wbuf + kc * BN, kc, chunk(1), n0, w_vec);
  if (a.ln_scale != nullptr) {
    if (x_vec) {
      RowStats<T, 8, MP / kWarps>(a, mean, rstd);
    } else {
      RowStats<T, 1, MP / kWarps>(a, mean, rstd);
    }
    __syncthreads();
  }

  float acc[MT][NT][4] = {};
  for (int64_t c = 0; c < chunks; ++c) {
    const Chunk ch = chunk(c);
    if (x_vec) {
      StageRows<T, 8, MP>(a, as, sa, ch, mean, rstd);
    } else {
      StageRows<T, 1, MP>(a, as, sa, ch, mean, rstd);
    }
    if (c + 1 < chunks) {
      cuda::CopyAsyncWait<1>();
    } else {
      cuda::CopyAsyncWait<0>();
    }
    __syncthreads();
    const T* ws = wbuf + (c % 2) * kc * BN;
    for (int s = warp; s < ch.len16 / 16; s += kWarps) {
      uint32_t b[2 * NT];
      LdMatrixTrans(b, ws + ((NT == 2 ? lane / 16 : 0) * kc + s * 16 + lane % 16) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t af[4];
        LdMatrixX4(af, as + (mt * 16 + lane % 16) * sa + s * 16 + lane / 16 * 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Mma<T>(acc[mt][nt], af, b[2 * nt], b[2 * nt + 1]);
      }
    }
    __syncthreads();  // the staged rows and this kernel tile are free again
    if (c + 2 < chunks) LoadW<T, BN>(a, wbuf + (c % 2) * kc * BN, kc, chunk(c + 2), n0, w_vec);
  }

  float* part = reinterpret_cast<float*>(smem);  // [kWarps][MP][BN], over the staged rows
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = mt * 16 + lane / 4, col = nt * 8 + lane % 4 * 2;
      *reinterpret_cast<float2*>(part + (warp * MP + r) * BN + col) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(part + (warp * MP + r + 8) * BN + col) =
          make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kOuts; ++i) {
    const int o = threadIdx.x + i * kThreads, m = o / BN, j = o % BN;
    const int64_t n = n0 + j;
    if (m >= a.rows || n >= a.n) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += part[(w * MP + m) * BN + j];
    v = Act::F(v + bias[i]);
    if (a.residual != nullptr) v = res[i] + v;
    a.y[m * a.n + n] = FromFloat<T>(v);
  }
}

}  // namespace

template <typename T>
cudaError_t DecodeDenseCuda(const DecodeDenseArgs<T>& a, cudaStream_t stream) {
  if (a.rows < 1 || a.rows > kDecodeDenseMaxRows || a.k < 1 || a.n < 1) return cudaErrorInvalidValue;
  const int mt = static_cast<int>((a.rows + 15) / 16);
  const int bn = cuda::CeilDiv(a.n, 16) >= kMinBlocksBn16 ? 16 : 8;
  // Chunks of a multiple of 16 columns: the staged row stride (kc + 8) stays an odd multiple of 16 bytes.
  const int kc = static_cast<int>(std::min<int64_t>((a.k + 15) / 16 * 16, kStagedElems / (16 * mt) / 16 * 16));
  const int64_t chunks = cuda::CeilDiv(a.k, kc);
  const bool x_vec = a.k % 8 == 0 && cuda::Aligned(a.x, 16);
  const bool w_vec = a.n % 8 == 0 && cuda::Aligned(a.kernel, 16);
  const auto blocks = static_cast<unsigned>(cuda::CeilDiv(a.n, bn));
  cudaError_t err = cudaSuccess;
  auto launch = [&](auto act, auto bn_c, auto mt_c) {
    constexpr int BN = decltype(bn_c)::value, MT = decltype(mt_c)::value;
    auto kernel = DecodeDenseKernel<T, BN, MT, decltype(act)>;
    const size_t w_offset = SmemWOffset<T, BN, MT>(kc);
    const size_t smem = w_offset + sizeof(T) * std::min<int64_t>(chunks, 2) * kc * BN;
    if (smem > 48 * 1024) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return;
    }
    kernel<<<blocks, kThreads, smem, stream>>>(a, kc, chunks, w_offset, x_vec, w_vec);
    err = cudaGetLastError();
  };
  auto by_mt = [&](auto act, auto bn_c) {
    switch (mt) {
      case 1: launch(act, bn_c, Int<1>{}); break;
      case 2: launch(act, bn_c, Int<2>{}); break;
      case 3: launch(act, bn_c, Int<3>{}); break;
      default: launch(act, bn_c, Int<4>{}); break;
    }
  };
  const bool known = DispatchActivation<T>(a.act, [&](auto act) {
    if (bn == 16) {
      by_mt(act, Int<16>{});
    } else {
      by_mt(act, Int<8>{});
    }
  });
  return known ? err : cudaErrorInvalidValue;
}

template cudaError_t DecodeDenseCuda<__half>(const DecodeDenseArgs<__half>&, cudaStream_t);
template cudaError_t DecodeDenseCuda<__nv_bfloat16>(const DecodeDenseArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace lsjax
