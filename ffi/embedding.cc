// XLA FFI handlers for the embedding op: decode and check buffers, dispatch
// dtype, call csrc/. Targets (each for "cpu" and, when built, "CUDA"):
//   embedding_fwd      (ids, offset, rng, table, pos_table) -> (y, positions)
//   embedding_sort_fwd (ids, offset, rng, table, pos_table) -> (y, positions, sorted_keys, order,
//                      workspace: uint8 [lsjax._ffi.embedding_sort_workspace_bytes(tokens, vocab)], CUDA only)
//                      (CUDA also embedding_sort_fwd_graph, the same in XLA's command buffers)
//   embedding_bwd      (dy, keys, order, rng) -> (grad, CUDA workspace:
//                      partials: float32 [2 * ceil(tokens / chunk), H],
//                      counters: uint32 [ceil(tokens / chunk) + 1 + ceil(rows / 32)]: chunks done per cut
//                      segment, the next slice, then a bit per grad row with tokens)
// ids: int32 [..., seq] (positions count each row of seq from offset: int32[1];
// positions: int32, one per token, the kernels' workspace);
// keys, order: int32 [...] (same element count: tokens); rng: uint32[4] (read
// only when rate > 0; dropout element of token n, column j: n * H + j plus the
// rng offset); table: [vocab, H],
// pos_table: [max_positions, H] learned positions or [0, H] (sinusoidal),
// y/dy: [..., H], grad: [rows, H], all of one float dtype. sorted_keys, order:
// int32 [tokens], the backward's stable sort of the tokens by row, done with
// the forward (on CUDA concurrently, on a second stream). That target is not
// command-buffer compatible: captured into XLA's CUDA graph, fwd+bwd at
// 256x256x1024 took ~19 us longer (session 20; giving the captured sort
// kernels the side stream's priority did not change it), as if the sort's
// chain of small kernels waited behind the forward kernel's blocks. Its twin
// embedding_sort_fwd_graph (CUDA only) is, for small token counts, where the
// sort's host-side launches cost more. The other targets are; the backward's
// second-stream branch (marking the rows with tokens, zeroing the others) is
// two small kernels. Attributes: fwd scale, rate, padding_id; bwd factor,
// rate, chunk (sorted tokens per partial sum, [1, 64]), slice (sorted tokens
// per block's turn, dividing chunk).
#include <string>
#include <utility>
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

// run(args, sort): sort is null without the sort outputs (sorted_keys, order).
template <typename Types, typename Run>
xffi::Error Fwd(const char* op, Run&& run, Buf ids, Buf offset, Buf rng, Buf table, Buf pos_table, Res y,
                Res positions, Res* sorted_keys, Res* order, float scale, float rate, int32_t padding_id) {
  const int64_t tokens = static_cast<int64_t>(ids.element_count());
  if (sorted_keys) {
    if (auto e = Expect(tokens < (int64_t{1} << 31), op, "at most 2^31 - 1 tokens per shard"); e.failure()) return e;
    if (auto e = CheckIndex(op, **sorted_keys, tokens, "sorted_keys"); e.failure()) return e;
    if (auto e = CheckIndex(op, **order, tokens, "order"); e.failure()) return e;
  }
  if (auto e = CheckIndex(op, ids, tokens, "ids"); e.failure()) return e;
  if (auto e = Expect(ids.dimensions().size() >= 1, op, "ids must be [..., seq]"); e.failure()) return e;
  if (auto e = CheckIndex(op, offset, 1, "offset"); e.failure()) return e;
  if (auto e = CheckIndex(op, *positions, tokens, "positions"); e.failure()) return e;
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
  const bool learned = pos_table.element_count() > 0;
  if (auto e = Expect(pos_table.element_type() == table.element_type() && pos_table.dimensions().size() == 2 &&
                          pos_table.dimensions()[1] == hidden,
                      op, "pos_table must be [max_positions, hidden] (0 rows: sinusoidal) in the table's dtype");
      e.failure())
    return e;
  return DispatchFloat<Types>(table.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool dropout = rate > 0.f;
    EmbeddingFwdArgs<T> a{In<int32_t>(ids),
                          In<int32_t>(offset),
                          dropout ? In<uint32_t>(rng) : nullptr,
                          In<T>(table),
                          learned ? In<T>(pos_table) : nullptr,
                          Out<T>(y),
                          Out<int32_t>(positions),
                          tokens,
                          ids.dimensions().back(),
                          hidden,
                          table.dimensions()[0],
                          pos_table.dimensions()[0],
                          padding_id,
                          scale,
                          rate};
    if (!sorted_keys) return run(a, nullptr);
    const EmbeddingSortArgs s{In<int32_t>(ids), Out<int32_t>(*sorted_keys), Out<int32_t>(*order), tokens,
                              table.dimensions()[0], padding_id};
    return run(a, &s);
  });
}

