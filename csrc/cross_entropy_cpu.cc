// Plain C++ twin of the cross-entropy kernels: the reference for the CUDA path
// and the custom-call path exercised in CI.
#include <algorithm>
#include <cmath>
#include <limits>

#include "csrc/cpu_dtypes.h"
#include "csrc/cross_entropy.h"

namespace lsjax {

using cpu::FromFloat;
using cpu::ToFloat;

namespace {

enum class RowKind { kIgnored, kBadLabel, kValid };

RowKind Classify(int32_t label, int32_t ignore_id, int64_t vocab) {
  if (label == ignore_id) return RowKind::kIgnored;
  if (label < 0 || label >= vocab) return RowKind::kBadLabel;
  return RowKind::kValid;
}

}  // namespace

template <typename T>
void CrossEntropyFwdCpu(const CrossEntropyFwdArgs<T>& a) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = 0; r < a.rows; ++r) {
    const int32_t label = a.labels[r];
    const RowKind kind = Classify(label, a.ignore_id, a.vocab);
    if (kind != RowKind::kValid) {
      a.loss[r] = a.lse[r] = kind == RowKind::kIgnored ? 0.f : nan;
      continue;
    }
    const T* x = a.logits + r * a.vocab;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < a.vocab; ++c) mx = std::max(mx, ToFloat(x[c]));
    float sum_exp = 0.f, sum_x = 0.f;
    for (int64_t c = 0; c < a.vocab; ++c) {
      const float v = ToFloat(x[c]);
      sum_exp += std::exp(v - mx);
      sum_x += v;
    }
    const float lse = mx + std::log(sum_exp);
    const float nll = lse - ToFloat(x[label]);
    const float smooth = lse - sum_x / static_cast<float>(a.vocab);
    a.loss[r] = (1.f - a.eps) * nll + a.eps * smooth;
    a.lse[r] = lse;
  }
}

template <typename T>
void CrossEntropyBwdCpu(const CrossEntropyBwdArgs<T>& a) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float off_target = a.eps / static_cast<float>(a.vocab);
  for (int64_t r = 0; r < a.rows; ++r) {
    const int32_t label = a.labels[r];
    const RowKind kind = Classify(label, a.ignore_id, a.vocab);
    const T* x = a.logits + r * a.vocab;
    T* dx = a.dlogits + r * a.vocab;
    if (kind != RowKind::kValid) {
      const T fill = FromFloat<T>(kind == RowKind::kIgnored ? 0.f : nan);
      std::fill(dx, dx + a.vocab, fill);
      continue;
    }
    const float lse = a.lse[r], g = a.dloss[r];
    for (int64_t c = 0; c < a.vocab; ++c) {
      const float q = off_target + (c == label ? 1.f - a.eps : 0.f);
      dx[c] = FromFloat<T>(g * (std::exp(ToFloat(x[c]) - lse) - q));
    }
  }
}

#define LSJAX_INSTANTIATE(T)                                             \
  template void CrossEntropyFwdCpu<T>(const CrossEntropyFwdArgs<T>&); \
  template void CrossEntropyBwdCpu<T>(const CrossEntropyBwdArgs<T>&);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(cpu::Half)
LSJAX_INSTANTIATE(cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
