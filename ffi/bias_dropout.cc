// XLA FFI handlers for bias + activation + dropout (+ residual): decode and
// check buffers, dispatch dtype, call csrc/. Targets (each for "cpu" and,
// when built, "CUDA"; attrs: rate f32, row_stride i64, activation i32 where listed):
//   bias_dropout_residual_fwd (x, bias, residual, rng) -> y
//   bias_dropout_residual_bwd (dy, rng)                -> (dx, dbias, partials)
//   bias_act_dropout_fwd      (x, bias, rng)           -> y          [activation]
//   bias_act_dropout_bwd      (dy, saved, bias, rng)   -> (dx, dbias, partials) [activation]
//   dropout_fwd               (x, rng)                 -> y
//   dropout_bwd               (dy, rng)                -> dx
// x/y/dy/dx/residual/saved: [..., H] in f32/f16/bf16; bias, dbias: [H], f32 or the input's dtype;
// saved: the forward's y for relu, its x for the gelus (csrc/bias_dropout.h);
// rng: u32[4] (ignored when rate == 0); row_stride >= H: element (r, c) of the
// [rows, H] view draws Philox element r * row_stride + c plus the rng offset
// (csrc/bias_dropout.h); partials: f32 [ColumnSumPartialRows(rows), H]
// workspace for the deterministic dbias (CUDA only). Activation codes: csrc/bias_dropout.h.
#include <optional>
#include <string>
#include <utility>

#include "csrc/bias_dropout.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

xffi::Error CheckCommon(const char* op, const Buf& x, const Buf* bias, const Buf& rng, float rate,
                        int64_t row_stride, int32_t act) {
  const int64_t cols = RowsCols(x).second;
  if (auto e = Expect(x.dimensions().size() >= 1, op, "input must have rank >= 1"); e.failure()) return e;
  if (bias) {
    if (auto e = CheckParam(op, *bias, x.element_type(), cols, "bias"); e.failure()) return e;
  }
  if (auto e = Expect(rng.element_type() == xffi::DataType::U32 && rng.element_count() == 4, op,
                      "rng must be uint32[4]");
      e.failure())
    return e;
  if (auto e = Expect(rate >= 0.f && rate < 1.f, op, "rate must be in [0, 1)"); e.failure()) return e;
  if (auto e = Expect(row_stride >= cols, op, "row_stride must be >= the last dim"); e.failure()) return e;
  return Expect(KnownActivation(act), op, "unknown activation code");
}

xffi::Error CheckLike(const char* op, const Buf& x, const Buf& other, const char* what) {
  return Expect(other.element_type() == x.element_type() && other.element_count() == x.element_count(), op,
                std::string(what) + " must match the input's shape and dtype");
}

// Shared body of the forward handlers; `run(args)` launches on the platform.
template <typename Types, typename Run>
xffi::Error Fwd(const char* op, Run&& run, Buf x, const Buf* bias, const Buf* residual, Buf rng, Res y,
                float rate, int64_t row_stride, int32_t act) {
  if (auto e = CheckCommon(op, x, bias, rng, rate, row_stride, act); e.failure()) return e;
  if (residual) {
    if (auto e = CheckLike(op, x, *residual, "residual"); e.failure()) return e;
  }
  if (auto e = CheckLike(op, x, *y, "output"); e.failure()) return e;
  return DispatchFloat<Types>(x.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto [rows, cols] = RowsCols(x);
    BiasDropoutFwdArgs<T> a{In<T>(x),
                            Param<T>(bias),
                            residual ? In<T>(*residual) : nullptr,
                            In<uint32_t>(rng),
                            Out<T>(y),
                            rows,
                            cols,
                            row_stride,
                            rate,
                            static_cast<Activation>(act)};
    return run(a);
  });
}

template <typename Types, typename Run>
xffi::Error Bwd(const char* op, Run&& run, Buf dy, const Buf* saved, const Buf* bias, Buf rng, Res dx,
                Res* dbias, Res* partials, float rate, int64_t row_stride, int32_t act) {
  if (auto e = CheckCommon(op, dy, bias, rng, rate, row_stride, act); e.failure()) return e;
  if (saved) {
    if (auto e = CheckLike(op, dy, *saved, "saved"); e.failure()) return e;
  }
  if (auto e = CheckLike(op, dy, *dx, "dx"); e.failure()) return e;
  if (dbias) {
    const int64_t cols = RowsCols(dy).second;
    if (auto e = CheckParam(op, **dbias, dy.element_type(), cols, "dbias"); e.failure()) return e;
    const int64_t needed = ColumnSumPartialRows(RowsCols(dy).first) * cols;
    if (auto e = Expect(partials && (*partials)->element_type() == xffi::DataType::F32 &&
                            static_cast<int64_t>((*partials)->element_count()) == needed,
                        op, "partials must be float32 [min(512, max(1, rows // 32)), hidden]");
        e.failure())
      return e;
  }
  if (auto e = Expect(act == static_cast<int32_t>(Activation::kIdentity) || saved != nullptr, op,
                      "an activation's backward needs its saved input or output");
      e.failure())
    return e;
  return DispatchFloat<Types>(dy.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto [rows, cols] = RowsCols(dy);
    BiasDropoutBwdArgs<T> a{In<T>(dy),
                            saved ? In<T>(*saved) : nullptr,
                            Param<T>(bias),
                            In<uint32_t>(rng),
                            Out<T>(dx),
                            ParamOut<T>(dbias),
                            dbias ? Out<float>(*partials) : nullptr,
                            rows,
                            cols,
                            row_stride,
                            rate,
                            static_cast<Activation>(act)};
    return run(a);
  });
}

