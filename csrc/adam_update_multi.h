// Fused Adam/AdamW update of many tensors in one call (csrc/adam_update.h per
// tensor): tensor i is updated exactly as AdamUpdate{Cpu,Cuda}(tensors[i]),
// except that its weight decay is 0 where decay[i] == 0. Tensors of one call
// share the param and grad storage types. `apply` (nullable; device memory on
// CUDA) reading 0 makes the call write nothing: with outputs aliased to their
// inputs, a skipped (non-finite) step leaves params and moments unchanged.
// Framework-free: pointers, sizes, stream.
#pragma once

#include <cstdint>

#include "csrc/adam_update.h"

namespace lsjax {

template <typename P, typename G>
void AdamUpdateMultiCpu(const AdamUpdateArgs<P, G>* tensors, const int32_t* decay, int64_t count,
                        const int32_t* apply);

#ifdef LSJAX_WITH_CUDA
// One kernel launch per 256 tensors (csrc/adam_update_multi.cu).
template <typename P, typename G>
cudaError_t AdamUpdateMultiCuda(const AdamUpdateArgs<P, G>* tensors, const int32_t* decay,
                                int64_t count, const int32_t* apply, cudaStream_t stream);
#endif

}  // namespace lsjax
