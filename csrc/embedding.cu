// CUDA embedding (forward and backward).
//
// Forward: RowPositions counts each token's position (a warp per row, ballots
// over its ids), then EmbFwd: a 2-D block (column vectors x tokens); each
// thread owns fixed 16-byte column vectors and walks tokens grid-stride, so
// the sinusoid frequencies exp(i * c) are computed once per thread.
// Table/position rows are gathered with 16-byte loads, math is float32 in
// registers, one 16-byte streaming store (evicted first: y is not read again,
// the table's rows are, by every token with the same id).
// With sinusoidal positions and hidden/2 a multiple of the vector width a
// thread owns column vector c of the sin half and the same vector of the cos
// half ("paired"): one SinCos (one range reduction, csrc/fast_math.h) feeds
// two outputs.
// Dropout draws one Philox call per 8 consecutive elements (8-aligned element
// index), falling back to one call per element when misaligned
// (DropoutKeepBits, csrc/philox.h). Each token's gathers are issued first; the
// keep bits and the sinusoid (neither needs the gathered data) are computed
// while they are in flight, and only then are the rows combined.
//
// Sort (the backward's, requested by the forward under autodiff): input
// pairs (key, token), then CUB's radix sort over the key's bits. It runs on a
// second stream while the forward kernel runs (cuda::Concurrently): the sort
// is a chain of small latency-bound kernels, the forward bandwidth-bound.
//
// Backward: deterministic segment sum, no float atomics. The tokens are
// sorted by key (stably), so each table row's tokens form one contiguous
// segment in ascending token order. EmbBwdChunks splits the sorted tokens into
// chunks of `chunk` (<= kEmbeddingBwdMaxChunk), and those into slices of
// `slice` tokens that blocks take in order from a queue: a block walks the
// runs of equal keys starting in its slice, each to its end in the chunk,
// kBwdStages dy rows in flight per thread, and sums each in float32; a
// segment inside one chunk is written to grad there, and so is a short
// segment cut by one chunk boundary (ending less than chunk / 4 tokens past
// it), by the block where it starts. A longer segment cut by chunk
// boundaries leaves one float32 partial per chunk it touches, and the last of
// its chunks to finish (an integer counter per cut segment) adds them in
// chunk order and writes the row. Every token is
// read once however the tokens spread over rows (one frequent token's long
// segment is split across chunks, not summed by one thread), and every grad
// element is written once: the rows without tokens by EmbBwdZeroRows, on a
// second stream while EmbBwdChunks runs, after MarkRows has set a bit per row
// with tokens. The gradient needs no memset.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include <cub/device/device_radix_sort.cuh>

#include "csrc/cuda_common.cuh"
#include "csrc/embedding.h"
#include "csrc/fast_math.h"
#include "csrc/philox.h"

namespace lsjax {
namespace {

using cuda::CeilDiv;
using cuda::LoadFloats;
using cuda::NextPow2;
using cuda::StoreFloats;
using cuda::StoreFloatsStreaming;

constexpr int kBlock = 256;

using cuda::Int;
template <bool B>
using Bool = std::bool_constant<B>;

__device__ __forceinline__ int64_t ClampRow(int64_t v, int64_t rows) {
  return v < 0 ? 0 : (v >= rows ? rows - 1 : v);
}

// ---------------------------------------------------------------- forward --

// Each token's position (EmbeddingFwdArgs::positions): a warp per row of seq, the row's ids read 8 x 32 at a
// time (eight loads in flight per lane) and counted by ballots. A pad gets the position the next non-pad
// token would have (unused).
__global__ void __launch_bounds__(kBlock) RowPositions(const int32_t* ids, const int32_t* offset, int32_t* positions,
                                                       int64_t rows, int64_t seq, int32_t padding_id) {
  constexpr int kLoads = 8;
  const int lane = threadIdx.x & 31;
  const uint32_t before_lane = (1u << lane) - 1;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int32_t* row = ids + r * seq;
    int32_t* out = positions + r * seq;
    int32_t count = *offset;
    for (int64_t j0 = 0; j0 < seq; j0 += kLoads * 32) {
      bool nonpad[kLoads];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t j = j0 + 32 * u + lane;
        nonpad[u] = j < seq && row[j] != padding_id;
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t j = j0 + 32 * u + lane;
        const uint32_t bits = __ballot_sync(~0u, nonpad[u]);
        if (j < seq) out[j] = count + __popc(bits & before_lane);
        count += __popc(bits);
      }
    }
  }
}