constexpr int32_t kIdentity = static_cast<int32_t>(Activation::kIdentity);

// The six targets' bodies, on a platform (Types) with its launchers.
template <typename Types, typename RunF, typename RunB>
struct Targets {
  RunF fwd;
  RunB bwd;

  xffi::Error BdrFwd(Buf x, Buf bias, Buf residual, Buf rng, Res y, float rate, int64_t stride) {
    return Fwd<Types>("bias_dropout_residual_fwd", fwd, x, &bias, &residual, rng, y, rate, stride, kIdentity);
  }
  xffi::Error BdrBwd(Buf dy, Buf rng, Res dx, Res dbias, Res partials, float rate, int64_t stride) {
    return Bwd<Types>("bias_dropout_residual_bwd", bwd, dy, nullptr, nullptr, rng, dx, &dbias, &partials, rate,
                      stride, kIdentity);
  }
  xffi::Error BadFwd(Buf x, Buf bias, Buf rng, Res y, float rate, int64_t stride, int32_t act) {
    return Fwd<Types>("bias_act_dropout_fwd", fwd, x, &bias, nullptr, rng, y, rate, stride, act);
  }
  xffi::Error BadBwd(Buf dy, Buf saved, Buf bias, Buf rng, Res dx, Res dbias, Res partials, float rate,
                     int64_t stride, int32_t act) {
    return Bwd<Types>("bias_act_dropout_bwd", bwd, dy, &saved, &bias, rng, dx, &dbias, &partials, rate, stride,
                      act);
  }
  xffi::Error DropFwd(Buf x, Buf rng, Res y, float rate, int64_t stride) {
    return Fwd<Types>("dropout_fwd", fwd, x, nullptr, nullptr, rng, y, rate, stride, kIdentity);
  }
  xffi::Error DropBwd(Buf dy, Buf rng, Res dx, float rate, int64_t stride) {
    return Bwd<Types>("dropout_bwd", bwd, dy, nullptr, nullptr, rng, dx, nullptr, nullptr, rate, stride,
                      kIdentity);
  }
};

// Argument/attribute lists of the targets, on ``Bind()`` (CPU) or ``Bind().Ctx<Stream>()`` (CUDA).
template <typename B>
auto BindRate(B b) {
  return std::move(b).template Attr<float>("rate").template Attr<int64_t>("row_stride");
}

template <typename B>
auto BindBdrFwd(B b) {  // x, bias, residual, rng -> y
  return BindRate(BindBuffers<4, 1>(std::move(b)));
}

template <typename B>
auto BindBdrBwd(B b) {  // dy, rng -> dx, dbias, partials
  return BindRate(BindBuffers<2, 3>(std::move(b)));
}

template <typename B>
auto BindBadFwd(B b) {  // x, bias, rng -> y
  return BindRate(BindBuffers<3, 1>(std::move(b))).template Attr<int32_t>("activation");
}

template <typename B>
auto BindBadBwd(B b) {  // dy, saved, bias, rng -> dx, dbias, partials
  return BindRate(BindBuffers<4, 3>(std::move(b))).template Attr<int32_t>("activation");
}

template <typename B>
auto BindDrop(B b) {  // x (or dy), rng -> y (or dx)
  return BindRate(BindBuffers<2, 1>(std::move(b)));
}

// ------------------------------------------------------------------- CPU --

auto RunFwdCpu = [](const auto& a) {
  BiasDropoutFwdCpu(a);
  return xffi::Error::Success();
};
auto RunBwdCpu = [](const auto& a) {
  BiasDropoutBwdCpu(a);
  return xffi::Error::Success();
};

