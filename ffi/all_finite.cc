// XLA FFI handler for the all-finite check. Target (for "cpu" and, when built,
// "CUDA"), for k >= 0 tensors of one dtype (f32/f16/bf16), any shapes:
//   all_finite (x[k]...) -> nonfinite: s32[], 0 iff every element is finite.
#include <string>
#include <vector>

#include "csrc/all_finite.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

constexpr const char* kOp = "all_finite";

// Checks the call, dispatches the tensors' dtype and calls run(tensors, k, nonfinite).
template <typename Types, typename Run>
xffi::Error CheckAll(Run&& run, xffi::RemainingArgs args, Res nonfinite) {
  if (auto e = Expect(nonfinite->element_type() == xffi::DataType::S32 && nonfinite->element_count() == 1, kOp,
                      "the result must be int32[]");
      e.failure())
    return e;
  std::vector<Buf> bufs;
  for (size_t i = 0; i < args.size(); ++i) {
    auto buf = args.get<Buf>(i);
    if (!buf.has_value()) return buf.error();
    bufs.push_back(*buf);
    if (auto e = Expect(buf->element_type() == bufs[0].element_type(), kOp,
                        "operand " + std::to_string(i) + ": all operands must share one dtype (one call per dtype)");
        e.failure())
      return e;
  }
  const auto dtype = bufs.empty() ? xffi::DataType::F32 : bufs[0].element_type();
  return DispatchFloat<Types>(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::vector<AllFiniteTensor<T>> tensors;
    for (const Buf& b : bufs) tensors.push_back({In<T>(b), static_cast<int64_t>(b.element_count())});
    return run(tensors.data(), static_cast<int64_t>(tensors.size()), Out<int32_t>(nonfinite));
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AllFiniteCpuHandler,
    [](xffi::RemainingArgs args, Res nonfinite) {
      auto run = [](const auto* tensors, int64_t k, int32_t* out) {
        *out = AllFiniteCpu(tensors, k) ? 0 : 1;
        return xffi::Error::Success();
      };
      return CheckAll<CpuTypes>(run, args, nonfinite);
    },
    xffi::Ffi::Bind().RemainingArgs().Ret<Buf>());

LSJAX_FFI_TARGET_CPU(kOp, AllFiniteCpuHandler);

#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AllFiniteCudaHandler,
    [](cudaStream_t stream, xffi::RemainingArgs args, Res nonfinite) {
      auto run = [stream](const auto* tensors, int64_t k, int32_t* out) {
        return CudaStatus(AllFiniteCuda(tensors, k, out, stream), kOp);
      };
      return CheckAll<CudaTypes>(run, args, nonfinite);
    },
    xffi::Ffi::Bind().Ctx<xffi::PlatformStream<cudaStream_t>>().RemainingArgs().Ret<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA(kOp, AllFiniteCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