template <typename Types, typename Run>
xffi::Error Bwd(const char* op, Run&& run, Buf dy, Buf keys, Buf order, Buf rng, Res grad, Res partials,
                Res counters, float factor, float rate, int32_t chunk, int32_t slice) {
  const int64_t tokens = static_cast<int64_t>(keys.element_count());
  if (auto e = Expect(tokens < (int64_t{1} << 31), op, "at most 2^31 - 1 tokens per shard"); e.failure()) return e;
  if (auto e = CheckIndex(op, order, tokens, "order"); e.failure()) return e;
  if (auto e = CheckIndex(op, keys, tokens, "keys"); e.failure()) return e;
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
  if (auto e = Expect(slice >= 1 && chunk % slice == 0, op, "slice must divide chunk"); e.failure()) return e;
  const int64_t chunks = (tokens + chunk - 1) / chunk;
  const int64_t rows = grad->dimensions()[0];
  if (auto e = Expect(partials->element_type() == xffi::DataType::F32 && partials->dimensions().size() == 2 &&
                          partials->dimensions()[0] == 2 * chunks &&
                          partials->dimensions()[1] == hidden,
                      op, "partials must be float32 [2 * ceil(tokens / chunk), hidden]");
      e.failure())
    return e;
  if (auto e = Expect(counters->element_type() == xffi::DataType::U32 &&
                          static_cast<int64_t>(counters->element_count()) == chunks + 1 + (rows + 31) / 32,
                      op, "counters must be uint32 [ceil(tokens / chunk) + 1 + ceil(rows / 32)]");
      e.failure())
    return e;
  return DispatchFloat<Types>(dy.element_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool dropout = rate > 0.f;
    EmbeddingBwdArgs<T> a{In<T>(dy),
                          In<int32_t>(keys),
                          In<int32_t>(order),
                          dropout ? In<uint32_t>(rng) : nullptr,
                          Out<T>(grad),
                          Out<float>(partials),
                          Out<uint32_t>(counters),
                          Out<uint32_t>(counters) + chunks + 1,
                          chunk,
                          slice,
                          tokens,
                          hidden,
                          rows,
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

// The forward's operands and attributes (Rets in between: one, or three with the sort).
template <typename B>
auto FwdArgs(B b) {
  return std::move(b)
      .template Arg<Buf>()
      .template Arg<Buf>()
      .template Arg<Buf>()
      .template Arg<Buf>()
      .template Arg<Buf>();
}
template <typename B>
auto FwdAttrs(B b) {
  return std::move(b).template Attr<float>("scale").template Attr<float>("rate").template Attr<int32_t>(
      "padding_id");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingFwdCpuHandler,
    [](Buf ids, Buf offset, Buf rng, Buf table, Buf pos_table, Res y, Res positions, float scale, float rate,
       int32_t padding_id) {
      return Fwd<CpuTypes>("embedding_fwd", RunFwdCpu, ids, offset, rng, table, pos_table, y, positions, nullptr,
                           nullptr, scale, rate, padding_id);
    },
    FwdAttrs(FwdArgs(xffi::Ffi::Bind()).Ret<Buf>().Ret<Buf>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingSortFwdCpuHandler,
    [](Buf ids, Buf offset, Buf rng, Buf table, Buf pos_table, Res y, Res positions, Res sorted_keys, Res order,
       Res /*workspace: CUDA only*/, float scale, float rate, int32_t padding_id) {
      return Fwd<CpuTypes>("embedding_sort_fwd", RunFwdCpu, ids, offset, rng, table, pos_table, y, positions,
                           &sorted_keys, &order, scale, rate, padding_id);
    },
    FwdAttrs(FwdArgs(xffi::Ffi::Bind()).Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingBwdCpuHandler,
    [](Buf dy, Buf keys, Buf order, Buf rng, Res grad, Res partials, Res counters, float factor, float rate,
       int32_t chunk, int32_t slice) {
      return Bwd<CpuTypes>("embedding_bwd", RunBwdCpu, dy, keys, order, rng, grad, partials, counters, factor, rate,
                           chunk, slice);
    },
    xffi::Ffi::Bind()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("factor")
        .Attr<float>("rate")
        .Attr<int32_t>("chunk")
        .Attr<int32_t>("slice"));

LSJAX_FFI_TARGET_CPU("embedding_fwd", EmbeddingFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("embedding_sort_fwd", EmbeddingSortFwdCpuHandler);
LSJAX_FFI_TARGET_CPU("embedding_bwd", EmbeddingBwdCpuHandler);

// ------------------------------------------------------------------ CUDA --
#ifdef LSJAX_WITH_CUDA

// With a sort, workspace is its (unused without one) workspace result.
auto RunFwdCuda(cudaStream_t stream, Res* workspace) {
  return [stream, workspace](const auto& a, const EmbeddingSortArgs* sort) {
    if (!sort) return CudaStatus(EmbeddingFwdCuda(a, stream), "embedding_fwd");
    if ((*workspace)->size_bytes() < EmbeddingSortWorkspaceBytes(a.tokens, a.vocab)) {
      return xffi::Error::InvalidArgument(
          "embedding_sort_fwd: workspace must hold lsjax._ffi.embedding_sort_workspace_bytes(tokens, vocab) bytes");
    }
    return CudaStatus(EmbeddingFwdSortCuda(a, *sort, (*workspace)->untyped_data(), stream), "embedding_sort_fwd");
  };
}
auto RunBwdCuda(cudaStream_t stream) {
  return [stream](const auto& a) { return CudaStatus(EmbeddingBwdCuda(a, stream), "embedding_bwd"); };
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingFwdCudaHandler,
    [](cudaStream_t stream, Buf ids, Buf offset, Buf rng, Buf table, Buf pos_table, Res y, Res positions,
       float scale, float rate, int32_t padding_id) {
      return Fwd<CudaTypes>("embedding_fwd", RunFwdCuda(stream, nullptr), ids, offset, rng, table, pos_table, y,
                            positions, nullptr, nullptr, scale, rate, padding_id);
    },
    FwdAttrs(FwdArgs(xffi::Ffi::Bind().Ctx<Stream>()).Ret<Buf>().Ret<Buf>()), {xffi::Traits::kCmdBufferCompatible});

auto SortFwdCuda = [](cudaStream_t stream, Buf ids, Buf offset, Buf rng, Buf table, Buf pos_table, Res y,
                      Res positions, Res sorted_keys, Res order, Res workspace, float scale, float rate,
                      int32_t padding_id) {
  return Fwd<CudaTypes>("embedding_sort_fwd", RunFwdCuda(stream, &workspace), ids, offset, rng, table, pos_table, y,
                        positions, &sorted_keys, &order, scale, rate, padding_id);
};
auto SortFwdBinding() {
  return FwdAttrs(FwdArgs(xffi::Ffi::Bind().Ctx<Stream>()).Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>());
}

// The sorting forward outside XLA's command buffers (embedding_sort_fwd) and
// inside them (embedding_sort_fwd_graph, for small token counts, where the
// host's work of launching the sort's kernels on every call costs more than
// the graph's ordering of them behind the forward kernel).
XLA_FFI_DEFINE_HANDLER_SYMBOL(EmbeddingSortFwdCudaHandler, SortFwdCuda, SortFwdBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(EmbeddingSortFwdGraphCudaHandler, SortFwdCuda, SortFwdBinding(),
                              {xffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EmbeddingBwdCudaHandler,
    [](cudaStream_t stream, Buf dy, Buf keys, Buf order, Buf rng, Res grad, Res partials, Res counters,
       float factor, float rate, int32_t chunk, int32_t slice) {
      return Bwd<CudaTypes>("embedding_bwd", RunBwdCuda(stream), dy, keys, order, rng, grad, partials, counters,
                            factor, rate, chunk, slice);
    },
    xffi::Ffi::Bind()
        .Ctx<Stream>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Arg<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Ret<Buf>()
        .Attr<float>("factor")
        .Attr<float>("rate")
        .Attr<int32_t>("chunk")
        .Attr<int32_t>("slice"),
    {xffi::Traits::kCmdBufferCompatible});

LSJAX_FFI_TARGET_CUDA("embedding_fwd", EmbeddingFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("embedding_sort_fwd", EmbeddingSortFwdCudaHandler);
LSJAX_FFI_TARGET_CUDA("embedding_sort_fwd_graph", EmbeddingSortFwdGraphCudaHandler);
LSJAX_FFI_TARGET_CUDA("embedding_bwd", EmbeddingBwdCudaHandler);

#endif  // LSJAX_WITH_CUDA

}  // namespace
}  // namespace lsjax::ffi
