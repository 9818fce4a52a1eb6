// Shared device helpers for the lsjax CUDA kernels: float conversion of the
// storage types, 16-byte vector access, warp/row reductions, launch helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "csrc/param_vec.h"

namespace lsjax::cuda {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements moved as aligned accesses of up to 16 bytes.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC < 16 ? sizeof(T) * VEC : 16) Vec {
  T v[VEC];
};

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

// A Vec as plain words of its alignment, for stores: one access of up to 16
// bytes per word (an assignment of the struct itself may be split per
// element: nvcc stored EmbBwdChunks' 16-byte bfloat16 rows as eight 2-byte
// stores). Loads stay struct copies: reading through words changed layer
// norm's forward code and cost it 11-14% (RESULTS.md, session 23).
template <typename V>
using VecWord = std::conditional_t<alignof(V) == 16, uint4,
                std::conditional_t<alignof(V) == 8, uint2, std::conditional_t<alignof(V) == 4, uint32_t, uint16_t>>>;

template <typename V>
__device__ __forceinline__ void StoreVec(void* p, const V& v) {
  using W = VecWord<V>;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(W)); ++i) {
    reinterpret_cast<W*>(p)[i] = reinterpret_cast<const W*>(&v)[i];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void LoadFloats(const T* p, float (&out)[VEC]) {
  const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = ToFloat(v.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> PackFloats(const float (&in)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int i = 0; i < VEC; ++i) v.v[i] = FromFloat<T>(in[i]);
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void StoreFloats(T* p, const float (&in)[VEC]) {
  StoreVec(p, PackFloats<T, VEC>(in));
}

// StoreFloats with the streaming hint (st.global.cs) for 16-byte vectors: the
// lines are evicted first, so an output written once and not read back in the
// kernel does not push the kernel's reused inputs out of the L2.
template <typename T, int VEC>
__device__ __forceinline__ void StoreFloatsStreaming(T* p, const float (&in)[VEC]) {
  if constexpr (sizeof(Vec<T, VEC>) == 16) {
    const Vec<T, VEC> v = PackFloats<T, VEC>(in);
    __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));
  } else {
    StoreFloats<T, VEC>(p, in);
  }
}

// VEC float32 values at p read through the L2 (ld.global.cg), never from a
// stale L1 line: values other blocks wrote during this kernel.
template <int VEC>
__device__ __forceinline__ void LoadFloatsCg(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(p) + i);
      out[4 * i] = v.x;
      out[4 * i + 1] = v.y;
      out[4 * i + 2] = v.z;
      out[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = __ldcg(p + i);
  }
}

// VEC consecutive elements of a parameter vector from element i, as float32.
template <typename T, int VEC>
__device__ __forceinline__ void LoadParams(const ParamVec<T>& p, int64_t i, float (&out)[VEC]) {
  if (p.f32) {
    LoadFloats<float, VEC>(static_cast<const float*>(p.data) + i, out);
  } else {
    LoadFloats<T, VEC>(static_cast<const T*>(p.data) + i, out);
  }
}

// Element i of a parameter vector, as float32.
template <typename T>
__device__ __forceinline__ float ParamAt(const ParamVec<T>& p, int64_t i) {
  return p.f32 ? static_cast<const float*>(p.data)[i] : ToFloat(static_cast<const T*>(p.data)[i]);
}

