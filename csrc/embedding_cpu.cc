// Plain C++ twin of the embedding kernels: the reference for the CUDA path
// and the custom-call path exercised in CI.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "csrc/cpu_dtypes.h"
#include "csrc/embedding.h"
#include "csrc/philox.h"

namespace lsjax {

using cpu::FromFloat;
using cpu::ToFloat;

namespace {

int64_t Clamp(int64_t v, int64_t rows) { return std::min<int64_t>(std::max<int64_t>(v, 0), rows - 1); }

}  // namespace

template <typename T>
void EmbeddingFwdCpu(const EmbeddingFwdArgs<T>& a) {
  const int64_t h = a.hidden, half = h / 2;
  const float c = static_cast<float>(-std::log(10000.0) / static_cast<double>(std::max<int64_t>(half - 1, 1)));
  std::vector<float> freq(half);
  for (int64_t i = 0; i < half; ++i) freq[i] = std::exp(static_cast<float>(i) * c);
  const bool dropout = a.rate > 0.f;
  const DropoutRng rng = dropout ? MakeDropoutRng(a.rng, a.rate) : DropoutRng{};
  int32_t count = 0;  // offset + the non-pad tokens before n in its row (a pad: the next one's position)
  for (int64_t n = 0; n < a.tokens; ++n) {
    if (n % a.seq == 0) count = *a.offset;
    a.positions[n] = count;
    count += a.ids[n] != a.padding_id;
  }
  for (int64_t n = 0; n < a.tokens; ++n) {
    T* out = a.y + n * h;
    const int32_t id = a.ids[n];
    if (id == a.padding_id) {
      for (int64_t j = 0; j < h; ++j) out[j] = FromFloat<T>(0.f);
      continue;
    }
    const int32_t pos = a.positions[n];
    const T* row = a.table + Clamp(id, a.vocab) * h;
    const T* pos_row = a.pos_table ? a.pos_table + Clamp(pos, a.max_positions) * h : nullptr;
    const float p = static_cast<float>(pos);
    const uint64_t e0 = static_cast<uint64_t>(n) * h;
    for (int64_t j = 0; j < h; ++j) {
      float pe;
      if (pos_row) {
        pe = ToFloat(pos_row[j]);
      } else if (j < half) {
        pe = std::sin(p * freq[j]);
      } else if (j < 2 * half) {
        pe = std::cos(p * freq[j - half]);
      } else {
        pe = 0.f;
      }
      float v = ToFloat(row[j]) * a.scale + pe;
      if (dropout) v = rng.Keep(e0 + j) ? v * rng.scale : 0.f;
      out[j] = FromFloat<T>(v);
    }
  }
}

template <typename T>
void EmbeddingBwdCpu(const EmbeddingBwdArgs<T>& a) {
  const int64_t h = a.hidden;
  const bool dropout = a.rate > 0.f;
  const DropoutRng rng = dropout ? MakeDropoutRng(a.rng, a.rate) : DropoutRng{};
  // Same order as the CUDA kernel: each row sums its segment in ascending
  // sorted position, in float32, then scales and rounds once.
  std::vector<float> acc(static_cast<size_t>(a.rows * h), 0.f);
  for (int64_t i = 0; i < a.tokens; ++i) {
    const int64_t r = a.keys[i];
    if (r < 0 || r >= a.rows) continue;
    const int64_t n = a.order[i];
    const T* g = a.dy + n * h;
    float* dst = acc.data() + r * h;
    const uint64_t e0 = static_cast<uint64_t>(n) * h;
    for (int64_t j = 0; j < h; ++j) {
      float v = ToFloat(g[j]);
      if (dropout) v = rng.Keep(e0 + j) ? v * rng.scale : 0.f;
      dst[j] += v;
    }
  }
  for (int64_t k = 0; k < a.rows * h; ++k) a.grad[k] = FromFloat<T>(acc[k] * a.factor);
}

void EmbeddingSortCpu(const EmbeddingSortArgs& s) {
  std::vector<int32_t> key(static_cast<size_t>(s.tokens));
  for (int64_t n = 0; n < s.tokens; ++n) {
    key[n] = static_cast<int32_t>(s.ids[n] == s.padding_id ? s.vocab : Clamp(s.ids[n], s.vocab));
  }
  std::iota(s.order, s.order + s.tokens, 0);
  std::stable_sort(s.order, s.order + s.tokens, [&](int32_t i, int32_t j) { return key[i] < key[j]; });
  for (int64_t i = 0; i < s.tokens; ++i) s.sorted_keys[i] = key[s.order[i]];
}

#define LSJAX_INSTANTIATE(T)                                         \
  template void EmbeddingFwdCpu<T>(const EmbeddingFwdArgs<T>&); \
  template void EmbeddingBwdCpu<T>(const EmbeddingBwdArgs<T>&);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(cpu::Half)
LSJAX_INSTANTIATE(cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