// LEARNED: positions from pos_table. PAIRED (sinusoidal only, hidden even,
// half % VEC == 0): column vector cv covers [cv*VEC, +VEC) and the same
// columns + half.
template <typename T, int VEC, bool LEARNED, bool PAIRED, bool DROPOUT>
__global__ void __launch_bounds__(kBlock, 4) EmbFwd(EmbeddingFwdArgs<T> a, float freq_exp) {
  const int64_t h = a.hidden;
  const int64_t half = h / 2;
  const int64_t ncv = PAIRED ? half / VEC : h / VEC;
  DropoutRng rng{};
  if constexpr (DROPOUT) rng = MakeDropoutRng(a.rng, a.rate);
  const int64_t token_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t cv = threadIdx.x; cv < ncv; cv += blockDim.x) {
    const int64_t c = cv * VEC;
    float freq[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = c + k;
      const int64_t i = (PAIRED || j < half) ? j : j - half;
      freq[k] = LEARNED ? 0.f : expf(static_cast<float>(i) * freq_exp);
    }
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; n < a.tokens; n += token_stride) {
      T* out = a.y + n * h + c;
      // Both per-token loads at once: the gathers then wait for one latency.
      const int32_t id = a.ids[n];
      const int32_t pos = a.positions[n];
      float v[VEC], w[VEC];
      if (id == a.padding_id) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = 0.f;
        StoreFloatsStreaming<T, VEC>(out, v);
        if constexpr (PAIRED) StoreFloatsStreaming<T, VEC>(out + half, v);
        continue;
      }
      const T* row = a.table + ClampRow(id, a.vocab) * h + c;
      float pv[VEC], pw[VEC];  // positional values of v's and w's columns
      LoadFloats<T, VEC>(row, v);
      if constexpr (PAIRED) LoadFloats<T, VEC>(row + half, w);
      if constexpr (LEARNED) LoadFloats<T, VEC>(a.pos_table + ClampRow(pos, a.max_positions) * h + c, pv);
      uint32_t keep_v = 0, keep_w = 0;
      if constexpr (DROPOUT) {
        const uint64_t e = static_cast<uint64_t>(n) * h + c;
        keep_v = DropoutKeepBits<VEC>(rng, e);
        if constexpr (PAIRED) keep_w = DropoutKeepBits<VEC>(rng, e + half);
      }
      if constexpr (!LEARNED) {
        const float p = static_cast<float>(pos);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float sin_pf, cos_pf;
          SinCos(p * freq[k], &sin_pf, &cos_pf);
          if constexpr (PAIRED) {
            pv[k] = sin_pf;
            pw[k] = cos_pf;
          } else {
            const int64_t j = c + k;
            pv[k] = j < half ? sin_pf : (j < 2 * half ? cos_pf : 0.f);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v[k] = v[k] * a.scale + pv[k];
        if constexpr (PAIRED) w[k] = w[k] * a.scale + pw[k];
      }
      if constexpr (DROPOUT) {
        ApplyKeepBits<VEC>(keep_v, rng.scale, v);
        if constexpr (PAIRED) ApplyKeepBits<VEC>(keep_w, rng.scale, w);
      }
      StoreFloatsStreaming<T, VEC>(out, v);
      if constexpr (PAIRED) StoreFloatsStreaming<T, VEC>(out + half, w);
    }
  }
}

// ------------------------------------------------------------------- sort --

// The sort's input pairs: key (vocab for a pad, else the clamped id), token.
__global__ void __launch_bounds__(kBlock) SortPairsIn(EmbeddingSortArgs s, uint32_t* keys, int32_t* tokens) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < s.tokens; n += stride) {
    const int32_t id = s.ids[n];
    keys[n] = static_cast<uint32_t>(id == s.padding_id ? s.vocab : ClampRow(id, s.vocab));
    tokens[n] = static_cast<int32_t>(n);
  }
}

// Bits of the largest key (vocab): the radix sort's passes.
int KeyBits(int64_t vocab) {
  int bits = 1;
  while ((int64_t{1} << bits) <= vocab) ++bits;
  return bits;
}

size_t Align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

size_t RadixSortBytes(int64_t tokens, int bits) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(tokens), 0, bits);
  return bytes;
}

