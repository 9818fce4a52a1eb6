"""Sharding and vmap support shared by the row-wise fused ops.

A row-wise op treats every operand and result as one of four kinds:

* ``ROWS``:  ``[..., d]`` - leading dims are independent rows, the last dim is
  reduced over inside the kernel (so it must not be sharded);
* ``STATS``: ``[...]`` - one value per row (per-row statistics, labels, ids);
* ``PARAM``: any shape, read whole by every row (scale, bias, tables);
* ``ROW_SUM``: result only; a sum over all rows (e.g. ``dscale``);
* ``RNG``: the ``uint32[4]`` dropout operand of :mod:`lsjax.ops._philox`.

:func:`rowwise` wraps a function of local arrays (which calls the FFI target)
so that under a mesh the rows stay sharded as the first ``ROWS``/``STATS``
operand is (no all-gather): ``PARAM`` operands are replicated and ``ROW_SUM``
results are ``psum``-ed over the mesh axes that shard the rows. Under
``jax.vmap`` the mapped axis becomes one more row dim; when a ``PARAM`` operand
is mapped, or a ``ROW_SUM`` result must be per-example, it falls back to a
sequential ``lax.map``.

Reductions over a sharded last dim (vocab-parallel ops): by default the last
dim of ``ROWS`` operands is gathered, since the kernel reduces over it. An op
that passes ``split_last`` keeps it sharded: on the local blocks it then runs
``split_last(shard, *static, *arrays)`` instead of the kernel, where
``shard`` (:class:`LastDimShard`) names the mesh axes, this block's index and
the block count, and ``split_last`` combines across the axes itself
(``lax.psum``/``lax.pmax``).

Dropout under a mesh: ops with an ``RNG`` operand keep only the leading dim
sharded (others are gathered), and each shard adds ``shard_index *
local_elements`` (of the first ``ROWS`` result) to the ``RNG`` offset: exactly
the unsharded mask, for the forward and the backward alike.
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

ROWS, STATS, PARAM, ROW_SUM, RNG = "rows", "stats", "param", "row_sum", "rng"


class LastDimShard(NamedTuple):
    """Where a local block sits along a sharded last dim (see ``split_last``)."""

    axes: tuple[str, ...]  # mesh axes sharding the last dim, major first
    index: jax.Array  # int32 block index, row-major over ``axes``
    count: int  # number of blocks


def _row_spec(arg_shapes: Sequence[Any], in_kinds: Sequence[str]) -> tuple:
    """Partition spec entries of the row dims, from the first ROWS/STATS operand."""
    for shape, kind in zip(arg_shapes, in_kinds):
        if kind not in (ROWS, STATS):
            continue
        n_rows = len(shape.shape) - (1 if kind == ROWS else 0)
        sharding = shape.sharding
        spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
        spec = spec + (None,) * (len(shape.shape) - len(spec))
        return spec[:n_rows]
    return ()


def _last_spec(arg_shapes: Sequence[Any], in_kinds: Sequence[str]):
    """Partition spec entry of the last dim of the first ROWS operand (None if unsharded)."""
    for shape, kind in zip(arg_shapes, in_kinds):
        if kind == ROWS:
            sharding = shape.sharding
            spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
            return spec[len(shape.shape) - 1] if len(spec) == len(shape.shape) else None
    return None


def _sharding_for(kind: str, rank: int, row_spec: tuple, mesh, last=None) -> NamedSharding:
    if kind in (PARAM, ROW_SUM, RNG):
        return NamedSharding(mesh, PartitionSpec())
    n_rows = rank - (1 if kind == ROWS else 0)
    lead = row_spec[len(row_spec) - n_rows :] if n_rows <= len(row_spec) else (None,) * n_rows
    return NamedSharding(mesh, PartitionSpec(*lead, *((last,) if kind == ROWS else ())))


def _mesh_axes(row_spec: tuple) -> tuple[str, ...]:
    axes: list[str] = []
    for entry in row_spec:
        if entry is None:
            continue
        axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(axes)


def _rule(in_kinds: Sequence[str], out_kinds: Sequence[str], in_ranks, out_ranks, split_last: bool) -> str:
    """Shardy rule: row dims are shared factors, everything else its own factor.

    With ``split_last`` the last dims of all ROWS operands share one factor
    (``v``) that may stay sharded.
    """
    n_rows = max(r - (1 if k == ROWS else 0) for k, r in zip(in_kinds, in_ranks) if k in (ROWS, STATS))
    row = [f"r{i}" for i in range(n_rows)]
    fresh = iter(f"c{i}" for i in range(1000))
    own: list[str] = []

    def dims(kind: str, rank: int) -> str:
        if kind == STATS:
            return " ".join(row[n_rows - rank :])
        if kind == ROWS:
            last = "v" if split_last else next(fresh)
            if not split_last:
                own.append(last)
            return " ".join(row[n_rows - (rank - 1) :] + [last])
        names = [next(fresh) for _ in range(rank)]
        own.extend(names)
        return " ".join(names)

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


def _shift_rng(arrays, in_kinds, out_kinds, result_shape, row_spec, mesh):
    """Adds shard_index * local_elements to every RNG operand's 64-bit offset."""
    from lsjax.ops._philox import _mulhilo  # the one uint32 wide multiply

    results = jax.tree.leaves(result_shape)
    ref = next(r for r, k in zip(results, out_kinds) if k == ROWS)
    total = int(np.prod(ref.shape, dtype=np.int64))
    local = total // int(np.prod([mesh.shape[a] for a in _mesh_axes(row_spec)], dtype=np.int64))
    sid = _shard_index(row_spec, mesh)
    hi, lo = _mulhilo(sid, np.uint32(local & 0xFFFFFFFF))
    hi = hi + sid * np.uint32(local >> 32)
    out = list(arrays)
    for i, kind in enumerate(in_kinds):
        if kind == RNG:
            rng = out[i]
            new_lo = rng[2] + lo
            new_hi = rng[3] + hi + (new_lo < lo).astype(jnp.uint32)
            out[i] = jnp.stack([rng[0], rng[1], new_lo, new_hi])
    return tuple(out)


