// Shared plumbing for the lsjax XLA FFI handlers: dtype dispatch onto each
// platform's storage types, shape helpers, CUDA error conversion.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>

#include "csrc/cpu_dtypes.h"
#include "xla/ffi/api/ffi.h"

#ifdef LSJAX_WITH_CUDA
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

namespace lsjax::ffi {

namespace xffi = ::xla::ffi;

// The handlers' buffer operand and result types, and (CUDA) their stream context.
using Buf = xffi::AnyBuffer;
using Res = xffi::Result<xffi::AnyBuffer>;
#ifdef LSJAX_WITH_CUDA
using Stream = xffi::PlatformStream<cudaStream_t>;
#endif

// Element storage types of one platform.
struct CpuTypes {
  using F32 = float;
  using F16 = cpu::Half;
  using BF16 = cpu::BFloat16;
};
#ifdef LSJAX_WITH_CUDA
struct CudaTypes {
  using F32 = float;
  using F16 = __half;
  using BF16 = __nv_bfloat16;
};
#endif

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the platform's storage type for a float dtype.
template <typename Types, typename F>
xffi::Error DispatchFloat(xffi::DataType dtype, const char* op, F&& f) {
  switch (dtype) {
    case xffi::DataType::F32:
      return f(TypeTag<typename Types::F32>{});
    case xffi::DataType::F16:
      return f(TypeTag<typename Types::F16>{});
    case xffi::DataType::BF16:
      return f(TypeTag<typename Types::BF16>{});
    default:
      return xffi::Error::InvalidArgument(std::string(op) +
                                          ": expected a float32, float16 or bfloat16 input");
  }
}

// (product of leading dims, last dim) of a buffer of rank >= 1.
inline std::pair<int64_t, int64_t> RowsCols(const xffi::AnyBuffer& buf) {
  const auto dims = buf.dimensions();
  if (dims.size() == 0) return {1, 1};
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return {rows, dims.back()};
}

template <typename T>
const T* In(const xffi::AnyBuffer& buf) {
  return static_cast<const T*>(buf.untyped_data());
}
template <typename T>
T* Out(xffi::Result<xffi::AnyBuffer>& buf) {
  return static_cast<T*>(buf->untyped_data());
}

// A binding with kArgs buffer operands then kRets buffer results appended: ``BindBuffers<2, 1>(b)`` is
// ``b.Arg<AnyBuffer>().Arg<AnyBuffer>().Ret<AnyBuffer>()``.
// (Bindings only move through their own methods, so each level returns the next one's result.)
template <int kArgs, int kRets, typename B>
auto BindBuffers(B&& b) {
  static_assert(kArgs >= 0 && kRets >= 0 && kArgs + kRets > 0, "BindBuffers appends at least one buffer");
  if constexpr (kArgs > 0 && kArgs + kRets > 1) {
    return BindBuffers<kArgs - 1, kRets>(std::move(b).template Arg<xffi::AnyBuffer>());
  } else if constexpr (kArgs > 0) {
    return std::move(b).template Arg<xffi::AnyBuffer>();
  } else if constexpr (kRets > 1) {
    return BindBuffers<0, kRets - 1>(std::move(b).template Ret<xffi::AnyBuffer>());
  } else {
    return std::move(b).template Ret<xffi::AnyBuffer>();
  }
}

inline xffi::Error Expect(bool ok, const char* op, const std::string& what) {
  return ok ? xffi::Error::Success() : xffi::Error::InvalidArgument(std::string(op) + ": " + what);
}

// A parameter vector operand or gradient result (csrc/param_vec.h): `count` elements of
// float32 or of the op's input dtype `like`.
inline xffi::Error CheckParam(const char* op, const xffi::AnyBuffer& p, xffi::DataType like, int64_t count,
                              const char* what) {
  return Expect((p.element_type() == xffi::DataType::F32 || p.element_type() == like) &&
                    static_cast<int64_t>(p.element_count()) == count,
                op, std::string(what) + " must be [" + std::to_string(count) + "] of float32 or the input's dtype");
}

template <typename T>
ParamVec<T> Param(const xffi::AnyBuffer* p) {
  if (p == nullptr) return {};
  return {p->untyped_data(), p->element_type() == xffi::DataType::F32};
}
template <typename T>
ParamGrad<T> ParamOut(xffi::Result<xffi::AnyBuffer>* p) {
  if (p == nullptr) return {};
  return {(*p)->untyped_data(), (*p)->element_type() == xffi::DataType::F32};
}

#ifdef LSJAX_WITH_CUDA
inline xffi::Error CudaStatus(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return xffi::Error::Success();
  return xffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}
#endif

// In-place ops alias results to operands, but XLA does not always hand an aliased result its
// operand's buffer (inside a lax.scan over layers it has been seen to be a different buffer, holding
// none of the operand). Copies each operand into its result where the two differ.
using AliasedPair = std::pair<const xffi::AnyBuffer*, xffi::Result<xffi::AnyBuffer>*>;

inline xffi::Error CopyIntoAliased(std::initializer_list<AliasedPair> pairs, void* stream = nullptr) {
  for (auto [src, dst] : pairs) {
    void* to = (*dst)->untyped_data();
    if (src->untyped_data() == to) continue;
#ifdef LSJAX_WITH_CUDA
    if (stream != nullptr) {
      const cudaError_t err = cudaMemcpyAsync(to, src->untyped_data(), src->size_bytes(), cudaMemcpyDeviceToDevice,
                                              static_cast<cudaStream_t>(stream));
      if (auto e = CudaStatus(err, "aliased result copy"); e.failure()) return e;
      continue;
    }
#endif
    std::memcpy(to, src->untyped_data(), src->size_bytes());
  }
  return xffi::Error::Success();
}

}  // namespace lsjax::ffi
