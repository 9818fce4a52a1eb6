// Shared kernels declared in cuda_common.cuh.
#include "csrc/cuda_common.cuh"

namespace lsjax::cuda {
namespace {

// 8 lanes per column with 4 independent chains each; blockIdx.y picks the output.
template <typename OutT>
__global__ void __launch_bounds__(256) ColumnSums(const float* partials, int64_t capacity,
                                                  int64_t parts, int64_t cols, OutT* out0,
                                                  OutT* out1) {
  __shared__ float smem[8][33];
  const float* in = partials + blockIdx.y * capacity * cols;
  OutT* out = blockIdx.y == 0 ? out0 : out1;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (c < cols) {
    int64_t p = threadIdx.y;
    for (; p + 24 < parts; p += 32) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += in[(p + 8 * j) * cols + c];
    }
    for (; p < parts; p += 8) acc[0] += in[p * cols + c];
  }
  smem[threadIdx.y][threadIdx.x] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += smem[k][threadIdx.x];
    out[c] = FromFloat<OutT>(total);
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchColumnSums(const float* partials, int64_t capacity, int64_t parts, int64_t cols,
                             ParamGrad<T> out0, ParamGrad<T> out1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(CeilDiv(cols, 32)), out1.data == nullptr ? 1 : 2);
  const auto launch = [&](auto* typed0) {
    using OutT = std::remove_pointer_t<decltype(typed0)>;
    ColumnSums<OutT><<<grid, dim3(32, 8), 0, stream>>>(partials, capacity, parts, cols, typed0,
                                                        static_cast<OutT*>(out1.data));
  };
  if (out0.f32) {
    launch(static_cast<float*>(out0.data));
  } else {
    launch(static_cast<T*>(out0.data));
  }
  return cudaGetLastError();
}

#define LSJAX_INSTANTIATE(T)                                                                         \
  template cudaError_t LaunchColumnSums<T>(const float*, int64_t, int64_t, int64_t, ParamGrad<T>, \
                                           ParamGrad<T>, cudaStream_t);
LSJAX_INSTANTIATE(float)
LSJAX_INSTANTIATE(__half)
LSJAX_INSTANTIATE(__nv_bfloat16)
#undef LSJAX_INSTANTIATE

}  // namespace lsjax::cuda
