// Plain C++ twin of the bias + activation + dropout (+ residual) kernels: the
// reference for the CUDA path and the custom-call path exercised in CI.
#include <vector>

#include "csrc/bias_dropout.h"
#include "csrc/cpu_dtypes.h"
#include "csrc/philox.h"

namespace lsjax {
namespace {

using cpu::FromFloat;
using cpu::ParamAt;
using cpu::SetParam;
using cpu::ToFloat;

template <typename T, typename Act>
void Fwd(const BiasDropoutFwdArgs<T>& a) {
  const bool drop = a.rate > 0.f;
  const DropoutRng rng = drop ? MakeDropoutRng(a.rng, a.rate) : DropoutRng{};
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t c = 0; c < a.cols; ++c) {
      const int64_t e = r * a.cols + c;
      float v = Act::F(ToFloat(a.x[e]) + (a.bias.data ? ParamAt(a.bias, c) : 0.f));
      if (drop) v = rng.Keep(static_cast<uint64_t>(r * a.row_stride + c)) ? v * rng.scale : 0.f;
      if (a.residual) v += ToFloat(a.residual[e]);
      a.y[e] = FromFloat<T>(v);
    }
  }
}

template <typename T, typename Act>
void Bwd(const BiasDropoutBwdArgs<T>& a) {
  const bool drop = a.rate > 0.f && !Act::kGradFromOutput;
  const DropoutRng rng = drop ? MakeDropoutRng(a.rng, a.rate) : DropoutRng{};
  const float scale = DropoutScale(a.rate);
  std::vector<float> dbias(a.dbias.data ? a.cols : 0, 0.f);
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t c = 0; c < a.cols; ++c) {
      const int64_t e = r * a.cols + c;
      float g = ToFloat(a.dy[e]);
      if constexpr (Act::kGradFromOutput) {
        g = Act::G(ToFloat(a.saved[e])) ? g * scale : 0.f;
      } else {
        if (drop) g = rng.Keep(static_cast<uint64_t>(r * a.row_stride + c)) ? g * rng.scale : 0.f;
        if constexpr (Act::kNeedsInput) g *= Act::D(ToFloat(a.saved[e]) + (a.bias.data ? ParamAt(a.bias, c) : 0.f));
      }
      a.dx[e] = FromFloat<T>(g);
      if (a.dbias.data) dbias[c] += g;
    }
  }
  for (int64_t c = 0; a.dbias.data && c < a.cols; ++c) SetParam(a.dbias, c, dbias[c]);
}

}  // namespace

template <typename T>
void BiasDropoutFwdCpu(const BiasDropoutFwdArgs<T>& a) {
  DispatchActivation<T>(a.act, [&](auto act) { Fwd<T, decltype(act)>(a); });
}

template <typename T>
void BiasDropoutBwdCpu(const BiasDropoutBwdArgs<T>& a) {
  DispatchActivation<T>(a.act, [&](auto act) { Bwd<T, decltype(act)>(a); });
}

#define LSJAX_INSTANTIATE(T)                                           \
  template void BiasDropoutFwdCpu<T>(const BiasDropoutFwdArgs<T>&); \
  template void BiasDropoutBwdCpu<T>(const BiasDropoutBwdArgs<T>&);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(cpu::Half)
LSJAX_INSTANTIATE(cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
