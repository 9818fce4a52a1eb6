"""Sharding and vmap support shared by the row-wise fused ops.

A row-wise op treats every operand and result as one of these kinds:

* ``ROWS``:  ``[..., d]`` - leading dims are independent rows, the last dim is
  reduced over inside the kernel (so it must not be sharded) unless the op is
  ``elementwise`` (below);
* ``STATS``: ``[...]`` - one value per row (per-row statistics, labels, ids);
* ``CALL_STATS``: sharded as ``STATS``, but the values describe the whole
  local call (a sort of its rows): under ``jax.vmap`` such an op maps
  sequentially, so that every instance has its own;
* ``PARAM``: any shape, read whole by every row (scale, bias, tables);
* ``COLS``: ``[d]`` - one value per column of the ``ROWS`` operands (a bias),
  sharded as their last dim;
* ``TABLE``: ``[vocab, ...]`` - a table the rows index into (an embedding
  table); replicated like ``PARAM`` except that its dim 0 may stay sharded
  (``split_table``, below);
* ``ROW_SUM``: result only; a sum over all rows (e.g. ``dscale``);
* ``COL_SUM``: result only; ``[d]``, a per-column sum over all rows (``dbias``),
  sharded as the last dim;
* ``TABLE_SUM``: result only; ``[vocab, ...]``, a per-table-row sum over all
  rows (a table gradient), sharded like the ``TABLE`` operand;
* ``RNG``: the ``uint32[4]`` dropout operand of :mod:`lsjax.ops._philox`.

:func:`rowwise` wraps a function of local arrays (which calls the FFI target)
so that under a mesh the rows stay sharded as the first ``ROWS``/``STATS``/``CALL_STATS``
operand is (no all-gather): ``PARAM`` operands are replicated and ``ROW_SUM``/
``COL_SUM``/``TABLE_SUM`` results are ``psum``-ed over the mesh axes that shard
the rows. Under ``jax.vmap`` the mapped axis becomes one more row dim; when a
``PARAM``/``COLS``/``TABLE`` operand is mapped, or a sum result must be
per-example, it falls back to a sequential ``lax.map``.

Element-wise ops (``elementwise=True``: no reduction over the last dim, results
``ROWS`` and ``COL_SUM`` only) keep a sharded last dim as it is: the kernel
runs on the local ``[rows, columns]`` blocks, with the ``COLS`` operands'
matching slices.

Reductions over a sharded last dim (vocab-parallel ops): by default the last
dim of ``ROWS`` operands is gathered, since the kernel reduces over it. An op
that passes ``split_last`` keeps it sharded: on the local blocks it then runs
``split_last(shard, *static, *arrays)`` instead of the kernel, where
``shard`` (:class:`DimShard`) names the mesh axes, this block's index and
the block count, and ``split_last`` combines across the axes itself
(``lax.psum``/``lax.pmax``).

Vocab-parallel tables (Megatron's ``VocabParallelEmbedding``): an op with a
``TABLE`` operand passes ``split_table``. When the table's dim 0 is sharded
(into equal blocks, over mesh axes that do not shard the rows) it stays so:
every block runs ``split_table(shard, *static, *arrays)`` on its local
``[vocab / count, ...]`` table block (rows sharded as usual, replicated over
the table's axes), which looks up only the table rows it owns and combines
across ``shard.axes`` itself; ``TABLE_SUM`` results are then local
``[vocab / count, ...]`` blocks, still ``psum``-ed over the row axes only.

Dropout: a kernel with an ``RNG`` operand draws element ``(r, c)`` of its
local ``[rows, H]`` block (the first ``ROWS`` operand's, else result's) at
Philox index ``offset + r * row_stride + c``, with ``row_stride`` the global
last dim ``H``. Only an ``elementwise`` op's last dim can be sharded, so only
such an op gets ``row_stride`` as one more static argument after its own; any
other op's stride is its local last dim. Under a mesh an op with an ``RNG``
operand keeps only the leading row dim sharded (others are gathered; the last
dim stays sharded if the op is ``elementwise``), and the block in row shard
``i`` and column block ``j`` (width ``h``) adds ``i * local_rows * H + j * h``
to the ``RNG`` offset: every element draws its index ``row * H + column`` in
the global ``[rows, H]`` view, exactly the unsharded mask, for the forward and
the backward alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

ROWS, STATS, PARAM, COLS, TABLE = "rows", "stats", "param", "cols", "table"
CALL_STATS = "call_stats"
ROW_SUM, COL_SUM, TABLE_SUM, RNG = "row_sum", "col_sum", "table_sum", "rng"
_WHOLE = (PARAM, COLS, TABLE, RNG)  # operands that are not split into rows
_SUMS = (ROW_SUM, COL_SUM, TABLE_SUM)  # results summed over the rows


def param_operands(x: jax.Array, *params: jax.Array) -> tuple[jax.Array, ...]:
    """``params`` (``[hidden]`` vectors: a bias, a layer-norm scale) as the kernels take them
    (csrc/param_vec.h): as they are when all are in ``x``'s dtype (16-bit params cost no
    convert), else all float32. The kernels write their gradients in the same dtype."""
    if all(p.dtype == x.dtype for p in params):
        return params
    return tuple(p.astype(jnp.float32) for p in params)


class DimShard(NamedTuple):
    """Where a local block sits along a sharded dim (``split_last``: the last
    dim of ``ROWS``; ``split_table``: dim 0 of ``TABLE``)."""

    axes: tuple[str, ...]  # mesh axes sharding the dim, major first
    index: jax.Array  # int32 block index, row-major over ``axes``
    count: int  # number of blocks

    def local(self, indices: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
        """int32 global ``indices`` into the dim -> (``indices`` relative to this
        block of ``block`` entries, bool: whether this block owns them)."""
        local = indices - self.index * block
        return local, (local >= 0) & (local < block)


def _row_spec(arg_shapes: Sequence[Any], in_kinds: Sequence[str]) -> tuple:
    """Partition spec entries of the row dims, from the first ROWS/STATS/CALL_STATS operand."""
    for shape, kind in zip(arg_shapes, in_kinds):
        if kind not in (ROWS, STATS, CALL_STATS):
            continue
        n_rows = len(shape.shape) - (1 if kind == ROWS else 0)
        sharding = shape.sharding
        spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
        spec = spec + (None,) * (len(shape.shape) - len(spec))
        return spec[:n_rows]
    return ()


def _last_spec(arg_shapes: Sequence[Any], in_kinds: Sequence[str], mesh):
    """Partition spec entry of the last dim of the first ROWS operand (None if
    unsharded, or not split into equal blocks)."""
    for shape, kind in zip(arg_shapes, in_kinds):
        if kind == ROWS:
            sharding = shape.sharding
            spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
            last = spec[len(shape.shape) - 1] if len(spec) == len(shape.shape) else None
            return None if shape.shape[-1] % _count((last,), mesh) else last
    return None


def _table_spec(arg_shapes: Sequence[Any], in_kinds: Sequence[str], mesh):
    """Partition spec entry of dim 0 of the first TABLE operand (None if
    unsharded, or not split into equal blocks)."""
    shape = next(s for s, k in zip(arg_shapes, in_kinds) if k == TABLE)
    sharding = shape.sharding
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    first = spec[0] if spec else None
    return None if shape.shape[0] % _count((first,), mesh) else first


def _count(spec: tuple, mesh) -> int:
    """Number of blocks the mesh axes of ``spec`` make."""
    return int(np.prod([mesh.shape[a] for a in mesh_axes(spec)], dtype=np.int64))


def _sharding_for(kind: str, rank: int, row_spec: tuple, mesh, last=None, table=None) -> NamedSharding:
    if kind in (PARAM, ROW_SUM, RNG):
        return NamedSharding(mesh, PartitionSpec())
    if kind in (COLS, COL_SUM):
        return NamedSharding(mesh, PartitionSpec(last))
    if kind in (TABLE, TABLE_SUM):
        return NamedSharding(mesh, PartitionSpec(table, *(None,) * (rank - 1)))
    n_rows = rank - (1 if kind == ROWS else 0)
    lead = row_spec[len(row_spec) - n_rows :] if n_rows <= len(row_spec) else (None,) * n_rows
    return NamedSharding(mesh, PartitionSpec(*lead, *((last,) if kind == ROWS else ())))


def mesh_axes(row_spec: tuple) -> tuple[str, ...]:
    axes: list[str] = []
    for entry in row_spec:
        if entry is None:
            continue
        axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(axes)


def _rule(in_kinds: Sequence[str], out_kinds: Sequence[str], in_ranks, out_ranks,
          share_last: bool) -> tuple[str, list[str]]:
    """Shardy rule and its replicated factors: row dims are shared factors,
    everything else its own factor that must be replicated.

    With ``share_last`` the last dims of all ROWS operands and the COLS /
    COL_SUM dims share one factor (``v``) that may stay sharded. Dim 0 of the
    TABLE operand and of the TABLE_SUM results share one (``t``) that may stay
    sharded.
    """
    n_rows = max(r - (1 if k == ROWS else 0) for k, r in zip(in_kinds, in_ranks) if k in (ROWS, STATS, CALL_STATS))
    row = [f"r{i}" for i in range(n_rows)]
    fresh = iter(f"c{i}" for i in range(1000))
    own: list[str] = []

    def last() -> str:
        if share_last:
            return "v"
        own.append(next(fresh))
        return own[-1]

    def dims(kind: str, rank: int) -> str:
        if kind in (STATS, CALL_STATS):
            return " ".join(row[n_rows - rank :])
        if kind == ROWS:
            return " ".join(row[n_rows - (rank - 1) :] + [last()])
        if kind in (COLS, COL_SUM):
            return last()
        table = kind in (TABLE, TABLE_SUM)
        names = [next(fresh) for _ in range(rank - table)]
        own.extend(names)
        return " ".join(["t"] * table + names)

    ins = ", ".join(dims(k, r) for k, r in zip(in_kinds, in_ranks))
    outs = ", ".join(dims(k, r) for k, r in zip(out_kinds, out_ranks))
    return f"{ins} -> {outs}", own


def _shard_index(row_spec: tuple, mesh) -> jax.Array:
    """Row-major index of this shard over the mesh axes sharding the rows (uint32)."""
    index = jnp.uint32(0)
    for entry in row_spec:
        if entry is None:
            continue
        for axis in entry if isinstance(entry, tuple) else (entry,):
            index = index * jnp.uint32(mesh.shape[axis]) + jax.lax.axis_index(axis).astype(jnp.uint32)
    return index


def _advance(rng: jax.Array, index: jax.Array, step: int) -> jax.Array:
    """``rng`` with ``index * step`` (uint32 ``index``) added to its 64-bit offset."""
    from lsjax.ops._philox import _mulhilo  # the one uint32 wide multiply

    hi, lo = _mulhilo(index, np.uint32(step & 0xFFFFFFFF))
    hi = hi + index * np.uint32(step >> 32)
    new_lo = rng[2] + lo
    new_hi = rng[3] + hi + (new_lo < lo).astype(jnp.uint32)
    return jnp.stack([rng[0], rng[1], new_lo, new_hi])


def _shift_rng(arrays, in_kinds, out_kinds, arg_shapes, result_shape, row_spec, last, mesh):
    """Advances every RNG operand's offset to this block's first element:
    ``row_shard * local_rows * H + column_block * h`` (module docstring)."""
    shapes = [*zip(arg_shapes, in_kinds), *zip(jax.tree.leaves(result_shape), out_kinds)]
    ref = next(s for s, k in shapes if k == ROWS)
    row_step = int(np.prod(ref.shape, dtype=np.int64)) // _count(row_spec, mesh)  # local_rows * H
    col_step = ref.shape[-1] // _count((last,), mesh)  # h
    out = list(arrays)
    for i, kind in enumerate(in_kinds):
        if kind == RNG:
            for spec, step in ((row_spec, row_step), ((last,), col_step)):
                if mesh_axes(spec):
                    out[i] = _advance(out[i], _shard_index(spec, mesh), step)
    return tuple(out)


def _dim_shard(entry, mesh) -> DimShard:
    """The DimShard of this device's block along a dim sharded as spec ``entry``."""
    return DimShard(mesh_axes((entry,)), _shard_index((entry,), mesh).astype(jnp.int32), _count((entry,), mesh))


def _make_partitioned(local_fn: Callable, in_kinds: tuple, out_kinds: tuple, n_static: int,
                      split_last: Callable | None, split_table: Callable | None, elementwise: bool):
    """custom_partitioning of ``local_fn(*static, *arrays)``."""
    static_argnums = tuple(range(n_static))
    fn = custom_partitioning(local_fn, static_argnums=static_argnums)

    def shardings(mesh, arg_shapes, result_shapes):
        row_spec = _row_spec(arg_shapes, in_kinds)
        if RNG in in_kinds and row_spec:
            # Only the leading dim may stay sharded: each shard then holds a
            # contiguous row block of the [rows, H] view, so the shifted offset
            # and row_stride H give exactly the unsharded mask, however the
            # forward and backward get partitioned.
            row_spec = (row_spec[0],) + (None,) * (len(row_spec) - 1)
        last = _last_spec(arg_shapes, in_kinds, mesh) if (split_last or elementwise) else None
        if set(mesh_axes((last,))) & set(mesh_axes(row_spec)):
            last = None  # a mesh axis shards the rows already
        table = _table_spec(arg_shapes, in_kinds, mesh) if split_table else None
        if set(mesh_axes((table,))) & set(mesh_axes(row_spec)):
            table = None  # likewise
        args = tuple(
            _sharding_for(k, len(s.shape), row_spec, mesh, last, table) for k, s in zip(in_kinds, arg_shapes)
        )
        results = tuple(
            _sharding_for(k, len(s.shape), row_spec, mesh, last, table) for k, s in zip(out_kinds, result_shapes)
        )
        return row_spec, last, table, args, results

    def infer(*args):
        *static, mesh, arg_shapes, result_shape = args
        *_, results = shardings(mesh, arg_shapes, jax.tree.leaves(result_shape))
        return results if isinstance(result_shape, (tuple, list)) else results[0]

    def partition(*args):
        *static, mesh, arg_shapes, result_shape = args
        row_spec, last, table, arg_shardings, results = shardings(mesh, arg_shapes, jax.tree.leaves(result_shape))
        axes = mesh_axes(row_spec)
        last_axes = mesh_axes((last,))

        def lower(*arrays):
            if RNG in in_kinds and (axes or last_axes):
                arrays = _shift_rng(arrays, in_kinds, out_kinds, arg_shapes, result_shape, row_spec, last, mesh)
            if last_axes and split_last:
                outs = split_last(_dim_shard(last, mesh), *static, *arrays)
            elif mesh_axes((table,)):
                outs = split_table(_dim_shard(table, mesh), *static, *arrays)
            else:
                outs = local_fn(*static, *arrays)
            flat = outs if isinstance(outs, (tuple, list)) else (outs,)
            flat = tuple(jax.lax.psum(o, axes) if (k in _SUMS and axes) else o for o, k in zip(flat, out_kinds))
            return flat if isinstance(outs, (tuple, list)) else flat[0]

        out_shardings = results if isinstance(result_shape, (tuple, list)) else results[0]
        return mesh, lower, out_shardings, arg_shardings

    def sharding_rule(*args):
        *static, mesh, value_types, result_types = args
        ranks_in = [len(t.shape) for t in value_types]
        ranks_out = [len(t.shape) for t in result_types]
        rule, own = _rule(in_kinds, out_kinds, ranks_in, ranks_out, split_last is not None or elementwise)
        return rule, {"need_replication_factors": tuple(own)}

    fn.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule)
    return fn