// Workspace (from its first 256-byte boundary): input keys, input tokens, CUB's temporary storage.
cudaError_t SortCuda(const EmbeddingSortArgs& s, void* workspace, cudaStream_t stream) {
  if (s.tokens == 0) return cudaSuccess;
  const int bits = KeyBits(s.vocab);
  char* ws = reinterpret_cast<char*>(Align256(reinterpret_cast<uintptr_t>(workspace)));
  const size_t column = Align256(4 * static_cast<size_t>(s.tokens));
  auto* keys = reinterpret_cast<uint32_t*>(ws);
  auto* tokens = reinterpret_cast<int32_t*>(ws + column);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(CeilDiv(s.tokens, kBlock), 4 * cuda::NumSMs()));
  SortPairsIn<<<grid, kBlock, 0, stream>>>(s, keys, tokens);
  size_t bytes = RadixSortBytes(s.tokens, bits);
  return cub::DeviceRadixSort::SortPairs(ws + 2 * column, bytes, keys, reinterpret_cast<uint32_t*>(s.sorted_keys),
                                         tokens, s.order, static_cast<int>(s.tokens), 0, bits, stream);
}

// --------------------------------------------------------------- backward --

constexpr int32_t kNoKey = INT32_MIN;  // a key past either end of the sorted keys

constexpr int kBwdStages = 4;  // dy rows of loads in flight per thread

// Chunks [first, last] that hold sorted keys equal to `key`, which chunk q
// holds: chunk p > q continues it when its first key is `key`, chunk p < q
// when its last one is (the keys are sorted, so those chunks are contiguous).
// One warp, 32 chunk boundaries probed per ballot.
template <typename T>
__device__ __forceinline__ int2 SegmentChunks(const EmbeddingBwdArgs<T>& a, int64_t q, int32_t key, int64_t chunks) {
  const int lane = threadIdx.x & 31;
  int64_t first = q, last = q;
  for (int n = 32; n == 32; last += n) {
    const int64_t p = last + 1 + lane;
    n = __popc(__ballot_sync(~0u, p < chunks && a.keys[p * a.chunk] == key));
  }
  for (int n = 32; n == 32; first -= n) {
    const int64_t p = first - 1 - lane;
    n = __popc(__ballot_sync(~0u, p >= 0 && a.keys[(p + 1) * a.chunk - 1] == key));
  }
  return make_int2(static_cast<int>(first), static_cast<int>(last));
}

// The first p in [from, to) that starts a run: p == lo (lo = -1: none), or
// its key differs from position p - 1's (s_key[p + 1] vs s_key[p]); `to`
// when none. Each warp computes it alone, 32 positions per ballot (no
// barrier).
__device__ __forceinline__ int FirstRunStart(const int32_t* s_key, int lo, int from, int to) {
  const int lane = threadIdx.x & 31;
  for (int base = from; base < to; base += 32) {
    const int p = base + lane;
    const unsigned starts = __ballot_sync(~0u, p < to && (p == lo || s_key[p + 1] != s_key[p]));
    if (starts != 0) return base + __ffs(starts) - 1;
  }
  return to;
}

