// XLA FFI handlers for the attention softmax: decode and check buffers,
// dispatch dtype, call csrc/. Targets (each for "cpu" and, when built, "CUDA"):
//   attention_softmax_fwd (x, mask, rng, origin)                         -> (y, row_max, row_inv)
//   attention_softmax_bwd (dy, x, row_max, row_inv, mask, rng, origin)   -> dx
// x/y/dy/dx: [B, H, Q, K] in f32/f16/bf16; row_max, row_inv: f32 [B, H, Q];
// mask: bool [B, K] (read only when has_mask); rng: u32[4] (read only when
// rate > 0); origin: s32[3], the global (b, h, q) of this block.
// Attributes: scale, rate (f32), causal, has_mask (bool), heads_total,
// q_total (i64: global sizes for the dropout index and the causal offset).
#include "csrc/attention_softmax.h"
#include "ffi/common.h"
#include "ffi/registry.h"

#include <utility>

namespace lsjax::ffi {
namespace {

struct Attrs {
  float scale, rate;
  bool causal, has_mask;
  int64_t heads_total, q_total;
};

// Checks the operands shared by forward and backward and fills the geometry.
xffi::Error Geometry(const char* op, const Buf& x, const Buf& stat_max, const Buf& stat_inv,
                     const Buf& mask, const Buf& rng, const Buf& origin, const Attrs& at,
                     AttnSoftmaxGeometry* g) {
  const auto dims = x.dimensions();
  if (auto e = Expect(dims.size() == 4, op, "scores must have rank 4 [batch, heads, q, k]");
      e.failure())
    return e;
  *g = AttnSoftmaxGeometry{};
  g->batch = dims[0];
  g->heads = dims[1];
  g->q_len = dims[2];
  g->k_len = dims[3];
  g->heads_total = at.heads_total;
  g->q_total = at.q_total;
  g->scale = at.scale;
  g->rate = at.rate;
  g->causal = at.causal;
  for (const Buf* s : {&stat_max, &stat_inv}) {
    if (auto e = Expect(s->element_type() == xffi::DataType::F32 &&
                            static_cast<int64_t>(s->element_count()) == g->rows(),
                        op, "row statistics must be float32 [batch, heads, q]");
        e.failure())
      return e;
  }
  if (at.has_mask) {
    const auto md = mask.dimensions();
    if (auto e = Expect(mask.element_type() == xffi::DataType::PRED && md.size() == 2 &&
                            md[0] == g->batch && md[1] == g->k_len,
                        op, "key_padding_mask must be bool [batch, k]");
        e.failure())
      return e;
    g->mask = static_cast<const uint8_t*>(mask.untyped_data());
  }
  if (at.rate > 0.f) {
    if (auto e = Expect(at.rate < 1.f, op, "dropout rate must be in [0, 1)"); e.failure()) return e;
    if (auto e = Expect(rng.element_type() == xffi::DataType::U32 && rng.element_count() == 4, op,
                        "rng must be uint32[4]");
        e.failure())
      return e;
    g->rng = static_cast<const uint32_t*>(rng.untyped_data());
  }
  if (auto e = Expect(origin.element_type() == xffi::DataType::S32 && origin.element_count() == 3,
                      op, "origin must be int32[3]");
      e.failure())
    return e;
  g->origin = static_cast<const int32_t*>(origin.untyped_data());
  return Expect(at.heads_total >= g->heads && at.q_total >= g->q_len, op,
                "heads_total/q_total must be at least the local sizes");
}

// Shared body of the forward handlers; `run(args)` launches on the platform.
template <typename Types, typename Run>
xffi::Error Fwd(Run&& run, Buf x, Buf mask, Buf rng, Buf origin, Res y, Res row_max, Res row_inv,
                const Attrs& at) {
  const char* op = "attention_softmax_fwd";
  AttnSoftmaxGeometry g;
  if (auto e = Geometry(op, x, *row_max, *row_inv, mask, rng, origin, at, &g); e.failure()) return e;
  return DispatchFloat<Types>(x.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    AttnSoftmaxFwdArgs<T> a{g, In<T>(x), Out<T>(y), Out<float>(row_max), Out<float>(row_inv)};
    return run(a);
  });
}

template <typename Types, typename Run>
xffi::Error Bwd(Run&& run, Buf dy, Buf x, Buf row_max, Buf row_inv, Buf mask, Buf rng, Buf origin,
                Res dx, const Attrs& at) {
  const char* op = "attention_softmax_bwd";
  AttnSoftmaxGeometry g;
  if (auto e = Geometry(op, x, row_max, row_inv, mask, rng, origin, at, &g); e.failure()) return e;
  if (auto e = Expect(dy.element_type() == x.element_type() &&
                          dy.element_count() == x.element_count(),
                      op, "dy must match the scores' shape and dtype");
      e.failure())
    return e;
  return DispatchFloat<Types>(x.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    AttnSoftmaxBwdArgs<T> a{g, In<T>(dy), In<T>(x), In<float>(row_max), In<float>(row_inv),
                            Out<T>(dx)};
    return run(a);
  });
}

