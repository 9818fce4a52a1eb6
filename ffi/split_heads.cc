// XLA FFI handlers of split_heads (csrc/split_heads.h): decode and check
// buffers, dispatch dtype, call csrc/. Targets (each for "cpu" and, when
// built, "CUDA"):
//   split_heads_fwd (x[, bias])              -> (out_0, ..., out_{n-1})
//   split_heads_bwd (dout_0, ..., dout_{n-1}) -> (dx[, dbias, partials])
// x, dx: [*batch, length, n, heads, head_dim] in f32/f16/bf16, n in 1..3;
// out_j, dout_j: [*batch, heads, length, head_dim] in x's dtype; bias, dbias:
// [n, heads, head_dim] in float32 or x's dtype; partials: float32
// [ColumnSumPartialRows(rows), n * heads * head_dim] workspace for the
// deterministic dbias (CUDA; unread on CPU), rows = prod(batch) * length < 2^31.
#include <optional>
#include <string>

#include "csrc/split_heads.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

// The dims of x or dx: [*batch, length, n, heads, head_dim].
xffi::Error DimsOf(const char* op, const Buf& x, SplitHeadsDims& d) {
  const auto dims = x.dimensions();
  const size_t rank = dims.size();
  if (auto e = Expect(rank >= 4, op,
                      "x must be [*batch, length, n, heads, head_dim] (rank >= 4), got rank " + std::to_string(rank));
      e.failure())
    return e;
  d.batch = 1;
  for (size_t i = 0; i + 4 < rank; ++i) d.batch *= dims[i];
  d.length = dims[rank - 4];
  d.n = dims[rank - 3];
  d.heads = dims[rank - 2];
  d.head_dim = dims[rank - 1];
  if (auto e = Expect(d.n >= 1 && d.n <= kSplitHeadsMaxN, op,
                      "n (dim -3 of x) must be 1, 2 or 3, got " + std::to_string(d.n));
      e.failure())
    return e;
  return Expect(d.Rows() < (int64_t{1} << 31) && d.Cols() < (int64_t{1} << 31), op,
                "batch * length and n * heads * head_dim must be < 2^31");
}

// t must be [*batch, heads, length, head_dim] in the dtype of x ([*batch, length, n, heads, head_dim]).
xffi::Error CheckHeads(const char* op, const Buf& x, const Buf& t, const std::string& what) {
  const auto xd = x.dimensions(), td = t.dimensions();
  const size_t rank = xd.size();
  bool ok = td.size() + 1 == rank && t.element_type() == x.element_type();
  for (size_t i = 0; ok && i + 4 < rank; ++i) ok = td[i] == xd[i];
  ok = ok && td[rank - 4] == xd[rank - 2] && td[rank - 3] == xd[rank - 4] && td[rank - 2] == xd[rank - 1];
  return Expect(ok, op, what + " must be [*batch, heads, length, head_dim] in x's dtype");
}

// p must be [n, heads, head_dim] of x, in float32 or x's dtype.
xffi::Error CheckParam(const char* op, const Buf& x, const Buf& p, const std::string& what) {
  const auto xd = x.dimensions(), pd = p.dimensions();
  const size_t rank = xd.size();
  const bool shape = pd.size() == 3 && pd[0] == xd[rank - 3] && pd[1] == xd[rank - 2] && pd[2] == xd[rank - 1];
  const bool dtype = p.element_type() == xffi::DataType::F32 || p.element_type() == x.element_type();
  return Expect(shape && dtype, op, what + " must be [n, heads, head_dim] in float32 or x's dtype");
}

// The parameter vector (csrc/param_vec.h) in buf, or none (null data) without one.
template <typename T, typename Void>
ParamVec<T, Void> ParamOf(const Buf* buf) {
  if (buf == nullptr) return {};
  return {buf->untyped_data(), buf->element_type() == xffi::DataType::F32};
}

// Shared body of the forward handlers; `run(args)` launches on the platform.
template <typename Types, typename Run>
xffi::Error Fwd(Run&& run, Buf x, std::optional<Buf> bias, xffi::RemainingRets outs) {
  constexpr const char* op = "split_heads_fwd";
  SplitHeadsDims d;
  if (auto e = DimsOf(op, x, d); e.failure()) return e;
  if (bias) {
    if (auto e = CheckParam(op, x, *bias, "bias"); e.failure()) return e;
  }
  if (auto e = Expect(static_cast<int64_t>(outs.size()) == d.n, op,
                      "expected n = " + std::to_string(d.n) + " results, got " + std::to_string(outs.size()));
      e.failure())
    return e;
  void* out[kSplitHeadsMaxN] = {};
  for (int64_t j = 0; j < d.n; ++j) {
    auto res = outs.get<Buf>(j);
    if (!res.has_value()) return res.error();
    if (auto e = CheckHeads(op, x, **res, "output " + std::to_string(j)); e.failure()) return e;
    out[j] = (*res)->untyped_data();
  }
  return DispatchFloat<Types>(x.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    SplitHeadsFwdArgs<T> a{In<T>(x), ParamOf<T, const void>(bias ? &*bias : nullptr), {}, d};
    for (int64_t j = 0; j < d.n; ++j) a.out[j] = static_cast<T*>(out[j]);
    return run(a);
  });
}

