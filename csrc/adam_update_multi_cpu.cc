// Plain C++ twin of the multi-tensor Adam update (csrc/adam_update_multi.h).
#include "csrc/adam_update_multi.h"

#include "csrc/cpu_dtypes.h"

namespace lsjax {

template <typename P, typename G>
void AdamUpdateMultiCpu(const AdamUpdateArgs<P, G>* tensors, const int32_t* decay, int64_t count,
                        const int32_t* apply) {
  if (apply != nullptr && *apply == 0) return;
  for (int64_t t = 0; t < count; ++t) {
    AdamUpdateArgs<P, G> a = tensors[t];
    float s[kNumAdamScalars];
    for (int i = 0; i < kNumAdamScalars; ++i) s[i] = a.scalars[i];
    if (!decay[t]) s[kAdamWeightDecay] = 0.f;
    a.scalars = s;
    AdamUpdateCpu(a);
  }
}

#define LSJAX_INSTANTIATE(P, G) \
  template void AdamUpdateMultiCpu<P, G>(const AdamUpdateArgs<P, G>*, const int32_t*, int64_t, const int32_t*);
LSJAX_ADAM_DTYPE_PAIRS(LSJAX_INSTANTIATE, float, cpu::Half, cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
