// XLA FFI handlers for the embedding op: decode and check buffers, dispatch
// dtype, call csrc/. Targets (each for "cpu" and, when built, "CUDA"):
//   embedding_fwd         (ids, positions, token_index, rng, table)            -> (y, sorted_keys, order)
//   embedding_learned_fwd (ids, positions, token_index, rng, table, pos_table) -> (y, sorted_keys, order)
//   embedding_bwd         (dy, keys, order, token_index, rng)                  -> (grad,
//                         partials: float32 [2 * ceil(tokens / chunk), H], CUDA workspace)
// sorted_keys, order: int32 [tokens] (the backward's stable sort of the tokens
// by row, done with the forward, concurrently on CUDA) or [0] (no sort).
// ids, positions, token_index, keys, order: int32 [...] (same element count:
// tokens); rng: uint32[4] (read only when rate > 0); table: [vocab, H],
// pos_table: [max_positions, H], y/dy: [..., H], grad: [rows, H], all of one
// float dtype. Attributes: fwd scale, rate, padding_id; bwd factor, rate, chunk (tokens per block, [1, 64]).
#include <optional>
#include <string>
#include <type_traits>

#include "csrc/embedding.h"
#include "ffi/common.h"
#include "ffi/registry.h"

namespace lsjax::ffi {
namespace {

xffi::Error CheckIndex(const char* op, const Buf& b, int64_t tokens, const char* name) {
  return Expect(b.element_type() == xffi::DataType::S32 && static_cast<int64_t>(b.element_count()) == tokens,
                op, std::string(name) + " must be int32 with one element per token");
}

xffi::Error CheckRng(const char* op, const Buf& rng, float rate) {
  if (auto e = Expect(rate >= 0.f && rate < 1.f, op, "rate must be in [0, 1)"); e.failure()) return e;
  return Expect(rate == 0.f || (rng.element_type() == xffi::DataType::U32 && rng.element_count() == 4), op,
                "rng must be uint32[4]");
}

// [tokens, hidden] buffer whose leading dims hold `tokens` elements.
xffi::Error CheckRows(const char* op, const Buf& b, int64_t tokens, int64_t hidden, const char* name) {
  const auto [rows, cols] = RowsCols(b);
  return Expect(b.dimensions().size() >= 1 && rows == tokens && cols == hidden, op,
                std::string(name) + " must be [..., hidden] with one row per token");
}

// run(args, sort): sort is null when the sort outputs are empty.
template <typename Types, typename Run>
xffi::Error Fwd(const char* op, Run&& run, Buf ids, Buf positions, Buf token_index, Buf rng, Buf table,
                const Buf* pos_table, Res y, Res sorted_keys, Res order, float scale, float rate,
                int32_t padding_id) {
  const int64_t tokens = static_cast<int64_t>(ids.element_count());
  const bool sort = sorted_keys->element_count() > 0;
  if (auto e = Expect((sort ? tokens : 0) == static_cast<int64_t>(sorted_keys->element_count()) &&
                          sorted_keys->element_type() == xffi::DataType::S32 &&
                          order->element_type() == xffi::DataType::S32 &&
                          order->element_count() == sorted_keys->element_count() && tokens < (int64_t{1} << 31),
                      op, "sorted_keys and order must be int32 with one element per token (< 2^31) or none");
      e.failure())
    return e;
  if (auto e = CheckIndex(op, ids, tokens, "ids"); e.failure()) return e;
  if (auto e = CheckIndex(op, positions, tokens, "positions"); e.failure()) return e;
  if (rate > 0.f) {
    if (auto e = CheckIndex(op, token_index, tokens, "token_index"); e.failure()) return e;
  }
  if (auto e = CheckRng(op, rng, rate); e.failure()) return e;
  if (auto e = Expect(table.dimensions().size() == 2 && table.dimensions()[0] >= 1, op,
                      "table must be [vocab >= 1, hidden]");
      e.failure())
    return e;
  const int64_t hidden = table.dimensions()[1];
  if (auto e = Expect(y->element_type() == table.element_type(), op, "output dtype must match the table");
      e.failure())
    return e;
  if (auto e = CheckRows(op, *y, tokens, hidden, "output"); e.failure()) return e;
  if (pos_table) {
    if (auto e = Expect(pos_table->element_type() == table.element_type() && pos_table->dimensions().size() == 2 &&
                            pos_table->dimensions()[0] >= 1 && pos_table->dimensions()[1] == hidden,
                        op, "pos_table must be [max_positions >= 1, hidden] in the table's dtype");
        e.failure())
      return e;
  }
  return DispatchFloat<Types>(table.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool dropout = rate > 0.f;
    EmbeddingFwdArgs<T> a{In<int32_t>(ids),
                          In<int32_t>(positions),
                          dropout ? In<int32_t>(token_index) : nullptr,
                          dropout ? In<uint32_t>(rng) : nullptr,
                          In<T>(table),
                          pos_table ? In<T>(*pos_table) : nullptr,
                          Out<T>(y),
                          tokens,
                          hidden,
                          table.dimensions()[0],
                          pos_table ? pos_table->dimensions()[0] : 0,
                          padding_id,
                          scale,
                          rate};
    const EmbeddingSortArgs s{In<int32_t>(ids), Out<int32_t>(sorted_keys), Out<int32_t>(order), tokens,
                              table.dimensions()[0], padding_id};
    return run(a, sort ? &s : nullptr);
  });
}

template <typename Types, typename Run>
xffi::Error Bwd(const char* op, Run&& run, Buf dy, Buf keys, Buf order, Buf token_index, Buf rng, Res grad,
                Res partials, float factor, float rate, int32_t chunk) {
  const int64_t tokens = static_cast<int64_t>(keys.element_count());
  if (auto e = Expect(tokens < (int64_t{1} << 31), op, "at most 2^31 - 1 tokens per shard"); e.failure()) return e;
  if (auto e = CheckIndex(op, order, tokens, "order"); e.failure()) return e;
  if (auto e = CheckIndex(op, keys, tokens, "keys"); e.failure()) return e;
  if (rate > 0.f) {
    if (auto e = CheckIndex(op, token_index, tokens, "token_index"); e.failure()) return e;
  }
  if (auto e = CheckRng(op, rng, rate); e.failure()) return e;
  if (auto e = Expect(grad->dimensions().size() == 2 && grad->element_type() == dy.element_type(), op,
                      "grad must be [rows, hidden] in dy's dtype");
      e.failure())
    return e;
  const int64_t hidden = grad->dimensions()[1];
  if (auto e = CheckRows(op, dy, tokens, hidden, "dy"); e.failure()) return e;
  if (auto e = Expect(chunk >= 1 && chunk <= kEmbeddingBwdMaxChunk, op,
                      "chunk must be in [1, " + std::to_string(kEmbeddingBwdMaxChunk) + "]");
      e.failure())
    return e;
  if (auto e = Expect(partials->element_type() == xffi::DataType::F32 && partials->dimensions().size() == 2 &&
                          partials->dimensions()[0] == 2 * ((tokens + chunk - 1) / chunk) &&
                          partials->dimensions()[1] == hidden,
                      op, "partials must be float32 [2 * ceil(tokens / chunk), hidden]");
      e.failure())
    return e;
  return DispatchFloat<Types>(dy.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool dropout = rate > 0.f;
    EmbeddingBwdArgs<T> a{In<T>(dy),
                          In<int32_t>(keys),
                          In<int32_t>(order),
                          dropout ? In<int32_t>(token_index) : nullptr,
                          dropout ? In<uint32_t>(rng) : nullptr,
                          Out<T>(grad),
                          Out<float>(partials),
                          chunk,
                          tokens,
                          hidden,
                          grad->dimensions()[0],
                          factor,
                          rate};
    return run(a);
  });
}

