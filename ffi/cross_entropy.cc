// XLA FFI handlers for softmax cross-entropy with label smoothing: decode and
// check buffers, dispatch dtype, call csrc/. Targets (each for "cpu" and, when
// built, "CUDA"):
//   cross_entropy_fwd (logits, labels)             -> (loss, lse)
//   cross_entropy_bwd (logits, labels, lse, dloss) -> dlogits
// logits/dlogits: [..., V] in f32/f16/bf16; labels: s32 [...]; loss, lse,
// dloss: f32 [...]. Attributes: label_smoothing (f32), ignore_id (s32).
#include <initializer_list>
#include <string>

#include "csrc/cross_entropy.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

// Checks logits [rows, V] (rank >= 1), labels s32 [rows] and f32 [rows] per-row buffers.
xffi::Error CheckShapes(const char* op, const Buf& logits, const Buf& labels,
                        std::initializer_list<const Buf*> per_row_f32) {
  const auto [rows, vocab] = RowsCols(logits);
  if (auto e = Expect(logits.dimensions().size() >= 1 && vocab >= 1, op,
                      "logits must have rank >= 1 and a non-empty vocab axis");
      e.failure())
    return e;
  if (auto e = Expect(vocab <= INT32_MAX, op, "vocab must fit int32 labels"); e.failure()) return e;
  if (auto e = Expect(labels.element_type() == xffi::DataType::S32 &&
                          static_cast<int64_t>(labels.element_count()) == rows,
                      op, "labels must be int32 [rows]");
      e.failure())
    return e;
  for (const Buf* b : per_row_f32) {
    if (auto e = Expect(b->element_type() == xffi::DataType::F32 &&
                            static_cast<int64_t>(b->element_count()) == rows,
                        op, "loss/lse/dloss must be float32 [rows]");
        e.failure())
      return e;
  }
  return xffi::Error::Success();
}

// Shared body of the forward handlers; `run(args)` launches on the platform.
template <typename Types, typename Run>
xffi::Error Fwd(const char* op, Run&& run, Buf logits, Buf labels, Res loss, Res lse, float eps,
                int32_t ignore_id) {
  if (auto e = CheckShapes(op, logits, labels, {&*loss, &*lse}); e.failure()) return e;
  return DispatchFloat<Types>(logits.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto [rows, vocab] = RowsCols(logits);
    CrossEntropyFwdArgs<T> a{In<T>(logits),       In<int32_t>(labels), Out<float>(loss),
                             Out<float>(lse),     rows,                vocab,
                             eps,                 ignore_id};
    return run(a);
  });
}

template <typename Types, typename Run>
xffi::Error Bwd(const char* op, Run&& run, Buf logits, Buf labels, Buf lse, Buf dloss,
                Res dlogits, float eps, int32_t ignore_id) {
  if (auto e = CheckShapes(op, logits, labels, {&lse, &dloss}); e.failure()) return e;
  if (auto e = Expect(dlogits->element_type() == logits.element_type() &&
                          dlogits->element_count() == logits.element_count(),
                      op, "dlogits must match the logits' shape and dtype");
      e.failure())
    return e;
  return DispatchFloat<Types>(logits.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto [rows, vocab] = RowsCols(logits);
    CrossEntropyBwdArgs<T> a{In<T>(logits), In<int32_t>(labels), In<float>(lse),
                             In<float>(dloss), Out<T>(dlogits),  rows,
                             vocab,            eps,              ignore_id};
    return run(a);
  });
}

// ------------------------------------------------------------------- CPU --

auto RunFwdCpu = [](const auto& a) {
  CrossEntropyFwdCpu(a);
  return xffi::Error::Success();
};
auto RunBwdCpu = [](const auto& a) {
  CrossEntropyBwdCpu(a);
  return xffi::Error::Success();
};

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CrossEntropyFwdCpuHandler,
    [](Buf logits, Buf labels, Res loss, Res lse, float eps, int32_t ignore_id) {
      return Fwd<CpuTypes>("cross_entropy_fwd", RunFwdCpu, logits, labels, loss, lse, eps,
                           ignore_id);
    },
    xffi::Ffi::Bind()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("label_smoothing")
        .Attr<int32_t>("ignore_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CrossEntropyBwdCpuHandler,
    [](Buf logits, Buf labels, Buf lse, Buf dloss, Res dlogits, float eps, int32_t ignore_id) {
      return Bwd<CpuTypes>("cross_entropy_bwd", RunBwdCpu, logits, labels, lse, dloss, dlogits,
                           eps, ignore_id);
    },
    xffi::Ffi::Bind()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Attr<float>("label_smoothing")
        .Attr<int32_t>("ignore_id"));

LSJAX_FFI_TARGET_CPU("cross_entropy_fwd", CrossEntropyFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("cross_entropy_bwd", CrossEntropyBwdCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

auto RunFwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) {
    return CudaStatus(CrossEntropyFwdCuda(a, stream), "cross_entropy_fwd");
  };
}
auto RunBwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) {
    return CudaStatus(CrossEntropyBwdCuda(a, stream), "cross_entropy_bwd");
  };
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CrossEntropyFwdCudaHandler,
    [](cudaStream_t stream, Buf logits, Buf labels, Res loss, Res lse, float eps,
       int32_t ignore_id) {
      return Fwd<CudaTypes>("cross_entropy_fwd", RunFwdCuda(stream), logits, labels, loss, lse,
                            eps, ignore_id);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("label_smoothing")
        .Attr<int32_t>("ignore_id"),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CrossEntropyBwdCudaHandler,
    [](cudaStream_t stream, Buf logits, Buf labels, Buf lse, Buf dloss, Res dlogits, float eps,
       int32_t ignore_id) {
      return Bwd<CudaTypes>("cross_entropy_bwd", RunBwdCuda(stream), logits, labels, lse, dloss,
                            dlogits, eps, ignore_id);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Attr<float>("label_smoothing")
        .Attr<int32_t>("ignore_id"),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("cross_entropy_fwd", CrossEntropyFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("cross_entropy_bwd", CrossEntropyBwdCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