def _make_partitioned(local_fn: Callable, in_kinds: tuple, out_kinds: tuple, n_static: int,
                      split_last: Callable | None):
    """custom_partitioning of ``local_fn(*static, *arrays)``."""
    static_argnums = tuple(range(n_static))
    fn = custom_partitioning(local_fn, static_argnums=static_argnums)

    def shardings(mesh, arg_shapes, result_shapes):
        row_spec = _row_spec(arg_shapes, in_kinds)
        if RNG in in_kinds and row_spec:
            # Only the leading dim may stay sharded: each shard then holds a
            # contiguous block of the flat tensor, so offset + shard * local
            # elements is exactly the unsharded mask, however the forward and
            # backward get partitioned.
            row_spec = (row_spec[0],) + (None,) * (len(row_spec) - 1)
        last = _last_spec(arg_shapes, in_kinds) if split_last else None
        if set(_mesh_axes((last,))) & set(_mesh_axes(row_spec)):
            last = None  # a mesh axis shards the rows already
        args = tuple(_sharding_for(k, len(s.shape), row_spec, mesh, last) for k, s in zip(in_kinds, arg_shapes))
        results = tuple(
            _sharding_for(k, len(s.shape), row_spec, mesh, last) for k, s in zip(out_kinds, result_shapes)
        )
        return row_spec, last, args, results

    def infer(*args):
        *static, mesh, arg_shapes, result_shape = args
        *_, results = shardings(mesh, arg_shapes, jax.tree.leaves(result_shape))
        return results if isinstance(result_shape, (tuple, list)) else results[0]

    def partition(*args):
        *static, mesh, arg_shapes, result_shape = args
        row_spec, last, arg_shardings, results = shardings(mesh, arg_shapes, jax.tree.leaves(result_shape))
        axes = _mesh_axes(row_spec)
        last_axes = _mesh_axes((last,))

        def lower(*arrays):
            if RNG in in_kinds and axes:
                arrays = _shift_rng(arrays, in_kinds, out_kinds, result_shape, row_spec, mesh)
            if last_axes:
                shard = LastDimShard(last_axes, _shard_index((last,), mesh).astype(jnp.int32),
                                     int(np.prod([mesh.shape[a] for a in last_axes])))
                outs = split_last(shard, *static, *arrays)
            else:
                outs = local_fn(*static, *arrays)
            flat = outs if isinstance(outs, (tuple, list)) else (outs,)
            flat = tuple(
                jax.lax.psum(o, axes) if (k == ROW_SUM and axes) else o for o, k in zip(flat, out_kinds)
            )
            return flat if isinstance(outs, (tuple, list)) else flat[0]

        out_shardings = results if isinstance(result_shape, (tuple, list)) else results[0]
        return mesh, lower, out_shardings, arg_shardings

    def sharding_rule(*args):
        *static, mesh, value_types, result_types = args
        ranks_in = [len(t.shape) for t in value_types]
        ranks_out = [len(t.shape) for t in result_types]
        rule, own = _rule(in_kinds, out_kinds, ranks_in, ranks_out, split_last is not None)
        return rule, {"need_replication_factors": tuple(own)}

    fn.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule)
    return fn