// Blocks take slices of `slice` sorted tokens in order from a queue (a
// counter after the segment counters), chunk / slice slices per chunk. The
// block of slice j of chunk q walks the runs of equal keys that start in the
// slice (among the chunk's valid tokens, keys in [0, rows)), each to its end
// in the chunk, one column vector per thread, and sums them in float32
// registers. A run that is its row's whole segment is written to grad, and so
// is a short segment cut by the chunk's end (its tokens past the end read
// too; the next chunk skips them). A run of a longer segment cut by chunk
// boundaries is a float32 partial row: 2q when
// chunk q's start cuts it, else 2q + 1; the block then counts itself done
// with that segment (a counter per segment, at its first chunk), and the
// segment's last chunk to be done adds its partials in chunk order
// (2 first + 1, then 2p for the later chunks p) and writes its row. So
// segments are cut only at chunk boundaries, while a block's work is a slice:
// a long segment costs a partial per chunk, and short ones spread over many
// blocks. The chunk's keys and token order are read into shared memory; dy
// rows arrive through the thread's cp.async slots, kBwdStages tokens ahead,
// and each token's keep bits are drawn while its row is in flight.
template <typename T, int VEC, bool DROPOUT>
__global__ void __launch_bounds__(kBlock, 4) EmbBwdChunks(EmbeddingBwdArgs<T> a) {
  using V = cuda::Vec<T, VEC>;
  constexpr int kMaxReach = kEmbeddingBwdMaxChunk / 4;
  // keys of sorted positions begin - 1 .. begin + chunk + reach, tokens of begin .. begin + chunk + reach - 1
  __shared__ int32_t s_key[kEmbeddingBwdMaxChunk + kMaxReach + 2];
  __shared__ int32_t s_token[kEmbeddingBwdMaxChunk + kMaxReach];  // dy row, dropout elements
  __shared__ int32_t s_before;                          // key of sorted position begin - chunk - 1
  __shared__ int2 s_cut[2];                             // chunks of the segments cut at the start, at the end
  __shared__ bool s_adds[2];                            // whether this block adds that segment's partials
  __shared__ uint32_t s_slice[2];                       // slices taken from the queue, used alternately
  extern __shared__ __align__(16) unsigned char ring_bytes[];  // [kBwdStages][blockDim.x] V: the dy slots
  V* ring = reinterpret_cast<V*>(ring_bytes);
  const int64_t h = a.hidden;
  const int64_t ncv = h / VEC;
  const int64_t chunks = CeilDiv(a.tokens, a.chunk);
  const int64_t slices = CeilDiv(a.tokens, a.slice);
  const int64_t split = a.chunk / a.slice;
  uint32_t* queue = a.counters + chunks;
  const int reach = static_cast<int>(a.chunk / 4);  // < chunk: a short segment crosses one boundary
  DropoutRng rng{};
  if constexpr (DROPOUT) rng = MakeDropoutRng(a.rng, a.rate);
  if (threadIdx.x == 0) s_slice[0] = atomicAdd(queue, 1u);
  __syncthreads();
  for (int it = 0;; ++it) {
    const int64_t taken = s_slice[it & 1];
    if (taken >= slices) break;
    const int64_t q = taken / split;
    const int first = static_cast<int>((taken % split) * a.slice);  // the slice's first position in chunk q
    const int64_t begin = q * a.chunk;
    const int len = static_cast<int>(a.tokens - begin < a.chunk ? a.tokens - begin : a.chunk);
    const int window = static_cast<int>(a.tokens - begin < len + reach ? a.tokens - begin : len + reach);
    __syncthreads();  // the previous slice's reads of the shared arrays are done
    if (threadIdx.x == 0) s_slice[(it + 1) & 1] = atomicAdd(queue, 1u);
    for (int t = threadIdx.x; t < len + reach + 2; t += blockDim.x) {
      const int64_t i = begin - 1 + t;
      s_key[t] = i >= 0 && i < a.tokens ? a.keys[i] : kNoKey;
    }
    for (int t = threadIdx.x; t < window; t += blockDim.x) s_token[t] = a.order[begin + t];
    if (threadIdx.x == 0) s_before = begin - a.chunk - 1 >= 0 ? a.keys[begin - a.chunk - 1] : kNoKey;
    __syncthreads();
    // The chunk's valid tokens [lo, hi): excluded keys sort before (< 0) or after (>= rows) them.
    int lo = 0, hi = len;
    while (lo < len && s_key[lo + 1] < 0) ++lo;
    while (hi > lo && s_key[hi] >= a.rows) --hi;
    if (lo == hi) continue;
    // A segment cut by the boundary before sorted position b is short when it starts at or after
    // b - chunk (keys[b - chunk - 1] differs) and ends before b + reach (keys[b + reach] differs): it
    // crosses that boundary only, and the chunk where it starts sums it whole, reading up to reach
    // tokens past its end. Both chunks decide from the same two keys. Longer segments leave partials.
    const bool cut_at_start = lo == 0 && s_key[0] == s_key[1];
    const bool cut_at_end = hi == len && s_key[len] == s_key[len + 1];
    const bool short_at_start = cut_at_start && s_before != s_key[1] && s_key[reach + 1] != s_key[1];
    const bool short_at_end = cut_at_end && s_key[0] != s_key[len] && s_key[len + reach + 1] != s_key[len];
    if (short_at_start) {  // the previous chunk sums it
      lo = FirstRunStart(s_key, -1, 1, hi);
      if (lo == hi) continue;
    }
    if (short_at_end) hi = FirstRunStart(s_key, -1, len, len + reach + 1);  // this chunk sums it, past its end
    // This slice's runs [run_lo, run_hi): those starting in [first, first + slice).
    const int last = first + static_cast<int>(a.slice) < len ? first + static_cast<int>(a.slice) : len;
    const int run_lo = FirstRunStart(s_key, lo, lo > first ? lo : first, hi);
    if (run_lo >= last || run_lo >= hi) continue;
    const int run_hi = FirstRunStart(s_key, lo, last, hi);
    const bool lead_partial = cut_at_start && !short_at_start && run_lo == 0;
    const bool tail_partial = cut_at_end && !short_at_end && run_hi == len;
    const bool one_cut = lead_partial && tail_partial && s_key[1] == s_key[len];  // one segment, cut at both ends
    if (threadIdx.x < 32) {  // warp 0: where the cut segments begin and end, read by the block after its runs
      if (lead_partial) s_cut[0] = SegmentChunks(a, q, s_key[1], chunks);
      if (tail_partial && !one_cut) s_cut[1] = SegmentChunks(a, q, s_key[len], chunks);
    }
    for (int64_t cv = threadIdx.x; cv < ncv; cv += blockDim.x) {
      const int64_t c = cv * VEC;
      auto stage = [&](int slot, int p) {  // one commit group per token, empty past the end
        if (p < run_hi) cuda::CopyVecAsync<T, VEC>(&ring[slot * blockDim.x + threadIdx.x], a.dy + s_token[p] * h + c);
        cuda::CopyAsyncCommit();
      };
#pragma unroll
      for (int u = 0; u < kBwdStages; ++u) stage(u, run_lo + u);
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
      int run_start = run_lo, slot = 0;
      for (int p = run_lo; p < run_hi; ++p) {
        uint32_t keep = 0;
        if constexpr (DROPOUT) keep = DropoutKeepBits<VEC>(rng, static_cast<uint64_t>(s_token[p]) * h + c);
        cuda::CopyAsyncWait<kBwdStages - 1>();  // token p's group, the oldest, has landed
        float v[VEC];
        LoadFloats<T, VEC>(ring[slot * blockDim.x + threadIdx.x].v, v);
        stage(slot, p + kBwdStages);
        slot = slot + 1 == kBwdStages ? 0 : slot + 1;
        if constexpr (DROPOUT) ApplyKeepBits<VEC>(keep, rng.scale, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += v[k];
        if (p + 1 < run_hi && s_key[p + 2] == s_key[p + 1]) continue;  // the run goes on
        if (run_start == run_lo && lead_partial) {
          StoreFloats<float, VEC>(a.partials + (2 * q) * h + c, acc);
        } else if (p + 1 == run_hi && tail_partial) {
          StoreFloats<float, VEC>(a.partials + (2 * q + 1) * h + c, acc);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] *= a.factor;
          StoreFloats<T, VEC>(a.grad + static_cast<int64_t>(s_key[p + 1]) * h + c, acc);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
        run_start = p + 1;
      }
    }
    if (!lead_partial && !tail_partial) continue;  // uniform over the block
    __threadfence();  // this thread's partials are visible device-wide before the block counts itself done
    __syncthreads();
    if (threadIdx.x < 2) {
      const bool mine = threadIdx.x == 0 ? lead_partial : tail_partial && !one_cut;
      const int2 cut = s_cut[threadIdx.x];
      s_adds[threadIdx.x] = mine && atomicAdd(a.counters + cut.x, 1u) == static_cast<uint32_t>(cut.y - cut.x);
    }
    __syncthreads();
    for (int i = 0; i < 2; ++i) {
      if (!s_adds[i]) continue;
      __threadfence();  // the other chunks' partials, counted before, are read after
      const int2 cut = s_cut[i];
      const int32_t key = i == 0 ? s_key[1] : s_key[len];
      for (int64_t c = threadIdx.x * VEC; c < h; c += static_cast<int64_t>(blockDim.x) * VEC) {
        // Four interleaved float32 sums (four rows of loads in flight), added pairwise at the end.
        float acc[4][VEC], v[4][VEC];
        cuda::LoadFloatsCg<VEC>(a.partials + (2 * cut.x + 1) * h + c, acc[0]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[1][k] = acc[2][k] = acc[3][k] = 0.f;
        int64_t p = cut.x + 1;
        for (; p + 3 <= cut.y; p += 4) {
#pragma unroll
          for (int j = 0; j < 4; ++j) cuda::LoadFloatsCg<VEC>(a.partials + (2 * (p + j)) * h + c, v[j]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[j][k] += v[j][k];
          }
        }
        for (; p <= cut.y; ++p) {
          cuda::LoadFloatsCg<VEC>(a.partials + (2 * p) * h + c, v[0]);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[0][k] += v[0][k];
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[0][k] = ((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k])) * a.factor;
        StoreFloats<T, VEC>(a.grad + static_cast<int64_t>(key) * h + c, acc[0]);
      }
    }
  }
}

// Sets bit k of row_bits for each grad row k that has tokens: a thread per
// sorted position, the first of each valid key's run. row_bits starts zeroed.
template <typename T>
__global__ void __launch_bounds__(kBlock) MarkRows(EmbeddingBwdArgs<T> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.tokens; i += stride) {
    const int32_t key = a.keys[i];
    if (key >= 0 && key < a.rows && (i == 0 || a.keys[i - 1] != key)) {
      atomicOr(a.row_bits + key / 32, 1u << (key % 32));
    }
  }
}

// Zeros to the grad rows without tokens (row_bits clear): a warp per 32 rows,
// one row at a time. Runs concurrently with EmbBwdChunks, which writes the
// other rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) EmbBwdZeroRows(EmbeddingBwdArgs<T> a) {
  const int64_t h = a.hidden;
  const int lane = threadIdx.x & 31;
  const int64_t words = CeilDiv(a.rows, 32);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  float zeros[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) zeros[k] = 0.f;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; w < words; w += warps) {
    const int64_t in_word = a.rows - w * 32;  // rows of word w: min(32, in_word)
    uint32_t empty = ~a.row_bits[w] & (in_word >= 32 ? ~0u : (1u << in_word) - 1);
    for (; empty != 0; empty &= empty - 1) {
      T* row = a.grad + (w * 32 + __ffs(empty) - 1) * h;
      for (int64_t c = lane * VEC; c < h; c += 32 * VEC) StoreFloats<T, VEC>(row + c, zeros);
    }
  }
}

