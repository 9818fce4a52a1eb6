// XLA FFI handlers for layer norm: decode and check buffers, dispatch dtype,
// call csrc/. Targets (each for "cpu" and, when built, "CUDA"):
//   layer_norm_fwd          (x, scale, bias)           -> (y, mean, rstd)
//   layer_norm_residual_fwd (x, residual, scale, bias) -> (y, z, mean, rstd)
//   layer_norm_bwd          (dy, x, scale, mean, rstd)     -> (dx, dscale, dbias, partials)
//   layer_norm_residual_bwd (dy, dz, z, scale, mean, rstd) -> (dz_total, dscale, dbias, partials)
// x/z/y/dy: [..., H] in f32/f16/bf16; scale, bias, dscale, dbias: [H], all four
// float32 or all four the input's dtype;
// mean, rstd: f32 [...]; partials: f32 [2, min(rows, 512), H] workspace for
// the deterministic column sums (written by the CUDA kernels, unused on CPU).
#include <algorithm>

#include "csrc/layer_norm.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

xffi::Error CheckShapes(const char* op, const Buf& x, const Buf* other, const Buf& stat) {
  const auto [rows, cols] = RowsCols(x);
  if (auto e = Expect(x.dimensions().size() >= 1, op, "input must have rank >= 1"); e.failure()) return e;
  if (auto e = Expect(other == nullptr || (other->element_type() == x.element_type() &&
                                           other->element_count() == x.element_count()),
                      op, "residual/cotangent must match the input's shape and dtype");
      e.failure())
    return e;
  return Expect(stat.element_type() == xffi::DataType::F32 &&
                    static_cast<int64_t>(stat.element_count()) == rows,
                op, "mean/rstd must be float32 [rows]");
}

// scale, bias (or their gradients): [hidden] of one dtype, float32 or the input's.
xffi::Error CheckParams(const char* op, const Buf& x, std::initializer_list<const Buf*> params) {
  const int64_t cols = RowsCols(x).second;
  const xffi::DataType dtype = (*params.begin())->element_type();
  for (const Buf* p : params) {
    if (auto e = CheckParam(op, *p, x.element_type(), cols, "scale/bias and their gradients"); e.failure()) return e;
    if (auto e = Expect(p->element_type() == dtype, op, "scale, bias and their gradients must share one dtype");
        e.failure())
      return e;
  }
  return xffi::Error::Success();
}

// Shared body of the forward handlers; `run(args)` launches on the platform.
template <typename Types, typename Run>
xffi::Error Fwd(const char* op, Run&& run, Buf x, const Buf* residual, Buf scale, Buf bias, Res y,
                Res* z, Res mean, Res rstd, float eps) {
  if (auto e = CheckShapes(op, x, residual, *mean); e.failure()) return e;
  if (auto e = CheckShapes(op, x, residual, *rstd); e.failure()) return e;
  if (auto e = CheckParams(op, x, {&scale, &bias}); e.failure()) return e;
  return DispatchFloat<Types>(x.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto [rows, cols] = RowsCols(x);
    LayerNormFwdArgs<T> a{In<T>(x),
                          residual ? In<T>(*residual) : nullptr,
                          Param<T>(&scale),
                          Param<T>(&bias),
                          Out<T>(y),
                          z ? Out<T>(*z) : nullptr,
                          Out<float>(mean),
                          Out<float>(rstd),
                          rows,
                          cols,
                          eps};
    return run(a);
  });
}

template <typename Types, typename Run>
xffi::Error Bwd(const char* op, Run&& run, Buf dy, const Buf* dz_out, Buf z, Buf scale, Buf mean,
                Buf rstd, Res dz, Res dscale, Res dbias, Res partials) {
  if (auto e = CheckShapes(op, z, &dy, mean); e.failure()) return e;
  if (auto e = CheckShapes(op, z, dz_out, rstd); e.failure()) return e;
  if (auto e = CheckParams(op, z, {&scale, &(*dscale), &(*dbias)}); e.failure()) return e;
  const auto [rows, cols] = RowsCols(z);
  const int64_t needed = 2 * std::min(rows, kLayerNormBwdMaxPartials) * cols;
  if (auto e = Expect(partials->element_type() == xffi::DataType::F32 &&
                          static_cast<int64_t>(partials->element_count()) == needed,
                      op, "partials workspace must be float32 [2, min(rows, 512), hidden]");
      e.failure())
    return e;
  return DispatchFloat<Types>(z.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    LayerNormBwdArgs<T> a{In<T>(dy),
                          dz_out ? In<T>(*dz_out) : nullptr,
                          In<T>(z),
                          Param<T>(&scale),
                          In<float>(mean),
                          In<float>(rstd),
                          Out<T>(dz),
                          ParamOut<T>(&dscale),
                          ParamOut<T>(&dbias),
                          Out<float>(partials),
                          rows,
                          cols};
    return run(a);
  });
}

