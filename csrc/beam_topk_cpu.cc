// Plain C++ twin of the beam top-k kernel: full log-softmax, then a partial
// sort in the order of csrc/beam_topk.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "csrc/beam_topk.h"
#include "csrc/cpu_dtypes.h"

namespace lsjax {

using cpu::ToFloat;

namespace {

// Float -> uint32 preserving the IEEE total order (as the CUDA kernel ranks).
uint32_t Ord(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b ^ (b >> 31 ? 0xffffffffu : 0x80000000u);
}

struct Cand {
  float v;
  float x;  // the logit, -inf for a dead beam
  int32_t i;
};

}  // namespace

template <typename T>
void BeamTopkCpu(const BeamTopkArgs<T>& a) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<Cand> cand(a.beam * a.vocab);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t i = 0; i < a.beam; ++i) {
      const T* x = a.logits + (b * a.beam + i) * a.vocab;
      float mx = kNegInf;
      for (int64_t t = 0; t < a.vocab; ++t) mx = std::max(mx, ToFloat(x[t]));
      double sum = 0.0;  // double: a float running sum drifts ~1e-5 over 32k terms
      for (int64_t t = 0; t < a.vocab; ++t) sum += std::exp(ToFloat(x[t]) - mx);
      const float log_sum = static_cast<float>(std::log(sum)), score = a.scores[b * a.beam + i];
      const bool dead = !(score > kNegInf);
      for (int64_t t = 0; t < a.vocab; ++t) {
        const float xt = ToFloat(x[t]);
        cand[i * a.vocab + t] = {((xt - mx) - log_sum) + score, dead ? kNegInf : xt,
                                 static_cast<int32_t>(i * a.vocab + t)};
      }
    }
    // (v, beam ascending, logit descending, index ascending).
    std::partial_sort(cand.begin(), cand.begin() + a.k, cand.end(), [&](const Cand& l, const Cand& r) {
      if (Ord(l.v) != Ord(r.v)) return Ord(l.v) > Ord(r.v);
      if (l.i / a.vocab != r.i / a.vocab) return l.i < r.i;
      return Ord(l.x) != Ord(r.x) ? Ord(l.x) > Ord(r.x) : l.i < r.i;
    });
    for (int64_t j = 0; j < a.k; ++j) {
      a.values[b * a.k + j] = cand[j].v;
      a.indices[b * a.k + j] = cand[j].i;
    }
  }
}

template void BeamTopkCpu<float>(const BeamTopkArgs<float>&);
template void BeamTopkCpu<cpu::Half>(const BeamTopkArgs<cpu::Half>&);
template void BeamTopkCpu<cpu::BFloat16>(const BeamTopkArgs<cpu::BFloat16>&);

}  // namespace lsjax
