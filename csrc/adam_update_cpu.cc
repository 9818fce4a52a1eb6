// Plain C++ twin of the fused Adam update (csrc/adam_update.h).
#include "csrc/adam_update.h"

#include "csrc/cpu_dtypes.h"

namespace lsjax {

using cpu::FromFloat;
using cpu::ToFloat;

template <typename P, typename G>
void AdamUpdateCpu(const AdamUpdateArgs<P, G>& a) {
  float s[kNumAdamScalars];
  for (int i = 0; i < kNumAdamScalars; ++i) s[i] = a.scalars[i];
  for (int64_t i = 0; i < a.n; ++i) {
    float m = a.m[i], v = a.v[i];
    const float p = AdamStep(s, ToFloat(a.param[i]), ToFloat(a.grad[i]), m, v);
    a.new_param[i] = FromFloat<P>(p);
    a.new_m[i] = m;
    a.new_v[i] = v;
  }
}

#define LSJAX_INSTANTIATE(P, G) template void AdamUpdateCpu<P, G>(const AdamUpdateArgs<P, G>&);
LSJAX_ADAM_DTYPE_PAIRS(LSJAX_INSTANTIATE, float, cpu::Half, cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
