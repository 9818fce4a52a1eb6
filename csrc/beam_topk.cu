// CUDA beam-search top-k in two launches, stream-ordered (see csrc/beam_topk.h).
//
// Order. Candidates rank by (v, beam ascending, logit descending, token
// ascending), compared as integers: Ord maps floats onto uint32 in IEEE total
// order. Within one beam v is a non-decreasing function of the logit, so a
// beam's ranking is its logits' (x descending, token ascending) order, which
// pass 1 can use before the log-sum-exp is known. A dead beam ranks its logits
// as -inf (all its v are -inf or NaN alike), i.e. in token order.
//
// Pass 1 (ChunkKernel), one warp per (row, beam, chunk of 1024 tokens): the
//   chunk's partial (max, sum exp(x - max)) and its k best tokens as a sorted
//   list of 64-bit token keys (Ord(x) << 32 | ~token). Every top-k token of a
//   row is in its chunk's list.
// Pass 2 (MergeKernel), one block per row: per-beam log-sum-exp from the
//   partials; full keys of the lists' heads; if a list's head ranks r-th among
//   the heads, only its first k - r entries can be in the top k (the r better
//   heads and its own earlier entries all precede them). The top k of those
//   <= k (k + 1) / 2 candidates is the answer.
// Both passes select with GroupTopK: no atomics decide a result, ties cannot
// happen (keys are distinct), so results are deterministic.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "csrc/beam_topk.h"
#include "csrc/cuda_common.cuh"

namespace lsjax {

using cuda::CeilDiv;

namespace {

using cuda::ToFloat;
using cuda::Vec;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kItems = static_cast<int>(kBeamTopkChunk / 32);  // logits per lane in pass 1
constexpr int kMergeThreads = 256;

// Float -> uint32 preserving the IEEE total order (-NaN < -inf < ... < +inf < +NaN).
__device__ __forceinline__ uint32_t Ord(float x) {
  const uint32_t b = __float_as_uint(x);
  return b ^ (b >> 31 ? 0xffffffffu : 0x80000000u);
}
__device__ __forceinline__ float FromOrd(uint32_t o) {
  return __uint_as_float(o ^ (o >> 31 ? 0x80000000u : 0xffffffffu));
}
// ~i in a key's low word: smaller ids rank higher, and the word is >= 2^31, so 0 is never a key.
__device__ __forceinline__ uint32_t Flip(int64_t i) { return 0xffffffffu - static_cast<uint32_t>(i); }
__device__ __forceinline__ int64_t Unflip(uint64_t key) { return 0xffffffffu - static_cast<uint32_t>(key); }

// Row key of pass 2 (hi == 0: no token).
struct alignas(16) RowKey {
  uint64_t hi;  // Ord(v) << 32 | ~beam
  uint64_t lo;  // the token key
};

__device__ __forceinline__ bool Greater(uint64_t a, uint64_t b) { return a > b; }
__device__ __forceinline__ bool Greater(const RowKey& a, const RowKey& b) {
  return a.hi > b.hi || (a.hi == b.hi && a.lo > b.lo);
}
__device__ __forceinline__ bool Real(uint64_t a) { return a != 0; }
__device__ __forceinline__ bool Real(const RowKey& a) { return a.hi != 0; }

template <int THREADS>
__device__ __forceinline__ void GroupSync() {
  if constexpr (THREADS == 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

template <typename Key>
struct TopKScratch {
  Key* heads;  // [THREADS]
  Key* cand;   // [k * E]
  Key* tau;
  int* count;
};

// Exact top k of the distinct keys held by a group of THREADS threads (a warp
// or the block): E keys per thread, key(e) the thread's e-th (Key{} = none;
// threads >= `active` hold none). Calls out(r, key) for every rank r < k,
// with Key{} past the last key. Every thread of the group must call it;
// successive calls sharing scratch need a barrier between them.
//
// tau = the k-th best of the per-thread maxima (heads). A key >= tau lives in a
// thread whose head is >= tau, and only k threads have one, so at most k * E
// keys survive the compaction (all of them when fewer than k threads hold
// keys); the top k are among them and their ranks there are their ranks.
template <int THREADS, int E, typename Key, typename KeyFn, typename Out>
__device__ void GroupTopK(const TopKScratch<Key>& s, KeyFn key, int active, int k, Out out) {
  const int tid = threadIdx.x % THREADS;
  Key head{};
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (Greater(key(e), head)) head = key(e);
  }
  if (tid == 0) {
    *s.tau = Key{};
    *s.count = 0;
  }
  if (tid < active) s.heads[tid] = head;
  GroupSync<THREADS>();
  if (tid < active && Real(head)) {
    int rank = 0;
#pragma unroll 8
    for (int u = 0; u < active; ++u) rank += Greater(s.heads[u], head);
    if (rank == k - 1) *s.tau = head;
  }
  GroupSync<THREADS>();
  const Key tau = *s.tau;
  if (Real(head) && !Greater(tau, head)) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const Key c = key(e);
      if (Real(c) && !Greater(tau, c)) s.cand[atomicAdd(s.count, 1)] = c;
    }
  }
  GroupSync<THREADS>();
  const int n = *s.count;
  for (int i = tid; i < n; i += THREADS) {
    const Key c = s.cand[i];
    int rank = 0;
#pragma unroll 8
    for (int u = 0; u < n; ++u) rank += Greater(s.cand[u], c);
    if (rank < k) out(rank, c);
  }
  for (int r = n + tid; r < k; r += THREADS) out(r, Key{});
}

// Running max m and sum of exp(x - m) (s == 0: nothing, whatever m).
struct MaxSum {
  float m, s;
};
__device__ __forceinline__ MaxSum Merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  const auto scaled = [m](MaxSum p) { return p.s == 0.f ? 0.f : p.s * expf(p.m - m); };
  return {m, scaled(a) + scaled(b)};
}
__device__ __forceinline__ MaxSum WarpMerge(MaxSum a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a = Merge(a, {__shfl_xor_sync(kFull, a.m, o), __shfl_xor_sync(kFull, a.s, o)});
  }
  return a;
}

