// XLA FFI handlers for decode attention (csrc/decode_attention.h). Targets:
//   decode_attention (q [B, H, D], k [B, L, H, D], v [B, L, H, D] f32/f16/bf16, key_src s32 [B, L])
//     -> out [B, H, D] in q's dtype
//   decode_self_attention (qkv [B, 3, H, D], k_cache [B, L, H, D], v_cache, key_src s32 [B, L], index s32 [])
//     -> out [B, H, D], k_cache, v_cache (aliased to the operands; the new K/V written at index)
// Attributes: scale (f32); decode_self_attention also causal (bool: keys after index left out).
#include <string>
#include <utility>

#include "csrc/decode_attention.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

constexpr const char* kOp = "decode_attention";

// The checks both targets share: k [batch, k_len, heads, head_dim] (the dims of a q of [batch, heads,
// head_dim]), v like k, out like q, all of `dtype`; key_src int32 [batch, k_len]; the kernel's limits.
xffi::Error CheckArgs(int64_t batch, int64_t heads, int64_t head_dim, xffi::DataType dtype, const Buf& k,
                      const Buf& v, const Buf& key_src, const Buf& out, int64_t max_keys) {
  const auto kd = k.dimensions();
  if (auto e = Expect(kd.size() == 4 && kd[0] == batch && kd[2] == heads && kd[3] == head_dim && batch >= 1 &&
                          heads >= 1 && head_dim >= 1 && kd[1] >= 1,
                      kOp, "q must be [batch, heads, head_dim] and k [batch, k_len, heads, head_dim]");
      e.failure())
    return e;
  const bool same = v.element_type() == dtype && k.element_type() == dtype && out.element_type() == dtype &&
                    v.element_count() == k.element_count() &&
                    static_cast<int64_t>(out.element_count()) == batch * heads * head_dim;
  if (auto e = Expect(same, kOp, "k, v and out must match q's dtype, v k's shape and out q's shape"); e.failure())
    return e;
  const bool src_ok = key_src.element_type() == xffi::DataType::S32 &&
                      static_cast<int64_t>(key_src.element_count()) == batch * kd[1];
  if (auto e = Expect(src_ok, kOp, "key_src must be int32 [batch, k_len]"); e.failure()) return e;
  return Expect(kd[1] <= max_keys && head_dim <= kDecodeAttentionMaxHeadDim && batch * heads < (1ll << 31), kOp,
                "needs k_len <= " + std::to_string(max_keys) + ", head_dim <= " +
                    std::to_string(kDecodeAttentionMaxHeadDim) + " and batch * heads < 2^31");
}

// decode_attention: q, k, v, key_src -> out.
template <typename Types, typename Run>
xffi::Error Launch(Run&& run, const Buf& q, const Buf& k, const Buf& v, const Buf& key_src, Res& out, float scale,
                   int64_t max_keys) {
  const auto qd = q.dimensions();
  if (auto e = Expect(qd.size() == 3, kOp, "q must be [batch, heads, head_dim]"); e.failure()) return e;
  if (auto e = CheckArgs(qd[0], qd[1], qd[2], q.element_type(), k, v, key_src, *out, max_keys); e.failure()) return e;
  const auto kd = k.dimensions();
  return DispatchFloat<Types>(q.element_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    DecodeAttentionArgs<T> a{In<T>(q), In<T>(k), In<T>(v), In<int32_t>(key_src), Out<T>(out),
                             kd[0],    kd[1],    kd[2],    kd[3],               scale,       kd[2] * kd[3]};
    return run(a);
  });
}