// The last t in [0, count) with first[t] <= item (first ascending, count >= 1), 0 when there is none:
// which tensor of a multi-tensor table owns block `item`.
__device__ __forceinline__ int TableIndex(const int32_t* first, int count, int item) {
  int t = 0;
  for (int hi = count - 1; t < hi;) {
    const int mid = (t + hi + 1) / 2;
    if (first[mid] <= item) {
      t = mid;
    } else {
      hi = mid - 1;
    }
  }
  return t;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of two values over the blockDim.x threads of one row of a 2-D block
// (threadIdx.y picks the row). `smem` holds at least 2 * blockDim.y * 32
// floats. Every thread of the block must call it (it has barriers).
__device__ __forceinline__ void RowSum2(float& a, float& b, float* smem) {
  a = WarpSum(a);
  b = WarpSum(b);
  const int warps = blockDim.x / 32;
  if (warps == 1) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* row = smem + threadIdx.y * 64;
  __syncthreads();
  if (lane == 0) {
    row[warp] = a;
    row[32 + warp] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  for (int w = 0; w < warps; ++w) {
    a += row[w];
    b += row[32 + w];
  }
}

// Asynchronous global -> shared copies (cp.async, sm_80+): a thread keeps
// several loads in flight without holding them in registers. Groups of copies
// complete in commit order; CopyAsyncWait<N>() waits until at most N of the
// thread's committed groups are still pending, after which the thread reads
// what it copied (other threads' copies need a barrier too).
__device__ __forceinline__ unsigned SmemAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// BYTES (4, 8 or 16) bytes src -> dst, or BYTES zero bytes when !valid (src is then not read).
template <int BYTES>
__device__ __forceinline__ void CopyAsync(void* dst, const void* src, bool valid = true) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (BYTES == 16) {  // .cg: bypass L1 (16 bytes only)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(dst)), "l"(src),
                 "r"(valid ? 16 : 0) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(SmemAddr(dst)), "l"(src), "n"(BYTES),
                 "r"(valid ? BYTES : 0) : "memory");
  }
}
__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// VEC elements src -> dst: CopyAsync when they are 4, 8 or 16 bytes, else a
// plain load and store (2-byte vectors: complete before CopyAsyncWait).
template <typename T, int VEC>
__device__ __forceinline__ void CopyVecAsync(Vec<T, VEC>* dst, const T* src) {
  constexpr int kBytes = sizeof(Vec<T, VEC>);
  if constexpr (kBytes % 4 == 0) {
    CopyAsync<kBytes>(dst, src);
  } else {
    *dst = *reinterpret_cast<const Vec<T, VEC>*>(src);
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// Calls f(Int<VEC>, Int<ITEMS>) for a register-resident row kernel: VEC is 1
// or the 16-byte width of T, ITEMS (vectors per thread) one of 1, 2, 4 and,
// when MAX_ITEMS >= 8, 8.
template <typename T, int MAX_ITEMS, typename F>
void DispatchVecItems(int vec, int items, F&& f) {
  auto by_items = [&](auto v) {
    if (items == 1) {
      f(v, Int<1>{});
    } else if (items == 2) {
      f(v, Int<2>{});
    } else if (items == 4) {
      f(v, Int<4>{});
    } else if constexpr (MAX_ITEMS >= 8) {
      f(v, Int<8>{});
    }
  };
  if (vec == 1) {
    by_items(Int<1>{});
  } else {
    by_items(Int<kVec16<T>>{});
  }
}

inline bool Aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// An attribute of the current device, queried once per device (one cache per attribute).
template <cudaDeviceAttr kAttr>
inline int DeviceAttribute() {
  static int cached[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    cudaDeviceGetAttribute(&cached[device], kAttr, device);
  }
  return cached[device];
}

// Multiprocessor count of the current device.
inline int NumSMs() { return DeviceAttribute<cudaDevAttrMultiProcessorCount>(); }

__host__ __device__ inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int NextPow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (above 48 KiB
// that needs an opt-in per kernel). Cheap: a host-side attribute set.
template <typename... Params>
cudaError_t AllowDynamicSmem(void (*kernel)(Params...), size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Blocks of `threads` threads with `smem` dynamic shared memory bytes that one
// SM holds at once (registers, shared memory and launch bounds counted); at
// least 1, so a failed query still gives a valid grid. Cached per kernel,
// shape and device: the launch paths call it every time.
template <typename... Params>
int ResidentBlocksPerSM(void (*kernel)(Params...), int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  int device = 0;
  cudaGetDevice(&device);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, smem, device);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();  // clear it: the launch that follows reports its own errors
    return 1;
  }
  return cache[key] = blocks > 0 ? blocks : 1;
}

// Programmatic dependent launch (PDL, sm_90+). A kernel started by LaunchDependent may begin while
// the kernel before it in the stream is still running (when that one triggered its dependents, as
// the kernels below do): it must call WaitForPrerequisites() before it touches global memory.
// TriggerDependents() lets the next kernel launched with PDL (XLA launches its GEMMs so) be
// scheduled while this one runs; that kernel's wait still waits for the whole of this grid to
// finish and its writes to be visible. Both are no-ops before sm_90.
__device__ __forceinline__ void WaitForPrerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void TriggerDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether the current device takes PDL launches (compute capability >= 9.0), queried once per device.
inline bool DeviceHasPdl() { return DeviceAttribute<cudaDevAttrComputeCapabilityMajor>() >= 9; }

// kernel<<<grid, block, smem, stream>>>(args...) with PDL allowed where the device has it; the
// kernel must begin with WaitForPrerequisites().
template <typename... Params, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            Args... args) {
  cudaLaunchAttribute pdl{};
  pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &pdl;
  config.numAttrs = DeviceHasPdl() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// A second, high-priority stream of the current device per host thread, and
// the events that order it against a caller's stream. Created on first use.
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
  cudaError_t status = cudaSuccess;
};

inline SideStream& CurrentSideStream() {
  thread_local SideStream slots[64];
  int device = 0;
  cudaGetDevice(&device);
  SideStream& s = slots[device & 63];
  if (s.stream == nullptr && s.status == cudaSuccess) {
    // Possibly while XLA captures the caller's stream into a command buffer:
    // creating them is not part of the capture (relaxed mode meanwhile).
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    int least = 0, greatest = 0;
    s.status = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    if (s.status == cudaSuccess) s.status = cudaStreamCreateWithPriority(&s.stream, cudaStreamNonBlocking, greatest);
    if (s.status == cudaSuccess) s.status = cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming);
    if (s.status == cudaSuccess) s.status = cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming);
    cudaThreadExchangeStreamCaptureMode(&mode);
  }
  return s;
}