// ------------------------------------------------------------------- CPU --

auto RunFwdCpu = [](const auto& a) {
  LayerNormFwdCpu(a);
  return xffi::Error::Success();
};
auto RunBwdCpu = [](const auto& a) {
  LayerNormBwdCpu(a);
  return xffi::Error::Success();
};

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormFwdCpuHandler,
    [](Buf x, Buf scale, Buf bias, Res y, Res mean, Res rstd, float eps) {
      return Fwd<CpuTypes>("layer_norm_fwd", RunFwdCpu, x, nullptr, scale, bias, y, nullptr, mean,
                           rstd, eps);
    },
    xffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Arg<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>().Attr<float>(
        "eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormResidualFwdCpuHandler,
    [](Buf x, Buf residual, Buf scale, Buf bias, Res y, Res z, Res mean, Res rstd, float eps) {
      return Fwd<CpuTypes>("layer_norm_residual_fwd", RunFwdCpu, x, &residual, scale, bias, y, &z,
                           mean, rstd, eps);
    },
    xffi::Ffi::Bind()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormBwdCpuHandler,
    [](Buf dy, Buf x, Buf scale, Buf mean, Buf rstd, Res dx, Res dscale, Res dbias, Res partials) {
      return Bwd<CpuTypes>("layer_norm_bwd", RunBwdCpu, dy, nullptr, x, scale, mean, rstd, dx,
                           dscale, dbias, partials);
    },
    xffi::Ffi::Bind()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormResidualBwdCpuHandler,
    [](Buf dy, Buf dz_out, Buf z, Buf scale, Buf mean, Buf rstd, Res dz, Res dscale, Res dbias,
       Res partials) {
      return Bwd<CpuTypes>("layer_norm_residual_bwd", RunBwdCpu, dy, &dz_out, z, scale, mean, rstd,
                           dz, dscale, dbias, partials);
    },
    xffi::Ffi::Bind()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CPU("layer_norm_fwd", LayerNormFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("layer_norm_residual_fwd", LayerNormResidualFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("layer_norm_bwd", LayerNormBwdCpuHandler);
LSJAX_FFI_TARGET_CPU("layer_norm_residual_bwd", LayerNormResidualBwdCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

auto RunFwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) { return CudaStatus(LayerNormFwdCuda(a, stream), "layer_norm_fwd"); };
}

auto RunBwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) { return CudaStatus(LayerNormBwdCuda(a, stream), "layer_norm_bwd"); };
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormFwdCudaHandler,
    [](cudaStream_t stream, Buf x, Buf scale, Buf bias, Res y, Res mean, Res rstd, float eps) {
      return Fwd<CudaTypes>("layer_norm_fwd", RunFwdCuda(stream), x, nullptr, scale, bias, y,
                            nullptr, mean, rstd, eps);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("eps"),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormResidualFwdCudaHandler,
    [](cudaStream_t stream, Buf x, Buf residual, Buf scale, Buf bias, Res y, Res z, Res mean,
       Res rstd, float eps) {
      return Fwd<CudaTypes>("layer_norm_residual_fwd", RunFwdCuda(stream), x, &residual, scale,
                            bias, y, &z, mean, rstd, eps);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("eps"),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf x, Buf scale, Buf mean, Buf rstd, Res dx, Res dscale,
       Res dbias, Res partials) {
      return Bwd<CudaTypes>("layer_norm_bwd", RunBwdCuda(stream), dy, nullptr, x, scale, mean, rstd,
                            dx, dscale, dbias, partials);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LayerNormResidualBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf dz_out, Buf z, Buf scale, Buf mean, Buf rstd, Res dz,
       Res dscale, Res dbias, Res partials) {
      return Bwd<CudaTypes>("layer_norm_residual_bwd", RunBwdCuda(stream), dy, &dz_out, z, scale,
                            mean, rstd, dz, dscale, dbias, partials);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("layer_norm_fwd", LayerNormFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("layer_norm_residual_fwd", LayerNormResidualFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("layer_norm_bwd", LayerNormBwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("layer_norm_residual_bwd", LayerNormResidualBwdCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