// decode_self_attention: qkv [batch, 3, heads, head_dim], the caches, key_src, index (int32 scalar)
// -> out, the caches (aliased to the operands: the kernel reads and writes them through the results;
// CopyIntoAliased, on `stream` when not null, where XLA handed other buffers).
template <typename Types, typename Run>
xffi::Error LaunchAppend(Run&& run, void* stream, const Buf& qkv, const Buf& k_in, const Buf& v_in,
                         const Buf& key_src, const Buf& index, Res& out, Res& k_cache, Res& v_cache, float scale,
                         bool causal, int64_t max_keys) {
  const auto qd = qkv.dimensions();
  if (auto e = Expect(qd.size() == 4 && qd[1] == 3, kOp, "qkv must be [batch, 3, heads, head_dim]"); e.failure())
    return e;
  if (auto e = CheckArgs(qd[0], qd[2], qd[3], qkv.element_type(), *k_cache, *v_cache, key_src, *out, max_keys);
      e.failure())
    return e;
  if (auto e = Expect(index.element_type() == xffi::DataType::S32 && index.element_count() == 1, kOp,
                      "index must be an int32 scalar");
      e.failure())
    return e;
  if (auto e = Expect(k_in.size_bytes() == k_cache->size_bytes() && v_in.size_bytes() == v_cache->size_bytes(), kOp,
                      "the cache operands must match the cache results");
      e.failure())
    return e;
  if (auto e = CopyIntoAliased({{&k_in, &k_cache}, {&v_in, &v_cache}}, stream); e.failure()) return e;
  const auto kd = k_cache->dimensions();
  return DispatchFloat<Types>(qkv.element_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t row = kd[2] * kd[3];
    const T* q = In<T>(qkv);
    T* k = Out<T>(k_cache);
    T* v = Out<T>(v_cache);
    DecodeAttentionArgs<T> a{q, k, v, In<int32_t>(key_src), Out<T>(out), kd[0], kd[1], kd[2], kd[3], scale, 3 * row};
    a.k_new = q + row;
    a.v_new = q + 2 * row;
    a.k_cache = k;
    a.v_cache = v;
    a.append_at = In<int32_t>(index);
    a.causal = causal;
    return run(a);
  });
}

// q, k, v, key_src -> out; scale. On ``Bind()`` (CPU) or ``Bind().Ctx<stream>()`` (CUDA).
template <typename B>
auto BindDecodeAttention(B b) {
  return BindBuffers<4, 1>(std::move(b)).template Attr<float>("scale");
}

// qkv, k_cache, v_cache, key_src, index -> out, k_cache, v_cache; scale, causal.
template <typename B>
auto BindDecodeSelfAttention(B b) {
  return BindBuffers<5, 3>(std::move(b)).template Attr<float>("scale").template Attr<bool>("causal");
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeSelfAttentionCpuHandler,
    [](Buf qkv, Buf k_in, Buf v_in, Buf key_src, Buf index, Res out, Res k_cache, Res v_cache, float scale,
       bool causal) {
      auto run = [](const auto& a) {
        DecodeAttentionCpu(a);
        return xffi::Error::Success();
      };
      return LaunchAppend<CpuTypes>(run, nullptr, qkv, k_in, v_in, key_src, index, out, k_cache, v_cache, scale,
                                    causal, INT32_MAX);
    },
    BindDecodeSelfAttention(xffi::Ffi::Bind()));

LSJAX_FFI_TARGET_CPU("decode_self_attention", DecodeSelfAttentionCpuHandler);

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeSelfAttentionCudaHandler,
    [](cudaStream_t stream, Buf qkv, Buf k_in, Buf v_in, Buf key_src, Buf index, Res out, Res k_cache,
       Res v_cache, float scale, bool causal) {
      auto run = [&](const auto& a) { return CudaStatus(DecodeAttentionCuda(a, stream), kOp); };
      return LaunchAppend<CudaTypes>(run, stream, qkv, k_in, v_in, key_src, index, out, k_cache, v_cache, scale,
                                     causal, kDecodeAttentionMaxKeys);
    },
    BindDecodeSelfAttention(xffi::Ffi::Bind().Ctx<xffi::PlatformStream<cudaStream_t>>()),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("decode_self_attention", DecodeSelfAttentionCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