// side(side_stream) and main(stream) run concurrently: side's work after
// everything enqueued on `stream` before, and `stream`'s later work after
// both. Each returns a cudaError_t; the first error is returned. A fork and
// join through events, so a stream capture (a command buffer) of `stream`
// records both as parallel branches (then without the side stream's
// priority: see ffi/embedding.cc for what that cost the embedding's sort).
template <typename Side, typename Main>
cudaError_t Concurrently(cudaStream_t stream, Side&& side, Main&& main) {
  SideStream& s = CurrentSideStream();
  if (s.status != cudaSuccess) return s.status;
  cudaError_t err = cudaEventRecord(s.fork, stream);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(s.stream, s.fork, 0);
  if (err != cudaSuccess) return err;
  const cudaError_t side_err = side(s.stream);
  const cudaError_t main_err = main(stream);
  err = cudaEventRecord(s.join, s.stream);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(stream, s.join, 0);
  return side_err != cudaSuccess ? side_err : (main_err != cudaSuccess ? main_err : err);
}

// Deterministic column sums of per-block partial rows, the second pass of
// every backward that reduces over rows (dscale, dbias, ...):
//   out_y[c] = sum_{p < parts} partials[y, p, c]   for y in {0, 1}
// with partials laid out [n_outputs, capacity, cols] (capacity >= parts);
// out1.data may be null (one output); both outputs are float32 or both T (out0
// decides: their parameters' dtype), rounded once. Summed in a fixed order; no atomics.
template <typename T>
cudaError_t LaunchColumnSums(const float* partials, int64_t capacity, int64_t parts, int64_t cols,
                             ParamGrad<T> out0, ParamGrad<T> out1, cudaStream_t stream);

}  // namespace lsjax::cuda