// ------------------------------------------------------------------- CPU --

auto RunFwdCpu = [](const auto& a, const EmbeddingSortArgs* sort) {
  EmbeddingFwdCpu(a);
  if (sort) EmbeddingSortCpu(*sort);
  return xffi::Error::Success();
};
auto RunBwdCpu = [](const auto& a) {
  EmbeddingBwdCpu(a);
  return xffi::Error::Success();
};

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingFwdCpuHandler,
    [](Buf ids, Buf positions, Buf token_index, Buf rng, Buf table, Res y, Res sorted_keys, Res order, float scale,
       float rate, int32_t padding_id) {
      return Fwd<CpuTypes>("embedding_fwd", RunFwdCpu, ids, positions, token_index, rng, table, nullptr, y,
                           sorted_keys, order, scale, rate, padding_id);
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
        .Attr<float>("scale")
        .Attr<float>("rate")
        .Attr<int32_t>("padding_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingLearnedFwdCpuHandler,
    [](Buf ids, Buf positions, Buf token_index, Buf rng, Buf table, Buf pos_table, Res y, Res sorted_keys,
       Res order, float scale, float rate, int32_t padding_id) {
      return Fwd<CpuTypes>("embedding_learned_fwd", RunFwdCpu, ids, positions, token_index, rng, table, &pos_table,
                           y, sorted_keys, order, scale, rate, padding_id);
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
        .Attr<float>("scale")
        .Attr<float>("rate")
        .Attr<int32_t>("padding_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingBwdCpuHandler,
    [](Buf dy, Buf keys, Buf order, Buf token_index, Buf rng, Res grad, Res partials, float factor, float rate,
       int32_t chunk) {
      return Bwd<CpuTypes>("embedding_bwd", RunBwdCpu, dy, keys, order, token_index, rng, grad, partials, factor,
                           rate, chunk);
    },
    xffi::Ffi::Bind()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("factor")
        .Attr<float>("rate")
        .Attr<int32_t>("chunk"));

LSJAX_FFI_TARGET_CPU("embedding_fwd", EmbeddingFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("embedding_learned_fwd", EmbeddingLearnedFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("embedding_bwd", EmbeddingBwdCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

// With a sort, its workspace comes from XLA's scratch allocator.
auto RunFwdCuda(cudaStream_t stream, xffi::ScratchAllocator& scratch) {
  return [stream, &scratch](const auto& a, const EmbeddingSortArgs* sort) {
    if (!sort) return CudaStatus(EmbeddingFwdCuda(a, stream), "embedding_fwd");
    const std::optional<void*> workspace = scratch.Allocate(EmbeddingSortWorkspaceBytes(a.tokens, a.vocab), 256);
    if (!workspace) return xffi::Error::Internal("embedding_fwd: no device memory for the sort's workspace");
    return CudaStatus(EmbeddingFwdSortCuda(a, *sort, *workspace, stream), "embedding_fwd");
  };
}
auto RunBwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) { return CudaStatus(EmbeddingBwdCuda(a, stream), "embedding_bwd"); };
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingFwdCudaHandler,
    [](cudaStream_t stream, xffi::ScratchAllocator scratch, Buf ids, Buf positions, Buf token_index, Buf rng,
       Buf table, Res y, Res sorted_keys, Res order, float scale, float rate, int32_t padding_id) {
      return Fwd<CudaTypes>("embedding_fwd", RunFwdCuda(stream, scratch), ids, positions, token_index, rng, table,
                            nullptr, y, sorted_keys, order, scale, rate, padding_id);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Ctx<xffi::ScratchAllocator>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("scale")
        .Attr<float>("rate")
        .Attr<int32_t>("padding_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingLearnedFwdCudaHandler,
    [](cudaStream_t stream, xffi::ScratchAllocator scratch, Buf ids, Buf positions, Buf token_index, Buf rng,
       Buf table, Buf pos_table, Res y, Res sorted_keys, Res order, float scale, float rate, int32_t padding_id) {
      return Fwd<CudaTypes>("embedding_learned_fwd", RunFwdCuda(stream, scratch), ids, positions, token_index, rng,
                            table, &pos_table, y, sorted_keys, order, scale, rate, padding_id);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Ctx<xffi::ScratchAllocator>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("scale")
        .Attr<float>("rate")
        .Attr<int32_t>("padding_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf keys, Buf order, Buf token_index, Buf rng, Res grad, Res partials,
       float factor, float rate, int32_t chunk) {
      return Bwd<CudaTypes>("embedding_bwd", RunBwdCuda(stream), dy, keys, order, token_index, rng, grad, partials,
                            factor, rate, chunk);
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
        .Attr<float>("factor")
        .Attr<float>("rate")
        .Attr<int32_t>("chunk"),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("embedding_fwd", EmbeddingFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("embedding_learned_fwd", EmbeddingLearnedFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("embedding_bwd", EmbeddingBwdCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
