// XLA FFI handler for the fused Adam update. Target (for "cpu" and, when
// built, "CUDA"):
//   adam_update (param, grad, m, v, scalars) -> (new_param, new_m, new_v)
// param/new_param: any shape, f32/f16/bf16; grad: same shape, f32/f16/bf16;
// m, v, new_m, new_v: f32, same shape (the Python wrapper aliases m -> new_m and
// v -> new_v); scalars: f32[kNumAdamScalars] (csrc/adam_update.h).
#include <string>

#include "csrc/adam_update.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

constexpr const char* kOp = "adam_update";

xffi::Error CheckShapes(const Buf& param, const Buf& grad, const Buf& m, const Buf& v,
                        const Buf& scalars, Res& new_param, Res& new_m,
                        Res& new_v) {
  const size_t n = param.element_count();
  const bool same = grad.element_count() == n && m.element_count() == n && v.element_count() == n &&
                    new_param->element_count() == n && new_m->element_count() == n &&
                    new_v->element_count() == n;
  if (auto e = Expect(same, kOp, "grad, m, v and the outputs must have the param's shape"); e.failure())
    return e;
  const auto f32 = xffi::DataType::F32;
  if (auto e = Expect(m.element_type() == f32 && v.element_type() == f32 &&
                          new_m->element_type() == f32 && new_v->element_type() == f32,
                      kOp, "moments must be float32");
      e.failure())
    return e;
  if (auto e = Expect(new_param->element_type() == param.element_type(), kOp,
                      "new_param must have the param's dtype");
      e.failure())
    return e;
  return Expect(scalars.element_type() == f32 && scalars.element_count() == kNumAdamScalars, kOp,
                "scalars must be float32[" + std::to_string(kNumAdamScalars) + "]");
}

// Dispatches (param dtype, grad dtype) and calls run(args).
template <typename Types, typename Run>
xffi::Error Update(Run&& run, Buf param, Buf grad, Buf m, Buf v, Buf scalars, Res new_param,
                   Res new_m, Res new_v) {
  if (auto e = CheckShapes(param, grad, m, v, scalars, new_param, new_m, new_v); e.failure()) return e;
  return DispatchFloat<Types>(param.element_type(), kOp, [&](auto ptag) {
    return DispatchFloat<Types>(grad.element_type(), kOp, [&](auto gtag) {
      using P = typename decltype(ptag)::type;
      using G = typename decltype(gtag)::type;
      AdamUpdateArgs<P, G> a{In<P>(param),     In<G>(grad),   In<float>(m),
                             In<float>(v),     In<float>(scalars), Out<P>(new_param),
                             Out<float>(new_m), Out<float>(new_v),
                             static_cast<int64_t>(param.element_count())};
      return run(a);
    });
  });
}

auto Bind() {
  return xffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AdamUpdateCpuHandler,
    [](Buf param, Buf grad, Buf m, Buf v, Buf scalars, Res new_param, Res new_m, Res new_v) {
      auto run = [](const auto& a) {
        AdamUpdateCpu(a);
        return xffi::Error::Success();
      };
      return Update<CpuTypes>(run, param, grad, m, v, scalars, new_param, new_m, new_v);
    },
    Bind());

LSJAX_FFI_TARGET_CPU(kOp, AdamUpdateCpuHandler);

#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AdamUpdateCudaHandler,
    [](cudaStream_t stream, Buf param, Buf grad, Buf m, Buf v, Buf scalars, Res new_param,
       Res new_m, Res new_v) {
      auto run = [stream](const auto& a) { return CudaStatus(AdamUpdateCuda(a, stream), kOp); };
      return Update<CudaTypes>(run, param, grad, m, v, scalars, new_param, new_m, new_v);
    },
    xffi::Ffi::Bind()
        .Ctx<xffi::PlatformStream<cudaStream_t>>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA(kOp, AdamUpdateCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
