// Plain C++ twin of the split_heads kernels: the reference for the CUDA path
// and the custom-call path exercised in CI.
#include <vector>

#include "csrc/cpu_dtypes.h"
#include "csrc/split_heads.h"

namespace lsjax {
namespace {

// Calls f(row, col, head_offset) for every element of the [rows, cols] view
// of x, where head_offset is the element's offset in its output out_j, j =
// col / (heads * head_dim).
template <typename F>
void ForEachElement(const SplitHeadsDims& d, F&& f) {
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t l = 0; l < d.length; ++l) {
      for (int64_t j = 0; j < d.n; ++j) {
        for (int64_t h = 0; h < d.heads; ++h) {
          for (int64_t k = 0; k < d.head_dim; ++k) {
            const int64_t head_offset = ((b * d.heads + h) * d.length + l) * d.head_dim + k;
            f(b * d.length + l, (j * d.heads + h) * d.head_dim + k, head_offset);
          }
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void SplitHeadsFwdCpu(const SplitHeadsFwdArgs<T>& a) {
  const int64_t cols = a.dims.Cols(), per_output = a.dims.heads * a.dims.head_dim;
  ForEachElement(a.dims, [&](int64_t r, int64_t c, int64_t o) {
    // -0 is the identity of float addition: without a bias the values pass unchanged (even -0).
    const float v = cpu::ToFloat(a.x[r * cols + c]) + (a.bias.data ? cpu::ParamAt(a.bias, c) : -0.f);
    a.out[c / per_output][o] = cpu::FromFloat<T>(v);
  });
}

template <typename T>
void SplitHeadsBwdCpu(const SplitHeadsBwdArgs<T>& a) {
  const int64_t cols = a.dims.Cols(), per_output = a.dims.heads * a.dims.head_dim;
  std::vector<float> dbias(a.dbias.data ? cols : 0, 0.f);
  ForEachElement(a.dims, [&](int64_t r, int64_t c, int64_t o) {
    const T g = a.dout[c / per_output][o];
    a.dx[r * cols + c] = g;
    if (a.dbias.data) dbias[c] += cpu::ToFloat(g);
  });
  for (int64_t c = 0; a.dbias.data && c < cols; ++c) cpu::SetParam(a.dbias, c, dbias[c]);
}

#define LSJAX_INSTANTIATE(T)                                         \
  template void SplitHeadsFwdCpu<T>(const SplitHeadsFwdArgs<T>&); \
  template void SplitHeadsBwdCpu<T>(const SplitHeadsBwdArgs<T>&);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(cpu::Half)
LSJAX_INSTANTIATE(cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
