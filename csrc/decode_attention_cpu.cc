// Plain C++ twin of the decode-attention kernel (csrc/decode_attention.h).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "csrc/cpu_dtypes.h"
#include "csrc/decode_attention.h"

namespace lsjax {

using cpu::FromFloat;
using cpu::ToFloat;

template <typename T>
void DecodeAttentionCpu(const DecodeAttentionArgs<T>& a) {
  const int64_t row = a.heads * a.head_dim;  // elements per (b, j) of k / v
  const int64_t appended = DecodeAttentionAppendPosition(a.append_at, a.k_len);
  if (appended >= 0) {
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t dst = (b * a.k_len + appended) * row;
      std::copy_n(a.k_new + b * a.q_stride, row, a.k_cache + dst);
      std::copy_n(a.v_new + b * a.q_stride, row, a.v_cache + dst);
    }
  }
  const int64_t keys = DecodeAttentionKeys(a, appended);
  std::vector<float> q(a.head_dim), p(a.k_len), acc(a.head_dim);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t h = 0; h < a.heads; ++h) {
      const T* qp = a.q + b * a.q_stride + h * a.head_dim;
      for (int64_t d = 0; d < a.head_dim; ++d) q[d] = ToFloat(qp[d]) * a.scale;
      const int32_t* src = a.key_src + b * a.k_len;
      auto key = [&](const T* base, int64_t j) {  // key j's head-h vector in k or v
        return base + (DecodeAttentionKeyRow(b, j, src[j], a.batch, appended) * a.k_len + j) * row + h * a.head_dim;
      };
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = -std::numeric_limits<float>::infinity();
        if (src[j] == kDecodeAttentionMasked) continue;
        const T* kp = key(a.k, j);
        float s = 0.f;
        for (int64_t d = 0; d < a.head_dim; ++d) s += q[d] * ToFloat(kp[d]);
        p[j] = s;
        mx = std::max(mx, s);
      }
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      if (mx > -std::numeric_limits<float>::infinity()) {
        for (int64_t j = 0; j < keys; ++j) {
          if (p[j] == -std::numeric_limits<float>::infinity()) continue;
          const float e = std::exp(p[j] - mx);
          sum += e;
          const T* vp = key(a.v, j);
          for (int64_t d = 0; d < a.head_dim; ++d) acc[d] += e * ToFloat(vp[d]);
        }
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      T* op = a.out + (b * a.heads + h) * a.head_dim;
      for (int64_t d = 0; d < a.head_dim; ++d) op[d] = FromFloat<T>(acc[d] * inv);
    }
  }
}

template void DecodeAttentionCpu<float>(const DecodeAttentionArgs<float>&);
template void DecodeAttentionCpu<cpu::Half>(const DecodeAttentionArgs<cpu::Half>&);
template void DecodeAttentionCpu<cpu::BFloat16>(const DecodeAttentionArgs<cpu::BFloat16>&);

}  // namespace lsjax
