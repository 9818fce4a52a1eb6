// XLA FFI handlers for decode attention (csrc/decode_attention.h). Target:
//   decode_attention (q [B, H, D], k [B, L, H, D], v [B, L, H, D] f32/f16/bf16, key_src s32 [B, L])
//     -> out [B, H, D] in q's dtype
// Attribute: scale (f32).
#include <string>
#include <utility>

#include "csrc/decode_attention.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

using Buf = xffi::AnyBuffer;
using Res = xffi::Result<xffi::AnyBuffer>;
constexpr const char* kOp = "decode_attention";

template <typename Types, typename Run>
xffi::Error Launch(Run&& run, const Buf& q, const Buf& k, const Buf& v, const Buf& key_src, Res& out, float scale,
                   int64_t max_keys) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (auto e = Expect(qd.size() == 3 && kd.size() == 4 && kd[0] == qd[0] && kd[2] == qd[1] && kd[3] == qd[2] &&
                          qd[0] >= 1 && qd[1] >= 1 && qd[2] >= 1 && kd[1] >= 1,
                      kOp, "q must be [batch, heads, head_dim] and k [batch, k_len, heads, head_dim]");
      e.failure())
    return e;
  const bool same = v.element_type() == q.element_type() && k.element_type() == q.element_type() &&
                    out->element_type() == q.element_type() && v.element_count() == k.element_count() &&
                    out->element_count() == q.element_count();
  if (auto e = Expect(same, kOp, "k, v and out must match q's dtype, v k's shape and out q's shape"); e.failure())
    return e;
  const bool src_ok = key_src.element_type() == xffi::DataType::S32 &&
                      static_cast<int64_t>(key_src.element_count()) == kd[0] * kd[1];
  if (auto e = Expect(src_ok, kOp, "key_src must be int32 [batch, k_len]"); e.failure()) return e;
  if (auto e = Expect(kd[1] <= max_keys && qd[2] <= kDecodeAttentionMaxHeadDim && qd[0] * qd[1] < (1ll << 31), kOp,
                      "needs k_len <= " + std::to_string(max_keys) + ", head_dim <= " +
                          std::to_string(kDecodeAttentionMaxHeadDim) + " and batch * heads < 2^31");
      e.failure())
    return e;
  return DispatchFloat<Types>(q.element_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    DecodeAttentionArgs<T> a{In<T>(q),  In<T>(k), In<T>(v), In<int32_t>(key_src), Out<T>(out),
                             kd[0],     kd[1],    kd[2],    kd[3],             scale};
    return run(a);
  });
}

// q, k, v, key_src -> out; scale. On ``Bind()`` (CPU) or ``Bind().Ctx<stream>()`` (CUDA).
template <typename B>
auto BindDecodeAttention(B b) {
  return std::move(b)
      .template Arg<Buf>()
      .template Arg<Buf>()
      .template Arg<Buf>()
      .template Arg<Buf>()
      .template Ret<Buf>()
      .template Attr<float>("scale");
}

// ------------------------------------------------------------------- CPU --

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeAttentionCpuHandler,
    [](Buf q, Buf k, Buf v, Buf key_src, Res out, float scale) {
      auto run = [](const auto& a) {
        DecodeAttentionCpu(a);
        return xffi::Error::Success();
      };
      return Launch<CpuTypes>(run, q, k, v, key_src, out, scale, INT32_MAX);
    },
    BindDecodeAttention(xffi::Ffi::Bind()));

LSJAX_FFI_TARGET_CPU("decode_attention", DecodeAttentionCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeAttentionCudaHandler,
    [](cudaStream_t stream, Buf q, Buf k, Buf v, Buf key_src, Res out, float scale) {
      auto run = [&](const auto& a) { return CudaStatus(DecodeAttentionCuda(a, stream), kOp); };
      return Launch<CudaTypes>(run, q, k, v, key_src, out, scale, kDecodeAttentionMaxKeys);
    },
    BindDecodeAttention(xffi::Ffi::Bind().Ctx<xffi::PlatformStream<cudaStream_t>>()),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("decode_attention", DecodeAttentionCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
