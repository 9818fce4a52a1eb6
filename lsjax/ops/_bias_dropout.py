"""Helpers shared by the bias/activation/dropout ops (private to them).

The FFI targets of ``ffi/bias_dropout.cc`` all take a ``uint32[4]`` rng
operand. With dropout on it comes from the key (kind ``RNG``: shifted per
shard, so shards draw disjoint streams); with dropout off (rate 0 or no key)
the op is deterministic and the local function passes a constant dummy, so the
wrapped op has no ``RNG`` operand at all (no offset arithmetic under a mesh,
and vmap batches it instead of mapping sequentially).

Dropout ops run on the ``[rows, hidden]`` view of their operands (see
:func:`dropout_rowwise`), element-wise along ``hidden``: the mask is the
unsharded one under any sharding of the rows and of ``hidden`` (the kernels
draw element ``(r, c)`` of a block at ``offset + r * row_stride + c``, with
``row_stride`` the global ``hidden`` and the offset advanced to the block's
first element; :mod:`lsjax.ops._rowwise`), at the price of a reshard when a
non-leading row dim is sharded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._philox import check_rate, dropout_mask, rng_operand
from lsjax.ops._rowwise import RNG, ROWS, rowwise

_F32 = jnp.float32


def dropout_rng(op: str, rate: float, key: jax.Array | None) -> tuple[float, jax.Array | None]:
    """Checks ``rate``; returns ``(effective rate, rng operand or None)``.

    ``key is None`` or ``rate == 0`` turn dropout off: ``(0.0, None)``.
    """
    check_rate(op, rate)
    if key is not None and not isinstance(key, jax.Array):
        raise TypeError(f"{op}: key must be a JAX PRNG key (jax.random.key(...)) or None, got {type(key).__name__}")
    rate = float(rate)
    if key is None or rate == 0.0:
        return 0.0, None
    return rate, rng_operand(key)


def keep_scale(rate: float) -> np.float32:
    """``1 / (1 - rate)`` rounded as the kernels compute it (float32 ops)."""
    return np.float32(1) / (np.float32(1) - np.float32(rate))


def dropout_reference(v32: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Float32 dropout of ``v32`` with the Philox mask of :mod:`lsjax.ops._philox`."""
    if key is None or float(rate) == 0.0:
        return v32
    mask = dropout_mask(rng_operand(key), v32.shape, float(rate))
    return jnp.where(mask, v32 * keep_scale(rate), jnp.zeros((), v32.dtype))


def ffi(target: str, backend: str, out, *args, **attrs):
    """``jax.ffi.ffi_call`` of ``lsjax_<target>_<platform>``."""
    return jax.ffi.ffi_call(_backend.ffi_target(target, backend), out)(*args, **attrs)


def dropout_rowwise(in_kinds: Sequence[str], out_kinds: Sequence[str], n_static: int):
    """Like :func:`rowwise` (``elementwise``) for ``local_fn(*static, row_stride,
    *arrays, rng)``: ``rng`` is the rng operand, or None for the deterministic
    variant, and ``row_stride`` the kernel's Philox row stride (its local last
    dim when deterministic: no bits are drawn). The wrapped op takes
    ``(*static, *arrays, rng)``."""

    def wrap(local_fn: Callable) -> Callable:
        with_rng = rowwise([*in_kinds, RNG], out_kinds, n_static, elementwise=True)(local_fn)

        def local_det(*args):
            static, arrays = args[:n_static], args[n_static:]
            cols = next(a.shape[-1] for a, k in zip(arrays, in_kinds) if k == ROWS)
            return local_fn(*static, cols, *arrays, jnp.zeros((4,), jnp.uint32))

        local_det.__name__ = f"{local_fn.__name__}_deterministic"
        without_rng = rowwise(in_kinds, out_kinds, n_static, elementwise=True)(local_det)

        @functools.wraps(local_fn)
        def call(*args):
            *rest, rng = args
            if rng is None:
                return without_rng(*rest)
            # With dropout, run on the [rows, hidden] view: its shards are
            # row blocks (times column blocks), so the per-shard RNG offsets
            # reproduce the unsharded mask exactly, however XLA partitions each
            # call (the backward regenerates the forward's mask even if dy is
            # sharded differently). Free unless a non-leading row dim is sharded.
            static, arrays = rest[:n_static], rest[n_static:]
            shape = next(a.shape for a, k in zip(arrays, in_kinds) if k == ROWS)
            flat = [a.reshape(-1, a.shape[-1]) if k == ROWS else a for a, k in zip(arrays, in_kinds)]
            outs = with_rng(*static, *flat, rng)
            if not isinstance(outs, (tuple, list)):
                return outs.reshape(shape)
            return tuple(o.reshape(shape) if k == ROWS else o for o, k in zip(outs, out_kinds))

        return call

    return wrap


def like(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def column_sum_partials(rows: int, cols: int) -> jax.ShapeDtypeStruct:
    """float32 ``[min(512, max(1, rows // 32)), cols]``: the partial-row workspace of a column-sum
    gradient (csrc/param_vec.h: ColumnSumPartialRows)."""
    return jax.ShapeDtypeStruct((min(512, max(1, rows // 32)), cols), _F32)


def dbias_call(target: str, backend: str, dbias_dtype, dy, *args, **attrs):
    """FFI backward returning ``(dx, dbias)``, ``dbias`` ``[hidden]`` in ``dbias_dtype`` (the
    bias operand's: float32 or ``dy``'s); XLA also allocates the kernels' dbias
    partial-sum workspace (:func:`column_sum_partials`), dropped here."""
    partials = column_sum_partials(math.prod(dy.shape[:-1]), dy.shape[-1])
    dbias = jax.ShapeDtypeStruct(dy.shape[-1:], dbias_dtype)
    dx, dbias, _ = ffi(target, backend, (like(dy), dbias, partials), dy, *args, **attrs)
    return dx, dbias