// Pass-1 scratch bytes per warp: heads [32], cand [k * kItems], tau, count.
constexpr int64_t ChunkScratchBytes(int64_t k) { return (32 + k * kItems + 1) * 8 + 8; }

// Pass 1: warp `list` = (row * beam + i) * chunks + c reads tokens
// [c * 1024, c * 1024 + len) of beam i, VEC per access, lane-interleaved.
template <typename T, int VEC>
__global__ void __launch_bounds__(128) ChunkKernel(BeamTopkArgs<T> a, BeamTopkWorkspace w) {
  cuda::WaitForPrerequisites();
  cuda::TriggerDependents();
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, k = static_cast<int>(a.k);
  const int64_t list = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp;
  if (list >= a.batch * a.beam * w.chunks) return;  // whole warps only
  const int64_t rb = list / w.chunks, t0 = list % w.chunks * kBeamTopkChunk;
  const int len = static_cast<int>(a.vocab - t0 < kBeamTopkChunk ? a.vocab - t0 : kBeamTopkChunk);
  const T* x = a.logits + rb * a.vocab + t0;

  float v[kItems];
#pragma unroll
  for (int i = 0; i < kItems / VEC; ++i) {
    const int p = (i * 32 + lane) * VEC;  // len % VEC == 0: a vector is all in or all out
    if (p < len) {
      const Vec<T, VEC> pk = *reinterpret_cast<const Vec<T, VEC>*>(x + p);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i * VEC + j] = ToFloat(pk.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i * VEC + j] = -INFINITY;
    }
  }

  // Partial log-sum-exp (NaN logits make s NaN; with no finite logit s == 0).
  float m = -INFINITY;