def rowwise(in_kinds: Sequence[str], out_kinds: Sequence[str], n_static: int = 0,
            split_last: Callable | None = None, split_table: Callable | None = None, elementwise: bool = False):
    """Decorator: make ``local_fn(*static, *arrays)`` shard- and vmap-aware.

    ``static`` are hashable trace-time constants (attributes, dtypes). The
    returned function takes ``(*static, *arrays)``; an ``elementwise`` op
    with an ``RNG`` operand has ``local_fn(*static, row_stride, *arrays)``. ``split_last(shard,
    *static, *arrays)``, if given, runs instead of ``local_fn`` when the last
    dim of the ``ROWS`` operands is sharded; ``elementwise`` runs ``local_fn``
    on such blocks as they are; ``split_table(shard, *static, *arrays)``
    (required with a ``TABLE`` operand) runs instead of ``local_fn`` when dim 0
    of the ``TABLE`` operand is sharded (see the module docstring).
    """
    in_kinds, out_kinds = tuple(in_kinds), tuple(out_kinds)
    if split_last is not None and (elementwise or RNG in in_kinds):
        raise ValueError("rowwise: split_last (a reduction over the last dim) cannot be combined with "
                         "elementwise or an RNG operand")
    if in_kinds.count(TABLE) != (split_table is not None):
        raise ValueError(f"rowwise: pass split_table (how a block of a vocab-sharded table runs) exactly when the op "
                         f"has one TABLE operand; got operands {in_kinds} and split_table={split_table}")
    if TABLE_SUM in out_kinds and TABLE not in in_kinds:
        raise ValueError("rowwise: a TABLE_SUM result takes its sharding from a TABLE operand; pass the table "
                         f"(it may be read only for its shape), got operands {in_kinds}")
    if split_table is not None and (split_last is not None or elementwise):
        raise ValueError("rowwise: split_table cannot be combined with split_last or elementwise")
    if elementwise and not set(out_kinds) <= {ROWS, COL_SUM}:
        raise ValueError(f"rowwise: an elementwise op's results must be ROWS or COL_SUM (the others would "
                         f"be partial over a sharded last dim), got {out_kinds}")
    with_stride = RNG in in_kinds and elementwise

    def wrap(local_fn: Callable) -> Callable:
        partitioned = _make_partitioned(local_fn, in_kinds, out_kinds, n_static + with_stride, split_last,
                                        split_table, elementwise)

        @functools.wraps(local_fn)
        def call(*args):
            static, arrays = args[:n_static], args[n_static:]
            if with_stride:  # row_stride: the global last dim
                static = (*static, next(a.shape[-1] for a, k in zip(arrays, in_kinds) if k == ROWS))
            fn = jax.custom_batching.custom_vmap(lambda *a: partitioned(*static, *a))

            @fn.def_vmap
            def _vmap_rule(axis_size, in_batched, *a):
                # Re-enter `fn` (not the bare partitioned call) so nested vmaps
                # reach this rule again.
                return batched_call(fn, in_kinds, out_kinds, axis_size, in_batched, a)

            return fn(*arrays)

        return call

    return wrap


def batched_call(f, in_kinds, out_kinds, axis_size, in_batched, args):
    """vmap rule: the mapped axis (at 0) becomes a leading row dim when possible."""
    mapped_param = any(b for b, k in zip(in_batched, in_kinds) if k in _WHOLE)
    # RNG ops map sequentially too: every instance must see the same mask
    # as an unbatched call with the same key; so do CALL_STATS results.
    if mapped_param or set(_SUMS) & set(out_kinds) or RNG in in_kinds or CALL_STATS in out_kinds:
        batched_args = [a for a, b in zip(args, in_batched) if b]

        def one(xs):
            it = iter(xs)
            return f(*(next(it) if b else a for a, b in zip(args, in_batched)))

        outs = jax.lax.map(one, batched_args)
        flat = outs if isinstance(outs, (tuple, list)) else (outs,)
        return outs, (type(outs)(True for _ in flat) if isinstance(outs, (tuple, list)) else True)
    full = [a if (b or k in _WHOLE) else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b, k in zip(args, in_batched, in_kinds)]
    outs = f(*full)
    flat = outs if isinstance(outs, (tuple, list)) else (outs,)
    return outs, (type(outs)(True for _ in flat) if isinstance(outs, (tuple, list)) else True)
