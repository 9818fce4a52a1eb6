// Plain C++ twin of the attention-softmax kernels: the reference for the CUDA
// path and the custom-call path exercised in CI.
#include <cmath>
#include <limits>
#include <vector>

#include "csrc/attention_softmax.h"
#include "csrc/cpu_dtypes.h"
#include "csrc/philox.h"

namespace lsjax {

using cpu::FromFloat;
using cpu::ToFloat;

namespace {

constexpr float kLog2e = 1.4426950408889634f;

struct Origin {
  int32_t b0 = 0, h0 = 0, q0 = 0;
};

Origin ReadOrigin(const AttnSoftmaxGeometry& g) {
  Origin o;
  if (g.origin) {
    o.b0 = g.origin[0];
    o.h0 = g.origin[1];
    o.q0 = g.origin[2];
  }
  return o;
}

bool Valid(const AttnSoftmaxGeometry& g, const AttnRow& row, int64_t c) {
  return c < row.limit && (g.mask == nullptr || g.mask[row.b * g.k_len + c] != 0);
}

}  // namespace

template <typename T>
void AttnSoftmaxFwdCpu(const AttnSoftmaxFwdArgs<T>& a) {
  const AttnSoftmaxGeometry& g = a.g;
  const Origin o = ReadOrigin(g);
  const bool dropout = g.rate > 0.f;
  const DropoutRng rng = dropout ? MakeDropoutRng(g.rng, g.rate) : DropoutRng{};
  const int64_t K = g.k_len;
  const float zscale = g.scale * kLog2e;  // log2 units, as the CUDA kernels
  std::vector<float> z(K);
  for (int64_t r = 0; r < g.rows(); ++r) {
    const AttnRow row = LocateRow(g, r, o.b0, o.h0, o.q0);
    const int64_t off = r * K;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < K; ++c) {
      z[c] = zscale * ToFloat(a.x[off + c]);
      if (Valid(g, row, c) && z[c] > m) m = z[c];
    }
    // No valid column (or only -inf scores): every p is 0, never NaN.
    if (m == -std::numeric_limits<float>::infinity()) m = 0.f;
    float s = 0.f;
    for (int64_t c = 0; c < K; ++c) {
      if (Valid(g, row, c)) {
        z[c] = std::exp2(z[c] - m);
        s += z[c];
      } else {
        z[c] = 0.f;
      }
    }
    const float inv = s > 0.f ? 1.f / s : 0.f;
    for (int64_t c = 0; c < K; ++c) {
      float p = z[c] * inv;
      if (dropout) p = rng.Keep(row.global_row * K + c) ? p * rng.scale : 0.f;
      a.y[off + c] = FromFloat<T>(p);
    }
    a.row_max[r] = m;
    a.row_inv[r] = inv;
  }
}

template <typename T>
void AttnSoftmaxBwdCpu(const AttnSoftmaxBwdArgs<T>& a) {
  const AttnSoftmaxGeometry& g = a.g;
  const Origin o = ReadOrigin(g);
  const bool dropout = g.rate > 0.f;
  const DropoutRng rng = dropout ? MakeDropoutRng(g.rng, g.rate) : DropoutRng{};
  const int64_t K = g.k_len;
  const float zscale = g.scale * kLog2e;
  std::vector<float> p(K), gr(K);
  for (int64_t r = 0; r < g.rows(); ++r) {
    const AttnRow row = LocateRow(g, r, o.b0, o.h0, o.q0);
    const int64_t off = r * K;
    const float m = a.row_max[r], inv = a.row_inv[r];
    float sum = 0.f;
    for (int64_t c = 0; c < K; ++c) {
      p[c] = Valid(g, row, c) ? std::exp2(zscale * ToFloat(a.x[off + c]) - m) * inv : 0.f;
      float d = ToFloat(a.dy[off + c]);
      if (dropout) d = rng.Keep(row.global_row * K + c) ? d * rng.scale : 0.f;
      gr[c] = d;
      sum += d * p[c];
    }
    for (int64_t c = 0; c < K; ++c) a.dx[off + c] = FromFloat<T>(g.scale * p[c] * (gr[c] - sum));
  }
}

#define LSJAX_INSTANTIATE(T)                                           \
  template void AttnSoftmaxFwdCpu<T>(const AttnSoftmaxFwdArgs<T>&); \
  template void AttnSoftmaxBwdCpu<T>(const AttnSoftmaxBwdArgs<T>&);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(cpu::Half)
LSJAX_INSTANTIATE(cpu::BFloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax
