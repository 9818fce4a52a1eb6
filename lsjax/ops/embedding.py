"""Fused token embedding: lookup x scale + positions + dropout (LightSeq's
``lookup_scale_pos_dropout``), with a deterministic table gradient.

Backends: ``"xla"`` runs :func:`embedding_reference`; ``"cpu_ffi"``/``"cuda"``
run the FFI targets ``lsjax_embedding_fwd_{cpu,cuda}`` (and, under autodiff,
``lsjax_embedding_sort_fwd_*``) and ``lsjax_embedding_bwd_*`` under a
``jax.custom_vjp`` that saves only int32 per-token arrays: the ids and the
tokens stably sorted by table row (keys and order, for the backward's segment
sum), plus the ``int32[1]`` offset and the ``uint32[4]`` dropout operand (the
backward regenerates the dropout mask: it runs at the same speed without dropout, so
storing mask bits would not pay). The sort is done by the forward: on CUDA by
CUB on a second stream while the forward kernel runs (the sort is a chain of
small latency-bound kernels, the forward bandwidth-bound), so it is off the
backward's critical path.

Position numbering (fairseq ``make_positions`` / LightSeq
``get_tokens_position``, shifted to start at ``offset``): the position of a
non-pad token is ``offset + (number of non-pad tokens up to and including it in
its row) - 1``. Pads do not advance the count, so left- and right-padded
batches embed their tokens identically. For incremental decoding, step ``t``
(``seq == 1``) uses ``offset=t``. fairseq numbers the same tokens from
``padding_idx + 1``: its sinusoidal embedding equals ours with
``offset=padding_idx + 1``.

Sinusoids use fairseq's layout: with ``half = hidden // 2`` and
``f_i = exp(-log(10000) * i / max(half - 1, 1))``, columns ``[0, half)`` are
``sin(p * f_i)``, columns ``[half, 2 half)`` are ``cos(p * f_i)``, and the last
column is 0 when ``hidden`` is odd. They are computed in the kernel (no table).

The kernels count the positions themselves (a warp per row counts its
non-pad tokens from the ``offset`` operand into an int32 workspace result,
dropped), and draw the dropout bits of token ``n``'s column ``j`` at Philox
element ``n * hidden + j``: no per-token operand besides the ids.

Sharding (``lsjax.ops._rowwise``): ids are ``STATS``, the output ``ROWS``, the
token table a ``TABLE`` (vocab-parallel, below), the offset and a learned
position table replicated ``PARAM``-s, and the gradients ``TABLE_SUM``
(``psum`` over the row shards). The dropout operand is an ``RNG``: only the
batch dim stays sharded (whole rows, so each shard counts its own rows'
positions) and each shard's Philox offset is advanced to its first element,
so every shard reproduces the unsharded output and mask exactly.

Vocab-parallel (Megatron's ``VocabParallelEmbedding``): when the token table
is sharded over its vocab dim (by mesh axes that do not shard the ids), it is
never gathered. The forward looks up, on each table block, the rows of the
tokens it owns (zeros for the others) and ``psum``-s them over the vocab axes:
exactly ``table[ids]``, one ``[tokens, hidden]`` row per local token. The
kernel then runs on those rows as its table, with each token's own index as
its id (pads mapped to a padding id), so scale, positions and the dropout mask
stay fused and identical to the unsharded op. The backward segment-sums only
the tokens each block owns into its ``[vocab / n, hidden]`` gradient block,
which stays sharded like the table.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_rank, static_scale
from lsjax.ops._philox import check_rate, dropout_mask, no_rng, rng_operand
from lsjax.ops._rowwise import CALL_STATS, PARAM, RNG, ROWS, STATS, TABLE, TABLE_SUM, DimShard, rowwise

_F32 = jnp.float32
_I32 = jnp.int32
_NO_ROW = np.int32(-1)  # padding id of the vocab-parallel forward's token-indexed rows


def token_positions(ids: jax.Array, padding_id: int = 0, offset: int | jax.Array = 0) -> jax.Array:
    """int32 ``[batch, seq]`` positions: ``offset + cumsum(ids != padding_id) - 1``.

    Pads get the position of the last non-pad token before them (unused: pad
    rows are zero).
    """
    nonpad = (ids != padding_id).astype(_I32)
    return (jnp.asarray(offset, _I32) + jnp.cumsum(nonpad, axis=-1, dtype=_I32) - 1).astype(_I32)


def sinusoidal_positions(positions: jax.Array, hidden: int) -> jax.Array:
    """float32 ``[..., hidden]`` fairseq-layout sinusoids of integer ``positions``."""
    half = hidden // 2
    c = np.float32(-math.log(10000.0) / max(half - 1, 1))
    freq = jnp.exp(jnp.arange(half, dtype=_F32) * c)
    arg = positions.astype(_F32)[..., None] * freq
    parts = [jnp.sin(arg), jnp.cos(arg)]
    if hidden % 2:
        parts.append(jnp.zeros(positions.shape + (1,), _F32))
    return jnp.concatenate(parts, axis=-1)


def _dropout_scale(rate: float) -> np.float32:
    return np.float32(1.0) / (np.float32(1.0) - np.float32(rate))


def embedding_reference(ids: jax.Array, table: jax.Array, *, scale: float | None = None,
                        positions: str | jax.Array = "sinusoidal", padding_id: int = 0, rate: float = 0.0,
                        key: jax.Array | None = None, offset: int | jax.Array = 0) -> jax.Array:
    """Pure-JAX embedding in float32; same contract as :func:`embedding`.

    The gather reads a float32 copy of the table, so the autodiff gradient is a
    float32 scatter-add rounded once to the table dtype.
    """
    ids = jnp.asarray(ids).astype(_I32)
    hidden = table.shape[1]
    scale = math.sqrt(hidden) if scale is None else scale
    nonpad = ids != padding_id
    pos = token_positions(ids, padding_id, offset)
    y = jnp.take(table.astype(_F32), ids, axis=0, mode="clip") * np.float32(scale)
    if isinstance(positions, str):
        y = y + sinusoidal_positions(pos, hidden)
    else:
        y = y + jnp.take(positions.astype(_F32), pos, axis=0, mode="clip")
    y = jnp.where(nonpad[..., None], y, 0.0)
    if rate > 0 and key is not None:
        keep = dropout_mask(rng_operand(key), y.shape, rate)
        y = jnp.where(keep, y * _dropout_scale(rate), 0.0)
    return y.astype(table.dtype)


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check(op, ids, table, scale, positions, padding_id, rate, offset):
    if np.ndim(ids) != 2:
        raise ValueError(f"{op}: ids must be [batch, seq], got shape {tuple(np.shape(ids))}")
    check_rank(op, "ids", ids, 2)
    if not jnp.issubdtype(getattr(ids, "dtype", None) or np.asarray(ids).dtype, jnp.integer):
        raise TypeError(f"{op}: ids must be an integer array (int32), got {getattr(ids, 'dtype', type(ids))}")
    if np.ndim(table) != 2:
        raise ValueError(f"{op}: table must be [vocab, hidden], got shape {tuple(np.shape(table))}")
    check_rank(op, "table", table, 2)
    check_float(op, "table", table)
    vocab, hidden = table.shape
    if isinstance(positions, str):
        if positions != "sinusoidal":
            raise ValueError(f"{op}: positions must be 'sinusoidal' or a [max_positions, hidden] array, got {positions!r}")
    else:
        if np.ndim(positions) != 2 or positions.shape[1] != hidden:
            raise ValueError(
                f"{op}: a learned position table must have shape [max_positions, {hidden}], got {tuple(np.shape(positions))}")
        check_rank(op, "positions", positions, 2)
        check_float(op, "positions", positions)
    if scale is not None:
        static_scale(op, scale)
    try:
        padding_id = operator.index(padding_id)
    except TypeError:
        raise TypeError(f"{op}: padding_id must be a Python int, got {type(padding_id).__name__}") from None
    if not -(2**31) <= padding_id < 2**31:
        raise ValueError(f"{op}: padding_id must fit in int32, got {padding_id}")
    check_rate(op, rate)
    if isinstance(offset, (int, np.integer)):
        if offset < 0:
            raise ValueError(f"{op}: offset must be >= 0, got {offset}")
        if not isinstance(positions, str) and offset + ids.shape[1] > positions.shape[0]:
            raise ValueError(
                f"{op}: positions up to offset + seq - 1 = {offset + ids.shape[1] - 1} do not fit the learned "
                f"position table of {positions.shape[0]} rows (max_positions); use a shorter bucket or a larger table")
    else:
        if np.ndim(offset) != 0 or not jnp.issubdtype(jnp.asarray(offset).dtype, jnp.integer):
            raise TypeError(f"{op}: offset must be an int or an integer scalar array, got {offset!r}")
    a = _concrete(ids)
    if a is not None:
        bad = (a != padding_id) & ((a < 0) | (a >= vocab))
        if bad.any():
            raise ValueError(f"{op}: ids must be in [0, {vocab}) (or padding_id={padding_id}); "
                             f"found {int(a[bad][0])}")
    return padding_id


def embedding(ids: jax.Array, table: jax.Array, *, scale: float | None = None,
              positions: str | jax.Array = "sinusoidal", padding_id: int = 0, rate: float = 0.0,
              key: jax.Array | None = None, offset: int | jax.Array = 0) -> jax.Array:
    """``dropout(table[ids] * scale + pos_embedding)``, zero at pads.

    Args:
      ids: integer ``[batch, seq]`` token ids (used as int32), in
        ``[0, vocab)`` or equal to ``padding_id``. Checked when concrete;
        traced out-of-range ids are clamped to ``[0, vocab)`` (as a JAX gather).
      table: ``[vocab, hidden]`` float32, float16 or bfloat16.
      scale: multiplies the looked-up rows; default ``sqrt(hidden)``.
      positions: ``"sinusoidal"`` (fairseq layout, computed in the kernel; see
        the module doc) or a learned ``[max_positions, hidden]`` float table
        (used in ``table``'s dtype; ``offset + seq <= max_positions`` is checked
        for an int offset, a traced offset's positions are clamped).
      padding_id: tokens equal to it give all-zero rows (no position added,
        no gradient) and do not advance the position count.
      rate: dropout rate in ``[0, 1)``; applied only when ``key`` is given.
        Elements are dropped with probability ``floor(rate * 2**16) / 2**16``
        (16 random bits per element).
      key: JAX PRNG key for dropout (Philox mask, element index = flat index
        into the ``[batch, seq, hidden]`` output; identical on every backend).
      offset: position of the first non-pad token (int or traced int scalar).

    Returns:
      ``[batch, seq, hidden]`` in ``table``'s dtype (float32 math inside).

    Gradients flow to ``table`` (and a learned position table): dense
    ``[rows, hidden]``, zero for unused rows and the padding row. They are
    deterministic without float atomics: the tokens are stably argsorted by
    row (by the forward, see the module doc); on the GPU, blocks of up to 64 sorted tokens sum each
    row's ``dy`` rows in ascending token order in float32, and a row whose
    tokens span several blocks adds the blocks' float32 partials in block
    order (the CPU twin sums the whole segment in ascending order: the same
    up to float32 rounding). Each row is written once.
    Under a batch-sharded mesh each shard does this locally and the partial
    gradients are ``psum``-ed; a vocab-sharded ``table`` is never gathered and
    its gradient stays sharded like it (module doc).
    """
    op = "embedding"
    padding_id = _check(op, ids, table, scale, positions, padding_id, rate, offset)
    backend = _backend.get_backend()
    kw = dict(scale=scale, positions=positions, padding_id=padding_id, rate=rate, key=key, offset=offset)
    if backend == "xla":
        return embedding_reference(ids, table, **kw)
    hidden = table.shape[1]
    ids = jnp.asarray(ids).astype(_I32)
    offset = jnp.asarray(offset, _I32).reshape(1)
    dropout = rate > 0 and key is not None
    rng = rng_operand(key) if dropout else no_rng()
    learned = not isinstance(positions, str)
    pos_table = positions.astype(table.dtype) if learned else None
    static = (
        float(math.sqrt(hidden) if scale is None else scale),
        float(rate) if dropout else 0.0,
        padding_id,
        backend,
    )
    return _embedding_ffi(table, pos_table, ids, offset, rng, static)


# ------------------------------------------------------------- FFI path --

def _attrs(scale, rate, padding_id):
    return dict(scale=np.float32(scale), rate=np.float32(rate), padding_id=np.int32(padding_id))


def _out_shape(ids, table):
    return jax.ShapeDtypeStruct(ids.shape + (table.shape[1],), table.dtype)


def _row_keys(index: jax.Array, nonpad: jax.Array, rows: int) -> jax.Array:
    """int32 sort key of each token: its table row ``index`` (clamped), ``rows`` for a pad (no gradient)."""
    return jnp.where(nonpad, jnp.clip(index, 0, rows - 1), np.int32(rows)).astype(_I32)


# Below this many tokens the CUDA sorting forward runs inside XLA's command buffers (CUDA graphs): its
# sort's host-side launches then cost nothing per call; above, outside them, where the graph would order
# the sort's kernels behind the forward kernel's (ffi/embedding.cc).
_GRAPH_SORT_TOKENS = 32768


def _fwd_local(scale, rate, padding_id, backend, sort, ids, offset, rng, table, pos_table):
    """The forward kernel on local blocks; ``pos_table``: a learned one, or ``[0, hidden]`` (sinusoidal).

    With ``sort`` it also returns the backward's stable sort of the tokens by
    :func:`_row_keys` (int32 ``ids.shape`` sorted keys and token order; on CUDA
    it runs on a second stream while the forward kernel runs), else ``y`` alone.
    """
    attrs = _attrs(scale, rate, padding_id)
    index = jax.ShapeDtypeStruct(ids.shape, _I32)  # int32 per token: the positions workspace, the sort's results
    if not sort:
        y, _ = jax.ffi.ffi_call(_backend.ffi_target("embedding_fwd", backend), (_out_shape(ids, table), index))(
            ids, offset, rng, table, pos_table, **attrs)
        return y
    workspace = jax.ShapeDtypeStruct((_sort_workspace_bytes(backend, ids.size, table.shape[0]),), jnp.uint8)
    in_graph = backend == "cuda" and ids.size < _GRAPH_SORT_TOKENS
    y, _, keys, order, _ = jax.ffi.ffi_call(_backend.ffi_target(f"embedding_sort_fwd{'_graph' * in_graph}", backend),
                                            (_out_shape(ids, table), index, index, index, workspace))(
        ids, offset, rng, table, pos_table, **attrs)
    return y, keys, order


@functools.cache
def _sort_workspace_bytes(backend: str, tokens: int, vocab: int) -> int:
    """Bytes of the sorting forward's workspace result (CUB's radix sort on CUDA; none on the CPU)."""
    if backend != "cuda":
        return 0
    from lsjax import _ffi

    return int(_ffi.embedding_sort_workspace_bytes(tokens, vocab))


def _fwd_vocab_parallel(shard: DimShard, scale, rate, padding_id, backend, sort, ids, offset, rng, table, pos_table):
    """The forward on a ``[vocab / shard.count, hidden]`` table block (module doc); the sort (by the global
    row, the same on every block) is XLA's here."""
    block = table.shape[0]
    vocab = block * shard.count
    local, owned = shard.local(jnp.clip(ids, 0, vocab - 1), block)
    picked = jnp.take(table, jnp.clip(local, 0, block - 1).reshape(-1), axis=0)
    rows = jax.lax.psum(jnp.where(owned.reshape(-1, 1), picked, jnp.zeros((), table.dtype)), shard.axes)
    own = jnp.where(ids != padding_id, jnp.arange(ids.size, dtype=_I32).reshape(ids.shape), _NO_ROW)
    y = _fwd_local(scale, rate, int(_NO_ROW), backend, False, own, offset, rng, rows, pos_table)
    if not sort:
        return y
    keys, order = _stable_sort_by_key(_row_keys(ids, ids != padding_id, vocab).reshape(-1), vocab)
    return y, keys.reshape(ids.shape), order.reshape(ids.shape)


