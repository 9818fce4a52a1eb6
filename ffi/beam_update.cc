// XLA FFI handlers for the beam-search step bookkeeping (csrc/beam_update.h). Target:
//   beam_update (cand_scores f32 [B, 2k], cand_idx s32 [B, 2k], alive_seqs s32 [B, k, T],
//                finished_seqs s32 [B, k, T], finished_scores f32 [B, k], finished_flags pred [B, k],
//                step s32 [], inv_penalty f32 [] or [n]: entry min(step, n - 1))
//     -> alive_tokens s32 [B, k], alive_parents s32 [B, k], alive_scores f32 [B, k],
//        alive_seqs, finished_seqs, finished_scores, finished_flags (aliased to the operands);
//   attributes vocab, eos_id (int64).
#include <string>

#include "csrc/beam_update.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

using xffi::DataType;
constexpr const char* kOp = "beam_update";

bool Is(const Buf& b, DataType type, int64_t count) {
  return b.element_type() == type && static_cast<int64_t>(b.element_count()) == count;
}

// Checks the buffers, copies each in-place operand into its result where XLA handed a different
// buffer (on `stream` when not null), then runs run(args).
template <typename Run>
xffi::Error Launch(Run&& run, void* stream, const Buf& cand_scores, const Buf& cand_idx, const Buf& alive_in,
                   const Buf& finished_in, const Buf& scores_in, const Buf& flags_in, const Buf& step,
                   const Buf& inv_penalty, Res& tokens, Res& parents, Res& alive_scores, Res& alive, Res& finished,
                   Res& finished_scores, Res& finished_flags, int64_t vocab, int64_t eos_id, int64_t max_beam) {
  const auto sd = alive_in.dimensions();
  if (auto e = Expect(sd.size() == 3 && sd[1] >= 1 && sd[1] <= max_beam, kOp,
                      "alive_seqs must be int32 [batch, k, max_len] with 1 <= k <= " + std::to_string(max_beam));
      e.failure())
    return e;
  const int64_t batch = sd[0], k = sd[1], T = sd[2];
  const bool ok = Is(cand_scores, DataType::F32, batch * 2 * k) && Is(cand_idx, DataType::S32, batch * 2 * k) &&
                  Is(alive_in, DataType::S32, batch * k * T) && Is(finished_in, DataType::S32, batch * k * T) &&
                  Is(scores_in, DataType::F32, batch * k) && Is(flags_in, DataType::PRED, batch * k) &&
                  Is(step, DataType::S32, 1) && inv_penalty.element_type() == DataType::F32 &&
                  inv_penalty.element_count() >= 1 &&
                  Is(*tokens, DataType::S32, batch * k) && Is(*parents, DataType::S32, batch * k) &&
                  Is(*alive_scores, DataType::F32, batch * k) && Is(*alive, DataType::S32, batch * k * T) &&
                  Is(*finished, DataType::S32, batch * k * T) && Is(*finished_scores, DataType::F32, batch * k) &&
                  Is(*finished_flags, DataType::PRED, batch * k) && vocab >= 1;
  if (auto e = Expect(ok, kOp, "buffers do not match [batch, 2k] candidates and [batch, k(, max_len)] beams"); e.failure())
    return e;
  if (auto e = CopyIntoAliased({{&alive_in, &alive}, {&finished_in, &finished}, {&scores_in, &finished_scores},
                                 {&flags_in, &finished_flags}},
                                stream);
      e.failure())
    return e;
  BeamUpdateArgs a{In<float>(cand_scores), In<int32_t>(cand_idx), Out<int32_t>(alive), Out<int32_t>(finished),
                   Out<float>(finished_scores), Out<bool>(finished_flags), In<int32_t>(step),
                   In<float>(inv_penalty), Out<int32_t>(tokens), Out<int32_t>(parents), Out<float>(alive_scores),
                   batch, k, T, vocab, eos_id};
  a.penalties = static_cast<int64_t>(inv_penalty.element_count());
  return run(a);
}

template <typename B>
auto BindBeamUpdate(B b) {
  return BindBuffers<8, 7>(std::move(b)).template Attr<int64_t>("vocab").template Attr<int64_t>("eos_id");
}

// ------------------------------------------------------------------- CPU --

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BeamUpdateCpuHandler,
    [](Buf cs, Buf ci, Buf al, Buf fi, Buf fs, Buf ff, Buf step, Buf pen, Res tok, Res par, Res asc, Res alo,
       Res fio, Res fso, Res ffo, int64_t vocab, int64_t eos_id) {
      auto run = [](const BeamUpdateArgs& a) {
        BeamUpdateCpu(a);
        return xffi::Error::Success();
      };
      return Launch(run, nullptr, cs, ci, al, fi, fs, ff, step, pen, tok, par, asc, alo, fio, fso, ffo, vocab, eos_id,
                    INT32_MAX);
    },
    BindBeamUpdate(xffi::Ffi::Bind()));

LSJAX_FFI_TARGET_CPU("beam_update", BeamUpdateCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BeamUpdateCudaHandler,
    [](cudaStream_t stream, Buf cs, Buf ci, Buf al, Buf fi, Buf fs, Buf ff, Buf step, Buf pen, Res tok, Res par,
       Res asc, Res alo, Res fio, Res fso, Res ffo, int64_t vocab, int64_t eos_id) {
      auto run = [&](const BeamUpdateArgs& a) { return CudaStatus(BeamUpdateCuda(a, stream), kOp); };
      return Launch(run, stream, cs, ci, al, fi, fs, ff, step, pen, tok, par, asc, alo, fio, fso, ffo, vocab, eos_id,
                    kBeamUpdateMaxBeam);
    },
    BindBeamUpdate(xffi::Ffi::Bind().Ctx<xffi::PlatformStream<cudaStream_t>>()),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("beam_update", BeamUpdateCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