Targets<CpuTypes, decltype(RunFwdCpu), decltype(RunBwdCpu)> Cpu() { return {RunFwdCpu, RunBwdCpu}; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BdrFwdCpuHandler,
    [](Buf x, Buf bias, Buf residual, Buf rng, Res y, float rate, int64_t stride) {
      return Cpu().BdrFwd(x, bias, residual, rng, y, rate, stride);
    },
    BindBdrFwd(xffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BdrBwdCpuHandler,
    [](Buf dy, Buf rng, Res dx, Res dbias, Res partials, float rate, int64_t stride) {
      return Cpu().BdrBwd(dy, rng, dx, dbias, partials, rate, stride);
    },
    BindBdrBwd(xffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BadFwdCpuHandler,
    [](Buf x, Buf bias, Buf rng, Res y, float rate, int64_t stride, int32_t act) {
      return Cpu().BadFwd(x, bias, rng, y, rate, stride, act);
    },
    BindBadFwd(xffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BadBwdCpuHandler,
    [](Buf dy, Buf saved, Buf bias, Buf rng, Res dx, Res dbias, Res partials, float rate, int64_t stride,
       int32_t act) { return Cpu().BadBwd(dy, saved, bias, rng, dx, dbias, partials, rate, stride, act); },
    BindBadBwd(xffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DropFwdCpuHandler,
    [](Buf x, Buf rng, Res y, float rate, int64_t stride) { return Cpu().DropFwd(x, rng, y, rate, stride); },
    BindDrop(xffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DropBwdCpuHandler,
    [](Buf dy, Buf rng, Res dx, float rate, int64_t stride) { return Cpu().DropBwd(dy, rng, dx, rate, stride); },
    BindDrop(xffi::Ffi::Bind()));

LSJAX_FFI_TARGET_CPU("bias_dropout_residual_fwd", BdrFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("bias_dropout_residual_bwd", BdrBwdCpuHandler);
LSJAX_FFI_TARGET_CPU("bias_act_dropout_fwd", BadFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("bias_act_dropout_bwd", BadBwdCpuHandler);
LSJAX_FFI_TARGET_CPU("dropout_fwd", DropFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("dropout_bwd", DropBwdCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

auto RunFwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) { return CudaStatus(BiasDropoutFwdCuda(a, stream), "bias_dropout_fwd"); };
}

auto RunBwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) { return CudaStatus(BiasDropoutBwdCuda(a, stream), "bias_dropout_bwd"); };
}

auto Cuda(cudaStream_t stream) {
  auto fwd = RunFwdCuda(stream);
  auto bwd = RunBwdCuda(stream);
  return Targets<CudaTypes, decltype(fwd), decltype(bwd)>{fwd, bwd};
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BdrFwdCudaHandler,
    [](cudaStream_t stream, Buf x, Buf bias, Buf residual, Buf rng, Res y, float rate, int64_t stride) {
      return Cuda(stream).BdrFwd(x, bias, residual, rng, y, rate, stride);
    },
    BindBdrFwd(xffi::Ffi::Bind().Ctx<Stream>()),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BdrBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf rng, Res dx, Res dbias, Res partials, float rate, int64_t stride) {
      return Cuda(stream).BdrBwd(dy, rng, dx, dbias, partials, rate, stride);
    },
    BindBdrBwd(xffi::Ffi::Bind().Ctx<Stream>()),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BadFwdCudaHandler,
    [](cudaStream_t stream, Buf x, Buf bias, Buf rng, Res y, float rate, int64_t stride, int32_t act) {
      return Cuda(stream).BadFwd(x, bias, rng, y, rate, stride, act);
    },
    BindBadFwd(xffi::Ffi::Bind().Ctx<Stream>()),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BadBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf saved, Buf bias, Buf rng, Res dx, Res dbias, Res partials, float rate,
       int64_t stride, int32_t act) {
      return Cuda(stream).BadBwd(dy, saved, bias, rng, dx, dbias, partials, rate, stride, act);
    },
    BindBadBwd(xffi::Ffi::Bind().Ctx<Stream>()),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DropFwdCudaHandler,
    [](cudaStream_t stream, Buf x, Buf rng, Res y, float rate, int64_t stride) {
      return Cuda(stream).DropFwd(x, rng, y, rate, stride);
    },
    BindDrop(xffi::Ffi::Bind().Ctx<Stream>()),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DropBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf rng, Res dx, float rate, int64_t stride) {
      return Cuda(stream).DropBwd(dy, rng, dx, rate, stride);
    },
    BindDrop(xffi::Ffi::Bind().Ctx<Stream>()),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("bias_dropout_residual_fwd", BdrFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("bias_dropout_residual_bwd", BdrBwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("bias_act_dropout_fwd", BadFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("bias_act_dropout_bwd", BadBwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("dropout_fwd", DropFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("dropout_bwd", DropBwdCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