// ------------------------------------------------------------ launch plan --

// Threads per block along columns (a power of two in [32, 256]) for ncv vectors.
int ColumnThreads(int64_t ncv) { return static_cast<int>(std::min<int64_t>(kBlock, std::max(32, NextPow2(ncv)))); }

// Grid over `items` (tokens or rows) with `per_block` per block-iteration:
// about four waves of resident blocks, the rest grid-stride.
int64_t Grid(int64_t items, int per_block) {
  const int64_t cap = static_cast<int64_t>(cuda::NumSMs()) * (2048 / kBlock) * 4;
  return std::max<int64_t>(1, std::min<int64_t>(CeilDiv(items, per_block), cap));
}

}  // namespace

template <typename T>
cudaError_t EmbeddingFwdCuda(const EmbeddingFwdArgs<T>& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.hidden == 0) return cudaSuccess;
  constexpr int kVec = cuda::kVec16<T>;
  const bool learned = a.pos_table != nullptr;
  const bool vectorisable = a.hidden % kVec == 0 && cuda::Aligned(a.table, 16) && cuda::Aligned(a.pos_table, 16) &&
                            cuda::Aligned(a.y, 16);
  const int vec = vectorisable ? kVec : 1;
  const int64_t half = a.hidden / 2;
  const bool paired = !learned && 2 * half == a.hidden && half % vec == 0;
  const float freq_exp =
      static_cast<float>(-std::log(10000.0) / static_cast<double>(std::max<int64_t>(half - 1, 1)));
  const int64_t ncv = paired ? half / vec : a.hidden / vec;
  const int tx = ColumnThreads(ncv);
  const dim3 block(tx, kBlock / tx);
  const int64_t grid = Grid(a.tokens, kBlock / tx);
  const bool dropout = a.rate > 0.f;
  const int64_t rows = a.tokens / a.seq;
  RowPositions<<<static_cast<unsigned>(Grid(rows, kBlock / 32)), kBlock, 0, stream>>>(
      a.ids, a.offset, a.positions, rows, a.seq, a.padding_id);
  auto launch = [&](auto v, auto l, auto p, auto d) {
    EmbFwd<T, decltype(v)::value, decltype(l)::value, decltype(p)::value, decltype(d)::value>
        <<<grid, block, 0, stream>>>(a, freq_exp);
  };
  auto by_dropout = [&](auto v, auto l, auto p) {
    if (dropout) {
      launch(v, l, p, Bool<true>{});
    } else {
      launch(v, l, p, Bool<false>{});
    }
  };
  auto by_mode = [&](auto v) {
    if (learned) {
      by_dropout(v, Bool<true>{}, Bool<false>{});
    } else if (paired) {
      by_dropout(v, Bool<false>{}, Bool<true>{});
    } else {
      by_dropout(v, Bool<false>{}, Bool<false>{});
    }
  };
  if (vec == 1) {
    by_mode(Int<1>{});
  } else {
    by_mode(Int<kVec>{});
  }
  return cudaGetLastError();
}

