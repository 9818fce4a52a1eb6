// A [cols] parameter vector of an op (a bias, a layer-norm scale) or its
// gradient, stored as float32 or as the op's own storage type T: 16-bit
// parameters are read and written as they are, with no float32 copy made
// before the op and no cast of the gradient after it. Math stays float32.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lsjax {

template <typename T, typename Void = const void>
struct ParamVec {
  Void* data = nullptr;  // nullable where the op says so
  bool f32 = true;       // float32 elements, else T

  size_t ElementBytes() const { return f32 ? sizeof(float) : sizeof(T); }
};

// A gradient output (written).
template <typename T>
using ParamGrad = ParamVec<T, void>;

// Rows of a column-sum gradient's float32 partial-row workspace (one partial row
// per >= 32 input rows, at most 512), summed by cuda::LaunchColumnSums.
inline int64_t ColumnSumPartialRows(int64_t rows) {
  const int64_t parts = rows / 32;
  return parts < 1 ? 1 : (parts > 512 ? 512 : parts);
}

}  // namespace lsjax
