// Plain C++ twin of the decode dense kernel (csrc/decode_dense.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "csrc/cpu_dtypes.h"
#include "csrc/decode_dense.h"

namespace lsjax {

using cpu::FromFloat;
using cpu::ToFloat;

template <typename T>
void DecodeDenseCpu(const DecodeDenseArgs<T>& a) {
  std::vector<float> row(a.k), acc(a.n);
  DispatchActivation<T>(a.act, [&](auto act) {
    using Act = decltype(act);
    for (int64_t m = 0; m < a.rows; ++m) {
      const T* x = a.x + m * a.k;
      for (int64_t i = 0; i < a.k; ++i) row[i] = ToFloat(x[i]);
      if (a.ln_scale != nullptr) {
        float mean = 0.f, var = 0.f;
        for (int64_t i = 0; i < a.k; ++i) mean += row[i];
        mean /= static_cast<float>(a.k);
        for (int64_t i = 0; i < a.k; ++i) var += (row[i] - mean) * (row[i] - mean);
        const float rstd = 1.f / std::sqrt(var / static_cast<float>(a.k) + a.eps);
        for (int64_t i = 0; i < a.k; ++i) {
          row[i] = ToFloat(FromFloat<T>((row[i] - mean) * rstd * a.ln_scale[i] + a.ln_bias[i]));
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < a.k; ++i) {
        const T* w = a.kernel + i * a.n;
        for (int64_t j = 0; j < a.n; ++j) acc[j] += row[i] * ToFloat(w[j]);
      }
      T* y = a.y + m * a.n;
      for (int64_t j = 0; j < a.n; ++j) {
        float v = Act::F(acc[j] + a.bias[j]);
        if (a.residual != nullptr) v = ToFloat(a.residual[m * a.n + j]) + v;
        y[j] = FromFloat<T>(v);
      }
    }
  });
}

template void DecodeDenseCpu<float>(const DecodeDenseArgs<float>&);
template void DecodeDenseCpu<cpu::Half>(const DecodeDenseArgs<cpu::Half>&);
template void DecodeDenseCpu<cpu::BFloat16>(const DecodeDenseArgs<cpu::BFloat16>&);

}  // namespace lsjax