template <typename Types, typename Run>
xffi::Error Bwd(Run&& run, xffi::RemainingArgs douts, Res dx, std::optional<Res> dbias, std::optional<Res> partials) {
  constexpr const char* op = "split_heads_bwd";
  SplitHeadsDims d;
  if (auto e = DimsOf(op, *dx, d); e.failure()) return e;
  if (auto e = Expect(static_cast<int64_t>(douts.size()) == d.n, op,
                      "expected n = " + std::to_string(d.n) + " cotangents, got " + std::to_string(douts.size()));
      e.failure())
    return e;
  const void* dout[kSplitHeadsMaxN] = {};
  for (int64_t j = 0; j < d.n; ++j) {
    auto arg = douts.get<Buf>(j);
    if (!arg.has_value()) return arg.error();
    if (auto e = CheckHeads(op, *dx, *arg, "cotangent " + std::to_string(j)); e.failure()) return e;
    dout[j] = arg->untyped_data();
  }
  if (auto e = Expect(dbias.has_value() == partials.has_value(), op, "dbias and partials come together");
      e.failure())
    return e;
  if (dbias) {
    if (auto e = CheckParam(op, *dx, **dbias, "dbias"); e.failure()) return e;
    const int64_t needed = ColumnSumPartialRows(d.Rows()) * d.Cols();
    if (auto e = Expect((*partials)->element_type() == xffi::DataType::F32 &&
                            static_cast<int64_t>((*partials)->element_count()) == needed,
                        op, "partials must be float32 [min(512, max(1, rows // 32)), n * heads * head_dim]");
        e.failure())
      return e;
  }
  return DispatchFloat<Types>(dx->element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    SplitHeadsBwdArgs<T> a{{}, Out<T>(dx), ParamOf<T, void>(dbias ? &**dbias : nullptr),
                           dbias ? Out<float>(*partials) : nullptr, d};
    for (int64_t j = 0; j < d.n; ++j) a.dout[j] = static_cast<const T*>(dout[j]);
    return run(a);
  });
}

// ------------------------------------------------------------------- CPU --

auto RunFwdCpu = [](const auto& a) {
  SplitHeadsFwdCpu(a);
  return xffi::Error::Success();
};
auto RunBwdCpu = [](const auto& a) {
  SplitHeadsBwdCpu(a);
  return xffi::Error::Success();
};

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FwdCpuHandler,
    [](Buf x, std::optional<Buf> bias, xffi::RemainingRets outs) { return Fwd<CpuTypes>(RunFwdCpu, x, bias, outs); },
    xffi::Ffi::Bind().Arg<Buf>().OptionalArg<Buf>().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BwdCpuHandler,
    [](xffi::RemainingArgs douts, Res dx, std::optional<Res> dbias, std::optional<Res> partials) {
      return Bwd<CpuTypes>(RunBwdCpu, douts, dx, dbias, partials);
    },
    xffi::Ffi::Bind().RemainingArgs().Ret<Buf>().OptionalRet<Buf>().OptionalRet<Buf>());

LSJAX_FFI_TARGET_CPU("split_heads_fwd", FwdCpuHandler);
LSJAX_FFI_TARGET_CPU("split_heads_bwd", BwdCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FwdCudaHandler,
    [](cudaStream_t stream, Buf x, std::optional<Buf> bias, xffi::RemainingRets outs) {
      auto launch = [stream](const auto& a) { return CudaStatus(SplitHeadsFwdCuda(a, stream), "split_heads_fwd"); };
      return Fwd<CudaTypes>(launch, x, bias, outs);
    },
    xffi::Ffi::Bind().Ctx<Stream>().Arg<Buf>().OptionalArg<Buf>().RemainingRets(),
    {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BwdCudaHandler,
    [](cudaStream_t stream, xffi::RemainingArgs douts, Res dx, std::optional<Res> dbias, std::optional<Res> partials) {
      auto launch = [stream](const auto& a) { return CudaStatus(SplitHeadsBwdCuda(a, stream), "split_heads_bwd"); };
      return Bwd<CudaTypes>(launch, douts, dx, dbias, partials);
    },
    xffi::Ffi::Bind().Ctx<Stream>().RemainingArgs().Ret<Buf>().OptionalRet<Buf>().OptionalRet<Buf>(),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("split_heads_fwd", FwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("split_heads_bwd", BwdCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
