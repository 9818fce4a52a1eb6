// XLA FFI handlers for the decode dense layer (csrc/decode_dense.h). Target:
//   decode_dense (x [rows, K] f32/f16/bf16, kernel [K, N], bias f32 [N], ln_scale f32 [K] or [0],
//                 ln_bias f32 [K] or [0], residual [rows, N] or [rows, 0]) -> y [rows, N] in x's dtype
// Attributes: eps (f32), activation (s32, csrc/bias_dropout.h Activation). Empty ln / residual operands
// mean absent.
#include <string>
#include <type_traits>
#include <utility>

#include "csrc/decode_dense.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

constexpr const char* kOp = "decode_dense";

template <typename Types, typename Run>
xffi::Error Launch(Run&& run, const Buf& x, const Buf& kernel, const Buf& bias, const Buf& ln_scale,
                   const Buf& ln_bias, const Buf& residual, Res& y, float eps, int32_t act) {
  const auto xd = x.dimensions(), wd = kernel.dimensions();
  if (auto e = Expect(xd.size() == 2 && wd.size() == 2 && xd[0] >= 1 && xd[1] >= 1 && wd[0] == xd[1] && wd[1] >= 1,
                      kOp, "x must be [rows, K] and kernel [K, N], all non-empty");
      e.failure())
    return e;
  const int64_t rows = xd[0], k = xd[1], n = wd[1];
  const auto dtype = x.element_type();
  const auto f32 = xffi::DataType::F32;
  const bool types_ok = kernel.element_type() == dtype && residual.element_type() == dtype &&
                        y->element_type() == dtype && bias.element_type() == f32 &&
                        ln_scale.element_type() == f32 && ln_bias.element_type() == f32;
  if (auto e = Expect(types_ok, kOp, "kernel, residual and y must have x's dtype; bias and ln float32"); e.failure())
    return e;
  const auto count = [](const Buf& b) { return static_cast<int64_t>(b.element_count()); };
  const int64_t ln = count(ln_scale), res = count(residual);
  const bool sizes_ok = count(bias) == n && count(*y) == rows * n && count(ln_bias) == ln && (ln == 0 || ln == k) &&
                        (res == 0 || res == rows * n);
  if (auto e = Expect(sizes_ok, kOp,
                      "bias must be [N], ln_scale and ln_bias both [K] or both empty, residual [rows, N] or empty");
      e.failure())
    return e;
  if (auto e = Expect(KnownActivation(act), kOp, "unknown activation code " + std::to_string(act));
      e.failure())
    return e;
  return DispatchFloat<Types>(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    DecodeDenseArgs<T> a{In<T>(x),
                         In<T>(kernel),
                         In<float>(bias),
                         ln ? In<float>(ln_scale) : nullptr,
                         ln ? In<float>(ln_bias) : nullptr,
                         res ? In<T>(residual) : nullptr,
                         Out<T>(y),
                         rows,
                         k,
                         n,
                         eps,
                         static_cast<Activation>(act)};
    return run(a);
  });
}

// x, kernel, bias, ln_scale, ln_bias, residual -> y; eps, activation.
template <typename B>
auto BindDecodeDense(B b) {
  return BindBuffers<6, 1>(std::move(b)).template Attr<float>("eps").template Attr<int32_t>("activation");
}

// ------------------------------------------------------------------- CPU --

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeDenseCpuHandler,
    [](Buf x, Buf kernel, Buf bias, Buf ln_scale, Buf ln_bias, Buf residual, Res y, float eps, int32_t act) {
      auto run = [](const auto& a) {
        DecodeDenseCpu(a);
        return xffi::Error::Success();
      };
      return Launch<CpuTypes>(run, x, kernel, bias, ln_scale, ln_bias, residual, y, eps, act);
    },
    BindDecodeDense(xffi::Ffi::Bind()));

LSJAX_FFI_TARGET_CPU("decode_dense", DecodeDenseCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeDenseCudaHandler,
    [](cudaStream_t stream, Buf x, Buf kernel, Buf bias, Buf ln_scale, Buf ln_bias, Buf residual, Res y, float eps,
       int32_t act) {
      auto run = [&](const auto& a) {
        if constexpr (std::is_same_v<std::decay_t<decltype(a)>, DecodeDenseArgs<float>>) {
          return Expect(false, kOp, "the CUDA kernel takes float16 or bfloat16 (float32 runs the reference)");
        } else {
          if (auto e = Expect(a.rows <= kDecodeDenseMaxRows, kOp,
                              "the CUDA kernel takes at most " + std::to_string(kDecodeDenseMaxRows) +
                                  " rows (more run the reference)");
              e.failure())
            return e;
          return CudaStatus(DecodeDenseCuda(a, stream), kOp);
        }
      };
      return Launch<CudaTypes>(run, x, kernel, bias, ln_scale, ln_bias, residual, y, eps, act);
    },
    BindDecodeDense(xffi::Ffi::Bind().Ctx<xffi::PlatformStream<cudaStream_t>>()),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("decode_dense", DecodeDenseCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