size_t EmbeddingSortWorkspaceBytes(int64_t tokens, int64_t vocab) {
  return 255 + 2 * Align256(4 * static_cast<size_t>(tokens)) + RadixSortBytes(tokens, KeyBits(vocab));
}

template <typename T>
cudaError_t EmbeddingFwdSortCuda(const EmbeddingFwdArgs<T>& a, const EmbeddingSortArgs& s, void* workspace,
                                 cudaStream_t stream) {
  return cuda::Concurrently(
      stream, [&](cudaStream_t side) { return SortCuda(s, workspace, side); },
      [&](cudaStream_t main) { return EmbeddingFwdCuda(a, main); });
}

template <typename T>
cudaError_t EmbeddingBwdCuda(const EmbeddingBwdArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0 || a.hidden == 0) return cudaSuccess;
  if (a.chunk < 1 || a.chunk > kEmbeddingBwdMaxChunk || a.slice < 1 || a.chunk % a.slice != 0) {
    return cudaErrorInvalidValue;
  }
  constexpr int kVec = cuda::kVec16<T>;
  const bool vectorisable = a.hidden % kVec == 0 && cuda::Aligned(a.dy, 16) && cuda::Aligned(a.grad, 16);
  const int vec = vectorisable ? kVec : 1;
  const int tx = ColumnThreads(a.hidden / vec);
  const int64_t chunks = CeilDiv(a.tokens, a.chunk);
  const int64_t words = CeilDiv(a.rows, 32);
  // counters, the slice queue and row_bits: one zeroed workspace (the FFI's counters result).
  if (cudaError_t err = cudaMemsetAsync(a.counters, 0, (chunks + 1 + words) * sizeof(uint32_t), stream);
      err != cudaSuccess) {
    return err;
  }
  const bool dropout = a.rate > 0.f;
  auto launch = [&](auto v, auto d) {
    constexpr int kV = decltype(v)::value;
    const auto walk = EmbBwdChunks<T, kV, decltype(d)::value>;
    const size_t ring = static_cast<size_t>(kBwdStages) * tx * sizeof(cuda::Vec<T, kV>);
    return cuda::Concurrently(
        stream,
        [&](cudaStream_t side) {
          if (a.tokens > 0) MarkRows<T><<<static_cast<unsigned>(Grid(a.tokens, kBlock)), kBlock, 0, side>>>(a);
          EmbBwdZeroRows<T, kV><<<static_cast<unsigned>(Grid(words, kBlock / 32)), kBlock, 0, side>>>(a);
          return cudaGetLastError();
        },
        [&](cudaStream_t main) {
          if (chunks == 0) return cudaSuccess;
          const int64_t slices = CeilDiv(a.tokens, a.slice);
          const int64_t grid = std::min<int64_t>(slices, cuda::ResidentBlocksPerSM(walk, tx, ring) * cuda::NumSMs());
          walk<<<static_cast<unsigned>(grid), tx, ring, main>>>(a);
          return cudaGetLastError();
        });
  };
  auto by_dropout = [&](auto v) { return dropout ? launch(v, Bool<true>{}) : launch(v, Bool<false>{}); };
  return vec == 1 ? by_dropout(Int<1>{}) : by_dropout(Int<kVec>{});
}

#define LSJAX_INSTANTIATE(T)                                                                  \
  template cudaError_t EmbeddingFwdCuda<T>(const EmbeddingFwdArgs<T>&, cudaStream_t);         \
  template cudaError_t EmbeddingFwdSortCuda<T>(const EmbeddingFwdArgs<T>&, const EmbeddingSortArgs&, void*, \
                                               cudaStream_t);                                 \
  template cudaError_t EmbeddingBwdCuda<T>(const EmbeddingBwdArgs<T>&, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
