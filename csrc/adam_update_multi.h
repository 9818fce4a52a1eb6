// Fused Adam/AdamW update of many tensors in one call (csrc/adam_update.h per
// tensor): tensor i is updated exactly as AdamUpdate{Cpu,Cuda}(tensors[i]),
// except that its weight decay is 0 where decay[i] == 0. Tensors of one call
// share the param and grad storage types. Framework-free: pointers, sizes, stream.
#pragma once

#include <cstdint>

#include "csrc/adam_update.h"

namespace lsjax {

template <typename P, typename G>
void AdamUpdateMultiCpu(const AdamUpdateArgs<P, G>* tensors, const int32_t* decay, int64_t count);

#ifdef LSJAX_WITH_CUDA
// One kernel launch per few dozen tensors (csrc/adam_update_multi.cu).
template <typename P, typename G>
cudaError_t AdamUpdateMultiCuda(const AdamUpdateArgs<P, G>* tensors, const int32_t* decay,
                                int64_t count, cudaStream_t stream);
#endif

}  // namespace lsjax
