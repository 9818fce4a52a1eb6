// Plain C++ twin of the layer-norm kernels: the reference for the CUDA path
// and the custom-call path exercised in CI.
#include <cmath>
#include <vector>

#include "csrc/cpu_dtypes.h"
#include "csrc/layer_norm.h"

namespace lsjax {

using cpu::FromFloat;
using cpu::ParamAt;
using cpu::SetParam;
using cpu::ToFloat;

template <typename T>
void LayerNormFwdCpu(const LayerNormFwdArgs<T>& a) {
  std::vector<float> v(a.cols);
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t off = r * a.cols;
    float sum = 0.f;
    for (int64_t c = 0; c < a.cols; ++c) {
      v[c] = ToFloat(a.x[off + c]);
      if (a.residual) {
        // Normalise the rounded sum, as an unfused `z = x + r; layer_norm(z)`.
        a.z[off + c] = FromFloat<T>(v[c] + ToFloat(a.residual[off + c]));
        v[c] = ToFloat(a.z[off + c]);
      }
      sum += v[c];
    }
    const float mean = sum / a.cols;
    float sq = 0.f;
    for (int64_t c = 0; c < a.cols; ++c) sq += (v[c] - mean) * (v[c] - mean);
    const float rstd = 1.f / std::sqrt(sq / a.cols + a.eps);
    for (int64_t c = 0; c < a.cols; ++c) {
      a.y[off + c] = FromFloat<T>((v[c] - mean) * rstd * ParamAt(a.scale, c) + ParamAt(a.bias, c));
    }
    a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
}

template <typename T>
void LayerNormBwdCpu(const LayerNormBwdArgs<T>& a) {
  std::vector<float> scale(a.cols), dscale(a.cols, 0.f), dbias(a.cols, 0.f);
  for (int64_t c = 0; c < a.cols; ++c) scale[c] = ParamAt(a.scale, c);
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t off = r * a.cols;
    const float mean = a.mean[r], rstd = a.rstd[r];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t c = 0; c < a.cols; ++c) {
      const float xhat = (ToFloat(a.z[off + c]) - mean) * rstd;
      const float dy = ToFloat(a.dy[off + c]);
      const float g = dy * scale[c];
      sum_g += g;
      sum_gx += g * xhat;
      dscale[c] += dy * xhat;
      dbias[c] += dy;
    }
    const float mean_g = sum_g / a.cols, mean_gx = sum_gx / a.cols;
    for (int64_t c = 0; c < a.cols; ++c) {
      const float xhat = (ToFloat(a.z[off + c]) - mean) * rstd;
      float d = rstd * (ToFloat(a.dy[off + c]) * scale[c] - mean_g - xhat * mean_gx);
      if (a.dz_out) d += ToFloat(a.dz_out[off + c]);
      a.dz[off + c] = FromFloat<T>(d);
    }
  }
  for (int64_t c = 0; c < a.cols; ++c) {
    SetParam(a.dscale, c, dscale[c]);
    SetParam(a.dbias, c, dbias[c]);
  }
}

#define LSJAX_INSTANTIATE(T)                                       \
  template void LayerNormFwdCpu<T>(const LayerNormFwdArgs<T>&); \
  template void LayerNormBwdCpu<T>(const LayerNormBwdArgs<T>&);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(cpu::Half)
LSJAX_INSTANTIATE(cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