#pragma unroll
  for (int e = 0; e < kItems; ++e) m = fmaxf(m, v[e]);
  const float shift = m == -INFINITY ? 0.f : m;
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kItems; ++e) s += __expf(v[e] - shift);
  const MaxSum part = WarpMerge({m, s});
  if (lane == 0) reinterpret_cast<float2*>(w.partials)[list] = make_float2(part.m, part.s);

  const bool dead = !(a.scores[rb] > -INFINITY);
  uint64_t* scratch = reinterpret_cast<uint64_t*>(smem + warp * ChunkScratchBytes(k));
  const TopKScratch<uint64_t> sc{scratch, scratch + 32, scratch + 32 + k * kItems,
                                 reinterpret_cast<int*>(scratch + 33 + k * kItems)};
  // Token keys Ord(x) << 32 | ~token (0 = no token); their high words computed once (GroupTopK reads
  // every key twice).
  uint32_t o[kItems];
#pragma unroll
  for (int e = 0; e < kItems; ++e) o[e] = Ord(dead ? -INFINITY : v[e]);
  const auto key = [&](int e) {
    const int p = (e / VEC * 32 + lane) * VEC + e % VEC;
    return p < len ? static_cast<uint64_t>(o[e]) << 32 | Flip(t0 + p) : uint64_t{0};
  };
  uint64_t* out = w.lists + list * k;
  GroupTopK<32, kItems>(sc, key, 32, k, [&](int r, uint64_t c) { out[r] = c; });
}

struct BeamStat {
  float m, log_sum, score;
};

// Pass 2: block b merges row b's beam * chunks lists. Keys are blocked: thread
// tid holds entries tid * E .. tid * E + E - 1 (of the heads, then of the slots).
template <int E>
__global__ void __launch_bounds__(kMergeThreads)
    MergeKernel(const float* scores, float* values, int32_t* indices, int64_t beam, int64_t vocab, int k,
                BeamTopkWorkspace w) {
  cuda::WaitForPrerequisites();
  cuda::TriggerDependents();
  extern __shared__ __align__(16) unsigned char smem[];
  RowKey* heads = reinterpret_cast<RowKey*>(smem);          // [kMergeThreads]
  RowKey* cand = heads + kMergeThreads;                     // [k * E]
  RowKey* tau = cand + k * E;                               // [1]
  BeamStat* stats = reinterpret_cast<BeamStat*>(tau + 1);  // [beam]
  int* lead_list = reinterpret_cast<int*>(stats + beam);    // [k]: the list whose head ranks r
  int* count = lead_list + k;
  const TopKScratch<RowKey> sc{heads, cand, tau, count};

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b = blockIdx.x, chunks = w.chunks, lists = beam * chunks;
  const uint64_t* row_lists = w.lists + b * lists * k;
  const float2* part = reinterpret_cast<const float2*>(w.partials) + b * lists;

  uint64_t first[E];  // loads in flight while the stats are reduced
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int64_t h = tid * E + i;
    first[i] = h < lists ? row_lists[h * k] : 0;
  }
  for (int64_t i = warp; i < beam; i += kMergeThreads / 32) {
    MaxSum acc{-INFINITY, 0.f};
    for (int64_t c = lane; c < chunks; c += 32) {
      const float2 p = part[i * chunks + c];
      acc = Merge(acc, {p.x, p.y});
    }
    acc = WarpMerge(acc);
    if (lane == 0) stats[i] = {acc.m, logf(acc.s), scores[b * beam + i]};
  }
  __syncthreads();

  // Same expression as the reference: (x - max) - log(sum) + score.
  const auto row_key = [&](uint64_t token_key, int64_t i) {
    if (token_key == 0) return RowKey{};
    const BeamStat st = stats[i];
    const float v = ((FromOrd(static_cast<uint32_t>(token_key >> 32)) - st.m) - st.log_sum) + st.score;
    return RowKey{static_cast<uint64_t>(Ord(v)) << 32 | Flip(i), token_key};
  };
  RowKey keys[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int64_t h = tid * E + i;
    keys[i] = h < lists ? row_key(first[i], h / chunks) : RowKey{};
  }
  const auto held = [&](int e) { return keys[e]; };
  GroupTopK<kMergeThreads, E>(sc, held, static_cast<int>((lists + E - 1) / E), k, [&](int r, const RowKey& c) {
    if (Real(c)) lead_list[r] = static_cast<int>(Unflip(c.hi) * chunks + Unflip(c.lo) / kBeamTopkChunk);
  });
  __syncthreads();

  // Slots: r-th list's first k - r entries, r < lead; slot base(r) = r k - r (r - 1) / 2.
  const int lead = static_cast<int>(lists < k ? lists : k);
  const int slots = lead * k - lead * (lead - 1) / 2;
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int s = tid * E + i;
    keys[i] = RowKey{};
    if (s < slots) {
      int r = 0;
      while (s >= (r + 1) * k - (r + 1) * r / 2) ++r;
      const int h = lead_list[r];
      keys[i] = row_key(row_lists[static_cast<int64_t>(h) * k + s - (r * k - r * (r - 1) / 2)], h / chunks);
    }
  }
  GroupTopK<kMergeThreads, E>(sc, held, (slots + E - 1) / E, k, [&](int r, const RowKey& c) {
    values[b * k + r] = FromOrd(static_cast<uint32_t>(c.hi >> 32));
    indices[b * k + r] = static_cast<int32_t>(Unflip(c.hi) * vocab + Unflip(c.lo));
  });
}

