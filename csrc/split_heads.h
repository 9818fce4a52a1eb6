// Head split of a fused attention projection (LightSeq's bias_add_transform_20314):
//   x [batch, length, n, heads, head_dim] (+ bias [n, heads, head_dim])
//   -> n outputs out_j [batch, heads, length, head_dim],
//      out_j[b, h, l, k] = x[b, l, j, h, k] + bias[j, h, k]   (float32 math, one rounding to T)
// Backward: dx[b, l, j, h, k] = dout_j[b, h, l, k];
//           dbias[j, h, k] = sum_{b, l} dout_j[b, h, l, k]   (float32, deterministic order)
// `batch` may be several leading dims flattened. Both passes work on the
// [rows = batch * length, cols = n * heads * head_dim] view of x / dx, whose
// column c = (j * heads + h) * head_dim + k. Framework-free: pointers, sizes, stream.
#pragma once

#include <cstdint>

#include "csrc/param_vec.h"
#include "csrc/philox.h"  // LSJAX_HD

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

constexpr int kSplitHeadsMaxN = 3;  // Q/K/V

struct SplitHeadsDims {
  int64_t batch;
  int64_t length;
  int64_t n;  // 1 .. kSplitHeadsMaxN
  int64_t heads;
  int64_t head_dim;

  LSJAX_HD int64_t Rows() const { return batch * length; }
  LSJAX_HD int64_t Cols() const { return n * heads * head_dim; }
};

template <typename T>
struct SplitHeadsFwdArgs {
  const T* x;
  ParamVec<T> bias;             // bias.data nullable: no bias
  T* out[kSplitHeadsMaxN];      // the first n are used
  SplitHeadsDims dims;
};

template <typename T>
struct SplitHeadsBwdArgs {
  const T* dout[kSplitHeadsMaxN];  // the first n are used
  T* dx;
  ParamGrad<T> dbias;  // dbias.data nullable: no bias gradient
  float* partials;     // with dbias, CUDA only: float32 [ColumnSumPartialRows(rows), cols]
  SplitHeadsDims dims;
};

template <typename T>
void SplitHeadsFwdCpu(const SplitHeadsFwdArgs<T>& a);
template <typename T>
void SplitHeadsBwdCpu(const SplitHeadsBwdArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t SplitHeadsFwdCuda(const SplitHeadsFwdArgs<T>& a, cudaStream_t stream);
// dbias goes through per-block partial rows in a.partials (an extra XLA
// output), summed in a fixed order.
template <typename T>
cudaError_t SplitHeadsBwdCuda(const SplitHeadsBwdArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