# Without and with the sort (whose results describe the whole local call: CALL_STATS).
_FORWARD = {sort: rowwise([STATS, PARAM, RNG, TABLE, PARAM],
                          [ROWS, CALL_STATS, CALL_STATS] if sort else [ROWS],
                          n_static=5, split_table=_fwd_vocab_parallel)(_fwd_local)
            for sort in (False, True)}


def _segment_sum_local(factor, rate, backend, keys, order, dy, rng, like):
    """``like.shape``: sum of ``dy`` (dropout-masked) over the tokens of each row, times factor.

    ``keys``/``order``: the tokens' rows sorted stably ascending and the token
    order (:func:`_stable_sort_by_key`); keys outside ``[0, rows)`` are
    skipped. ``like`` (the table) only gives the row count, dtype and, under a
    mesh, the gradient's sharding.
    """
    tokens, hidden = keys.size, dy.shape[-1]
    chunk, slice_ = _SEGMENT_PLAN
    # The CUDA kernel's workspace, dropped: partials of the segments cut by chunks; their chunk counters,
    # the slice queue, then a bit per grad row with tokens.
    chunks, rows = -(-tokens // chunk), like.shape[0]
    out = (jax.ShapeDtypeStruct((rows, hidden), dy.dtype),
           jax.ShapeDtypeStruct((2 * chunks, hidden), jnp.float32),
           jax.ShapeDtypeStruct((chunks + 1 + -(-rows // 32),), jnp.uint32))
    grad, _, _ = jax.ffi.ffi_call(_backend.ffi_target("embedding_bwd", backend), out)(
        dy, keys.reshape(-1), order.reshape(-1), rng, factor=np.float32(factor), rate=np.float32(rate),
        chunk=np.int32(chunk), slice=np.int32(slice_))
    return grad


# (chunk, slice) of the CUDA backward: sorted tokens per partial sum and per block's turn. A row's
# segment is cut only at chunk boundaries (a float32 partial per chunk it touches: frequent rows want
# long chunks, at most csrc/embedding.h kEmbeddingBwdMaxChunk); blocks take slices in turn from a
# queue, so short slices spread a batch's many short segments over every SM. Slices of 16 were the
# fastest or within 4% of it at every benchmarked shape, 8 to 32 tried (benchmarks/RESULTS.md,
# session 23).
_SEGMENT_PLAN = (64, 16)


def _stable_sort_by_key(keys: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """int32 ``(keys[order], order)``, ``order`` the stable ascending argsort of int32 ``keys`` in ``[0, rows]``.

    With ``rows <= 65535`` (vocabularies up to 64k) the keys are sorted as uint16: XLA's radix
    sort then makes 2 passes over the data instead of 4.
    """
    iota = jnp.arange(keys.size, dtype=_I32)
    if rows <= np.iinfo(np.uint16).max:
        sorted_short, order = jax.lax.sort((keys.astype(jnp.uint16), iota), num_keys=1, is_stable=True)
        return sorted_short.astype(_I32), order
    return jax.lax.sort((keys, iota), num_keys=1, is_stable=True)


def _block_keys(shard: DimShard, keys: jax.Array, rows: int) -> jax.Array:
    """Global row keys -> those of this ``rows``-row table block: earlier blocks' rows map to -1, later
    blocks' rows and pads to ``rows`` (skipped). Monotonic, so sorted keys stay sorted."""
    local, _ = shard.local(keys, rows)
    return jnp.clip(local, -1, rows).astype(_I32)


def _segment_sum_vocab_parallel(shard: DimShard, factor, rate, backend, keys, order, dy, rng, like):
    """The gradient block of a ``[rows / shard.count, hidden]`` table block: its own keys only."""
    keys = _block_keys(shard, keys, like.shape[0])
    return _segment_sum_local(factor, rate, backend, keys, order, dy, rng, like)


def _sort_segment_sum_local(factor, rate, backend, keys, dy, rng, like):
    """:func:`_segment_sum_local` of unsorted ``keys`` (int32 in ``[0, rows]``): sorted here, by XLA."""
    keys, order = _stable_sort_by_key(keys.reshape(-1), like.shape[0])
    return _segment_sum_local(factor, rate, backend, keys, order, dy, rng, like)


def _sort_segment_sum_vocab_parallel(shard: DimShard, factor, rate, backend, keys, dy, rng, like):
    keys = _block_keys(shard, keys, like.shape[0])
    return _sort_segment_sum_local(factor, rate, backend, keys, dy, rng, like)


# Sorted by the forward: the sorted keys come first, so their row sharding (the
# forward's) decides the partitioning and dy follows it.
_segment_sum = rowwise([CALL_STATS, CALL_STATS, ROWS, RNG, TABLE], [TABLE_SUM], n_static=3,
                       split_table=_segment_sum_vocab_parallel)(_segment_sum_local)
_sort_segment_sum = rowwise([STATS, ROWS, RNG, TABLE], [TABLE_SUM], n_static=3,
                            split_table=_sort_segment_sum_vocab_parallel)(_sort_segment_sum_local)


def _embedding_ffi(table, pos_table, ids, offset, rng, static):
    return _embedding_ffi_vjp(table, pos_table, ids, offset, rng, static)


def _forward_call(table, pos_table, ids, offset, rng, static, sort: bool):
    """The forward target on int32 ``ids`` ``[batch, seq]``, ``offset`` ``int32[1]``, ``rng`` ``uint32[4]``."""
    scale, rate, padding_id, backend = static
    if pos_table is None:
        pos_table = jnp.zeros((0, table.shape[1]), table.dtype)
    return _FORWARD[sort](scale, rate, padding_id, backend, sort, ids, offset, rng, table, pos_table)


def _ffi_fwd(table, pos_table, ids, offset, rng, static):
    y, keys, order = _forward_call(table, pos_table, ids, offset, rng, static, sort=True)
    # The tables are saved for their shapes and shardings (params: no copy).
    return y, (table, pos_table, ids, offset, rng, keys, order)


def _ffi_bwd(static, saved, dy):
    scale, rate, padding_id, backend = static
    table, pos_table, ids, offset, rng, keys, order = saved
    dtable = _segment_sum(scale, rate, backend, keys, order, dy, rng, table)
    dpos = None
    if pos_table is not None:
        pos = token_positions(ids, padding_id, offset[0])
        pkeys = _row_keys(pos, ids != padding_id, pos_table.shape[0])
        dpos = _sort_segment_sum(1.0, rate, backend, pkeys, dy, rng, pos_table)
    return dtable, dpos, None, None, None


_embedding_ffi_vjp = jax.custom_vjp(lambda table, pos_table, ids, offset, rng, static: _forward_call(
    table, pos_table, ids, offset, rng, static, sort=False), nondiff_argnums=(5,))
_embedding_ffi_vjp.defvjp(_ffi_fwd, _ffi_bwd)