template <typename B>
auto BindAttrs(B b) {
  return std::move(b).template Attr<float>("scale")
      .template Attr<float>("rate")
      .template Attr<bool>("causal")
      .template Attr<bool>("has_mask")
      .template Attr<int64_t>("heads_total")
      .template Attr<int64_t>("q_total");
}

template <typename B>
auto BindFwd(B b) {
  return BindAttrs(std::move(b).template Arg<Buf>()  // x
                       .template Arg<Buf>()  // mask
                       .template Arg<Buf>()  // rng
                       .template Arg<Buf>()  // origin
                       .template Ret<Buf>()  // y
                       .template Ret<Buf>()  // row_max
                       .template Ret<Buf>());  // row_inv
}

template <typename B>
auto BindBwd(B b) {
  return BindAttrs(std::move(b).template Arg<Buf>()  // dy
                       .template Arg<Buf>()  // x
                       .template Arg<Buf>()  // row_max
                       .template Arg<Buf>()  // row_inv
                       .template Arg<Buf>()  // mask
                       .template Arg<Buf>()  // rng
                       .template Arg<Buf>()  // origin
                       .template Ret<Buf>());  // dx
}

// ------------------------------------------------------------------- CPU --

auto RunFwdCpu = [](const auto& a) {
  AttnSoftmaxFwdCpu(a);
  return xffi::Error::Success();
};
auto RunBwdCpu = [](const auto& a) {
  AttnSoftmaxBwdCpu(a);
  return xffi::Error::Success();
};

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttnSoftmaxFwdCpuHandler,
    [](Buf x, Buf mask, Buf rng, Buf origin, Res y, Res row_max, Res row_inv, float scale,
       float rate, bool causal, bool has_mask, int64_t heads_total, int64_t q_total) {
      return Fwd<CpuTypes>(RunFwdCpu, x, mask, rng, origin, y, row_max, row_inv,
                           {scale, rate, causal, has_mask, heads_total, q_total});
    },
    BindFwd(xffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttnSoftmaxBwdCpuHandler,
    [](Buf dy, Buf x, Buf row_max, Buf row_inv, Buf mask, Buf rng, Buf origin, Res dx, float scale,
       float rate, bool causal, bool has_mask, int64_t heads_total, int64_t q_total) {
      return Bwd<CpuTypes>(RunBwdCpu, dy, x, row_max, row_inv, mask, rng, origin, dx,
                           {scale, rate, causal, has_mask, heads_total, q_total});
    },
    BindBwd(xffi::Ffi::Bind()));

LSJAX_FFI_TARGET_CPU("attention_softmax_fwd", AttnSoftmaxFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("attention_softmax_bwd", AttnSoftmaxBwdCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttnSoftmaxFwdCudaHandler,
    [](cudaStream_t stream, Buf x, Buf mask, Buf rng, Buf origin, Res y, Res row_max,
       Res row_inv, float scale, float rate, bool causal, bool has_mask, int64_t heads_total,
       int64_t q_total) {
      auto run = [stream](const auto& a) {
        return CudaStatus(AttnSoftmaxFwdCuda(a, stream), "attention_softmax_fwd");
      };
      return Fwd<CudaTypes>(run, x, mask, rng, origin, y, row_max, row_inv,
                            {scale, rate, causal, has_mask, heads_total, q_total});
    },
    BindFwd(xffi::Ffi::Bind().Ctx<Stream>()), {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttnSoftmaxBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf x, Buf row_max, Buf row_inv, Buf mask, Buf rng,
       Buf origin, Res dx, float scale, float rate, bool causal, bool has_mask,
       int64_t heads_total, int64_t q_total) {
      auto run = [stream](const auto& a) {
        return CudaStatus(AttnSoftmaxBwdCuda(a, stream), "attention_softmax_bwd");
      };
      return Bwd<CudaTypes>(run, dy, x, row_max, row_inv, mask, rng, origin, dx,
                            {scale, rate, causal, has_mask, heads_total, q_total});
    },
    BindBwd(xffi::Ffi::Bind().Ctx<Stream>()), {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("attention_softmax_fwd", AttnSoftmaxFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("attention_softmax_bwd", AttnSoftmaxBwdCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
