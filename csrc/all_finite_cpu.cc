// Plain C++ twin of the all-finite check (csrc/all_finite.h).
#include "csrc/all_finite.h"

#include <cmath>

#include "csrc/cpu_dtypes.h"

namespace lsjax {

template <typename T>
bool AllFiniteCpu(const AllFiniteTensor<T>* tensors, int64_t count) {
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t i = 0; i < tensors[t].n; ++i) {
      if (!std::isfinite(cpu::ToFloat(tensors[t].data[i]))) return false;
    }
  }
  return true;
}

template bool AllFiniteCpu<float>(const AllFiniteTensor<float>*, int64_t);
template bool AllFiniteCpu<cpu::Half>(const AllFiniteTensor<cpu::Half>*, int64_t);
template bool AllFiniteCpu<cpu::BFloat16>(const AllFiniteTensor<cpu::BFloat16>*, int64_t);

}  // namespace lsjax