def rowwise(in_kinds: Sequence[str], out_kinds: Sequence[str], n_static: int = 0,
            split_last: Callable | None = None):
    """Decorator: make ``local_fn(*static, *arrays)`` shard- and vmap-aware.

    ``static`` are hashable trace-time constants (attributes, dtypes). The
    returned function has the same signature. ``split_last(shard, *static,
    *arrays)``, if given, runs instead of ``local_fn`` when the last dim of the
    ``ROWS`` operands is sharded (see the module docstring).
    """
    in_kinds, out_kinds = tuple(in_kinds), tuple(out_kinds)
    if split_last is not None and RNG in in_kinds:
        raise ValueError("rowwise: split_last cannot be combined with an RNG operand")

    def wrap(local_fn: Callable) -> Callable:
        partitioned = _make_partitioned(local_fn, in_kinds, out_kinds, n_static, split_last)

        @functools.wraps(local_fn)
        def call(*args):
            static, arrays = args[:n_static], args[n_static:]
            fn = jax.custom_batching.custom_vmap(lambda *a: partitioned(*static, *a))

            @fn.def_vmap
            def _vmap_rule(axis_size, in_batched, *a):
                # Re-enter `fn` (not the bare partitioned call) so nested vmaps
                # reach this rule again.
                return _batched(fn, in_kinds, out_kinds, axis_size, in_batched, a)

            return fn(*arrays)

        return call

    return wrap


def _batched(f, in_kinds, out_kinds, axis_size, in_batched, args):
    """vmap rule: the mapped axis (at 0) becomes a leading row dim when possible."""
    mapped_param = any(b for b, k in zip(in_batched, in_kinds) if k in (PARAM, RNG))
    # RNG ops map sequentially too: every instance must see the same mask
    # as an unbatched call with the same key.
    if mapped_param or ROW_SUM in out_kinds or RNG in in_kinds:
        batched_args = [a for a, b in zip(args, in_batched) if b]

        def one(xs):
            it = iter(xs)
            return f(*(next(it) if b else a for a, b in zip(args, in_batched)))

        outs = jax.lax.map(one, batched_args)
        flat = outs if isinstance(outs, (tuple, list)) else (outs,)
        return outs, (type(outs)(True for _ in flat) if isinstance(outs, (tuple, list)) else True)
    full = [a if (b or k in (PARAM, RNG)) else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b, k in zip(args, in_batched, in_kinds)]
    outs = f(*full)
    flat = outs if isinstance(outs, (tuple, list)) else (outs,)
    return outs, (type(outs)(True for _ in flat) if isinstance(outs, (tuple, list)) else True)
