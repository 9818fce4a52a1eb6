// Plain C++ twin of the beam top-k kernel: full log-softmax, then a partial sort.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "csrc/beam_topk.h"
#include "csrc/cpu_dtypes.h"

namespace lsjax {

using cpu::ToFloat;

template <typename T>
void BeamTopkCpu(const BeamTopkArgs<T>& a) {
  std::vector<std::pair<float, int32_t>> cand(a.beam * a.vocab);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t i = 0; i < a.beam; ++i) {
      const T* x = a.logits + (b * a.beam + i) * a.vocab;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < a.vocab; ++t) mx = std::max(mx, ToFloat(x[t]));
      double sum = 0.0;  // double: a float running sum drifts ~1e-5 over 32k terms
      for (int64_t t = 0; t < a.vocab; ++t) sum += std::exp(ToFloat(x[t]) - mx);
      const float log_sum = static_cast<float>(std::log(sum)), score = a.scores[b * a.beam + i];
      for (int64_t t = 0; t < a.vocab; ++t) {
        cand[i * a.vocab + t] = {((ToFloat(x[t]) - mx) - log_sum) + score,
                                 static_cast<int32_t>(i * a.vocab + t)};
      }
    }
    std::partial_sort(cand.begin(), cand.begin() + a.k, cand.end(), [](const auto& l, const auto& r) {
      return l.first > r.first || (l.first == r.first && l.second < r.second);
    });
    for (int64_t j = 0; j < a.k; ++j) {
      a.values[b * a.k + j] = cand[j].first;
      a.indices[b * a.k + j] = cand[j].second;
    }
  }
}

template void BeamTopkCpu<float>(const BeamTopkArgs<float>&);
template void BeamTopkCpu<cpu::Half>(const BeamTopkArgs<cpu::Half>&);
template void BeamTopkCpu<cpu::BFloat16>(const BeamTopkArgs<cpu::BFloat16>&);

}  // namespace lsjax
