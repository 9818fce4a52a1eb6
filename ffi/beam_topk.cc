// XLA FFI handlers for the beam-search top-k (csrc/beam_topk.h). Targets:
//   beam_topk (logits [B, beam, V] f32/f16/bf16, scores f32 [B, beam])
//     -> values f32 [B, k], indices s32 [B, k]                       ("cpu")
//     -> values, indices, lists u32 [B, beam * C * k * 2],
//        partials f32 [B, beam * C * 2]   (workspace, C = ceil(V / 1024), "CUDA")
// k is read from the output shapes.
#include <string>

#include "csrc/beam_topk.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

constexpr const char* kOp = "beam_topk";

xffi::Error CheckShapes(const Buf& logits, const Buf& scores, Res& values, Res& indices) {
  const auto d = logits.dimensions();
  if (auto e = Expect(d.size() == 3 && d[0] >= 1 && d[1] >= 1 && d[2] >= 1, kOp,
                      "logits must be a non-empty [batch, beam, vocab] array");
      e.failure())
    return e;
  if (auto e = Expect(scores.element_type() == xffi::DataType::F32 &&
                          static_cast<int64_t>(scores.element_count()) == d[0] * d[1],
                      kOp, "scores must be float32 [batch, beam]");
      e.failure())
    return e;
  const auto vd = values->dimensions();
  const bool ok = vd.size() == 2 && vd[0] == d[0] && vd[1] >= 1 && vd[1] <= d[1] * d[2] &&
                  values->element_type() == xffi::DataType::F32 &&
                  indices->element_type() == xffi::DataType::S32 &&
                  indices->element_count() == values->element_count() && d[1] * d[2] <= INT32_MAX;
  return Expect(ok, kOp, "values/indices must be float32/int32 [batch, k] with 1 <= k <= beam * vocab < 2^31");
}

template <typename Types, typename Run>
xffi::Error Launch(Run&& run, const Buf& logits, const Buf& scores, Res& values, Res& indices) {
  if (auto e = CheckShapes(logits, scores, values, indices); e.failure()) return e;
  return DispatchFloat<Types>(logits.element_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto d = logits.dimensions();
    BeamTopkArgs<T> a{In<T>(logits), In<float>(scores), Out<float>(values), Out<int32_t>(indices),
                      d[0],          d[1],              d[2],               values->dimensions()[1]};
    return run(a);
  });
}

// ------------------------------------------------------------------- CPU --

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BeamTopkCpuHandler,
    [](Buf logits, Buf scores, Res values, Res indices) {
      auto run = [](const auto& a) {
        BeamTopkCpu(a);
        return xffi::Error::Success();
      };
      return Launch<CpuTypes>(run, logits, scores, values, indices);
    },
    xffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Ret<Buf>().Ret<Buf>());

LSJAX_FFI_TARGET_CPU("beam_topk", BeamTopkCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

xffi::Error BeamTopkCudaImpl(cudaStream_t stream, Buf logits, Buf scores, Res values, Res indices, Res lists,
                             Res partials) {
  const auto d = logits.dimensions();
  if (auto e = CheckShapes(logits, scores, values, indices); e.failure()) return e;
  const int64_t k = values->dimensions()[1], chunks = (d[2] + kBeamTopkChunk - 1) / kBeamTopkChunk;
  const int64_t n_lists = d[0] * d[1] * chunks;
  if (auto e = Expect(k <= kBeamTopkMaxK && d[1] <= kBeamTopkMaxBeam && d[1] * chunks <= kBeamTopkMaxLists, kOp,
                      "the CUDA kernel needs k <= 64, beam <= 1024 and beam * ceil(vocab / 1024) <= 4096");
      e.failure())
    return e;
  const bool ok = lists->element_type() == xffi::DataType::U32 &&
                  static_cast<int64_t>(lists->element_count()) == n_lists * k * 2 &&
                  partials->element_type() == xffi::DataType::F32 &&
                  static_cast<int64_t>(partials->element_count()) == n_lists * 2;
  if (auto e = Expect(ok, kOp, "workspace outputs have the wrong shapes"); e.failure()) return e;
  const BeamTopkWorkspace w{Out<uint64_t>(lists), Out<float>(partials), chunks};
  auto run = [&](const auto& a) { return CudaStatus(BeamTopkCuda(a, w, stream), kOp); };
  return Launch<CudaTypes>(run, logits, scores, values, indices);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BeamTopkCudaHandler, BeamTopkCudaImpl,
    xffi::Ffi::Bind()
        .Ctx<xffi::PlatformStream<cudaStream_t>>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("beam_topk", BeamTopkCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