template <int E>
void LaunchMerge(const float* scores, float* values, int32_t* indices, int64_t batch, int64_t beam, int64_t vocab,
                 int k, const BeamTopkWorkspace& w, cudaStream_t stream) {
  const size_t smem = (kMergeThreads + k * E + 1) * sizeof(RowKey) + beam * sizeof(BeamStat) + (k + 1) * sizeof(int);
  cuda::LaunchDependent(MergeKernel<E>, static_cast<unsigned>(batch), kMergeThreads, smem, stream, scores, values,
                        indices, beam, vocab, k, w);
}

}  // namespace

template <typename T>
cudaError_t BeamTopkCuda(const BeamTopkArgs<T>& a, const BeamTopkWorkspace& w, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  const int k = static_cast<int>(a.k);
  const int64_t lists = a.beam * w.chunks;

  // Pass 1: 4 warps per block, fewer for large k (scratch grows with k).
  const int warps = std::clamp(64 / k, 1, 4);
  const bool vec = a.vocab % cuda::kVec16<T> == 0 && cuda::Aligned(a.logits, 16);
  const auto chunk_kernel = vec ? ChunkKernel<T, cuda::kVec16<T>> : ChunkKernel<T, 1>;
  const auto blocks = static_cast<unsigned>(CeilDiv(a.batch * lists, warps));
  cuda::LaunchDependent(chunk_kernel, blocks, warps * 32, warps * ChunkScratchBytes(k), stream, a, w);

  // Pass 2: E keys per thread, enough for the heads and the slots, and about
  // 32 threads' worth of heads (GroupTopK ranks `active` heads per thread).
  const int64_t lead = std::min<int64_t>(k, lists), slots = lead * k - lead * (lead - 1) / 2;
  const int64_t need = std::max(CeilDiv(lists, 32), CeilDiv(slots, kMergeThreads));
  const int items = std::min(cuda::NextPow2(need), 16);
  const auto launch = [&](auto e) {
    LaunchMerge<decltype(e)::value>(a.scores, a.values, a.indices, a.batch, a.beam, a.vocab, k, w, stream);
  };
  if (items == 1) {
    launch(cuda::Int<1>{});
  } else if (items == 2) {
    launch(cuda::Int<2>{});
  } else if (items == 4) {
    launch(cuda::Int<4>{});
  } else if (items == 8) {
    launch(cuda::Int<8>{});
  } else {
    launch(cuda::Int<16>{});
  }
  return cudaGetLastError();
}

template cudaError_t BeamTopkCuda<float>(const BeamTopkArgs<float>&, const BeamTopkWorkspace&, cudaStream_t);
template cudaError_t BeamTopkCuda<__half>(const BeamTopkArgs<__half>&, const BeamTopkWorkspace&, cudaStream_t);
template cudaError_t BeamTopkCuda<__nv_bfloat16>(const BeamTopkArgs<__nv_bfloat16>&, const BeamTopkWorkspace&,
                                                 cudaStream_t);

}  // namespace lsjax
