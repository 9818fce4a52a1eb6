// XLA FFI handler for the multi-tensor Adam update. Target (for "cpu" and,
// when built, "CUDA"), for k leaves:
//   adam_update_multi (scalars, apply, params[k]..., grads[k]..., mus[k]..., nus[k]...)
//     -> (new_params[k]..., new_mus[k]..., new_nus[k]...)
//   attribute decay: int32[k], leaf i takes weight decay iff decay[i] != 0.
// All params share one dtype (f32/f16/bf16), all grads one dtype; leaf i's
// grad, moments and outputs have param i's element count; moments f32 (the
// Python wrapper aliases mus -> new_mus and nus -> new_nus); new params in the
// params' dtype; scalars: f32[kNumAdamScalars] (csrc/adam_update.h); apply:
// int32[], 0 = write nothing (a skipped step: the Python wrapper then aliases
// every output to its input, so they keep the old values).
#include <string>
#include <vector>

#include "csrc/adam_update_multi.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

using Decay = xffi::Span<const int32_t>;

constexpr const char* kOp = "adam_update_multi";

// The k leaves' operands and results: 7 lists (param, grad, m, v, new_param, new_m, new_v) of k.
using Leaves = std::vector<std::vector<Buf>>;
enum LeafList { kParam, kGrad, kM, kV, kNewParam, kNewM, kNewV, kNumLists };

xffi::Error Collect(const xffi::RemainingArgs& args, const xffi::RemainingRets& rets, size_t k,
                    Leaves& leaves) {
  if (auto e = Expect(k > 0 && args.size() == 4 * k && rets.size() == 3 * k, kOp,
                      "expected 4k operands after the scalars and 3k results for k = len(decay) = " +
                          std::to_string(k) + ", got " + std::to_string(args.size()) + " and " +
                          std::to_string(rets.size()));
      e.failure())
    return e;
  leaves.assign(kNumLists, {});
  for (size_t j = 0; j < 4 * k; ++j) {
    auto buf = args.get<Buf>(j);
    if (!buf.has_value()) return buf.error();
    leaves[kParam + j / k].push_back(*buf);
  }
  for (size_t j = 0; j < 3 * k; ++j) {
    auto buf = rets.get<Buf>(j);
    if (!buf.has_value()) return buf.error();
    leaves[kNewParam + j / k].push_back(**buf);
  }
  return xffi::Error::Success();
}

xffi::Error Check(const Buf& scalars, const Buf& apply, const Leaves& leaves) {
  const auto f32 = xffi::DataType::F32;
  if (auto e = Expect(scalars.element_type() == f32 && scalars.element_count() == kNumAdamScalars, kOp,
                      "scalars must be float32[" + std::to_string(kNumAdamScalars) + "]");
      e.failure())
    return e;
  if (auto e = Expect(apply.element_type() == xffi::DataType::S32 && apply.element_count() == 1, kOp,
                      "apply must be an int32 scalar");
      e.failure())
    return e;
  const auto ptype = leaves[kParam][0].element_type(), gtype = leaves[kGrad][0].element_type();
  for (size_t i = 0; i < leaves[kParam].size(); ++i) {
    const std::string leaf = "leaf " + std::to_string(i) + ": ";
    const size_t n = leaves[kParam][i].element_count();
    bool same = true;
    for (const auto& list : leaves) same = same && list[i].element_count() == n;
    if (auto e = Expect(same, kOp, leaf + "grad, m, v and the outputs must have the param's shape"); e.failure())
      return e;
    if (auto e = Expect(leaves[kParam][i].element_type() == ptype && leaves[kNewParam][i].element_type() == ptype &&
                            leaves[kGrad][i].element_type() == gtype,
                        kOp, leaf + "all params (and new params) must share one dtype, all grads one dtype");
        e.failure())
      return e;
    for (int list : {kM, kV, kNewM, kNewV}) {
      if (auto e = Expect(leaves[list][i].element_type() == f32, kOp, leaf + "moments must be float32"); e.failure())
        return e;
    }
  }
  return xffi::Error::Success();
}

// Checks the call, dispatches (param dtype, grad dtype) and calls run(tensors, decay, k, apply).
template <typename Types, typename Run>
xffi::Error UpdateMulti(Run&& run, Buf scalars, Buf apply, xffi::RemainingArgs args, xffi::RemainingRets rets,
                        Decay decay) {
  Leaves leaves;
  if (auto e = Collect(args, rets, decay.size(), leaves); e.failure()) return e;
  if (auto e = Check(scalars, apply, leaves); e.failure()) return e;
  return DispatchFloat<Types>(leaves[kParam][0].element_type(), kOp, [&](auto ptag) {
    return DispatchFloat<Types>(leaves[kGrad][0].element_type(), kOp, [&](auto gtag) {
      using P = typename decltype(ptag)::type;
      using G = typename decltype(gtag)::type;
      std::vector<AdamUpdateArgs<P, G>> tensors;
      for (size_t i = 0; i < decay.size(); ++i) {
        auto at = [&](int list) { return leaves[list][i].untyped_data(); };
        tensors.push_back({static_cast<const P*>(at(kParam)), static_cast<const G*>(at(kGrad)),
                           static_cast<const float*>(at(kM)), static_cast<const float*>(at(kV)),
                           In<float>(scalars), static_cast<P*>(at(kNewParam)), static_cast<float*>(at(kNewM)),
                           static_cast<float*>(at(kNewV)), static_cast<int64_t>(leaves[kParam][i].element_count())});
      }
      return run(tensors.data(), decay.begin(), static_cast<int64_t>(tensors.size()), In<int32_t>(apply));
    });
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AdamUpdateMultiCpuHandler,
    [](Buf scalars, Buf apply, xffi::RemainingArgs args, xffi::RemainingRets rets, Decay decay) {
      auto run = [](const auto* tensors, const int32_t* flags, int64_t k, const int32_t* apply) {
        AdamUpdateMultiCpu(tensors, flags, k, apply);
        return xffi::Error::Success();
      };
      return UpdateMulti<CpuTypes>(run, scalars, apply, args, rets, decay);
    },
    xffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().RemainingArgs().RemainingRets().Attr<Decay>("decay"));

LSJAX_FFI_TARGET_CPU(kOp, AdamUpdateMultiCpuHandler);

#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AdamUpdateMultiCudaHandler,
    [](cudaStream_t stream, Buf scalars, Buf apply, xffi::RemainingArgs args, xffi::RemainingRets rets,
       Decay decay) {
      auto run = [stream](const auto* tensors, const int32_t* flags, int64_t k, const int32_t* apply) {
        return CudaStatus(AdamUpdateMultiCuda(tensors, flags, k, apply, stream), kOp);
      };
      return UpdateMulti<CudaTypes>(run, scalars, apply, args, rets, decay);
    },
    xffi::Ffi::Bind()
        .Ctx<xffi::PlatformStream<cudaStream_t>>()
        .Arg<Buf>()
        .Arg<Buf>()
        .RemainingArgs()
        .RemainingRets()
        .Attr<Decay>("decay"),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA(kOp, AdamUpdateMultiCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
