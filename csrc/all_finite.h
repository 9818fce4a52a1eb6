// Whether every element of a list of tensors of one float dtype is finite (no
// inf, no NaN): the gradient check of dynamic loss scaling, for all leaves at
// once. Framework-free: pointers, sizes, stream.
#pragma once

#include <cstdint>

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lsjax {

template <typename T>
struct AllFiniteTensor {
  const T* data;  // [n]
  int64_t n;
};

// True iff every element of every tensor is finite (true for count == 0).
template <typename T>
bool AllFiniteCpu(const AllFiniteTensor<T>* tensors, int64_t count);

#ifdef LSJAX_WITH_CUDA
// *nonfinite (device int32) = 0 if every element of every tensor is finite,
// else 1. A memset then one kernel launch per few hundred tensors
// (csrc/all_finite.cu).
template <typename T>
cudaError_t AllFiniteCuda(const AllFiniteTensor<T>* tensors, int64_t count, int32_t* nonfinite,
                          cudaStream_t stream);
#endif

}  // namespace lsjax
