"""Head split of a fused attention projection (LightSeq's ``bias_add_transform_20314``).

``x [batch, length, n, heads, head_dim]`` (a fused Q/K/V, K/V or Q projection's
output before its bias) plus ``bias [n, heads, head_dim]`` becomes ``n`` arrays
``[batch, heads, length, head_dim]`` (the layout the attention GEMMs read) in one
pass: x read once, the outputs written once.

Backends: ``"xla"`` runs :func:`split_heads_reference`; ``"cpu_ffi"``/``"cuda"``
run the FFI targets ``lsjax_split_heads_{fwd,bwd}_{cpu,cuda}`` under a
``jax.custom_vjp`` that saves nothing: ``dx`` is the cotangents transposed back
and ``dbias`` their float32 sum over batch and length (deterministic: fixed-order
per-block partial rows, no atomics), written in ``bias``'s dtype.

Sharding: a ``custom_partitioning`` with the Shardy rule ``b l n h d, n h d ->
b h l d, ...`` (``n`` and ``head_dim`` replicated). Batch (data parallel), length
and heads (tensor parallel: a qkv kernel ``[embed, 3, heads, kv]`` with heads on
a mesh axis) stay sharded, the outputs sharded alike on their batch / length /
heads dims; ``dbias`` is summed over the mesh axes that shard batch and length.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from lsjax.ops import backend as _backend
from lsjax.ops._bias_dropout import column_sum_partials, ffi
from lsjax.ops._checks import check_float, check_rank, check_shape
from lsjax.ops._rowwise import PARAM, ROW_SUM, ROWS, batched_call, mesh_axes

_F32 = jnp.float32
_OP = "split_heads"
MAX_N = 3  # csrc/split_heads.h: kSplitHeadsMaxN


def split_heads_reference(x: jax.Array, bias: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """Pure-JAX head split; same contract as :func:`split_heads`."""
    v = x.astype(_F32)
    if bias is not None:
        v = v + bias.astype(_F32)
    v = v.astype(x.dtype)
    return tuple(jnp.swapaxes(v[..., j, :, :], -3, -2) for j in range(x.shape[-3]))


def split_heads(x: jax.Array, bias: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """``x + bias`` split into per-projection, head-major arrays, in one pass.

    Args:
      x: ``[batch, length, n, heads, head_dim]`` float32, float16 or bfloat16, ``n``
        in 1..3 (3: self-attention Q/K/V, 2: cross-attention K/V, 1: a query); any
        head_dim (multiples of 8 for 16-bit, 4 for float32, take the 16-byte path).
      bias: optional ``[n, heads, head_dim]`` in float32 or ``x``'s dtype, read as
        it is (no float32 copy of a 16-bit bias is made).

    Returns:
      ``n`` arrays ``[batch, heads, length, head_dim]`` in ``x``'s dtype:
      ``out[j][b, h, l] = x[b, l, j, h] + bias[j, h]`` added in float32, rounded
      once. Gradients: ``dx`` (``x``'s dtype) is the cotangents transposed back
      (missing ones are zeros); ``dbias`` is their float32 sum over batch and
      length, in ``bias``'s dtype.
    """
    _check(x, bias)
    backend = _backend.get_backend()
    if backend == "xla":
        return split_heads_reference(x, bias)
    return _split_heads_ffi(x, bias, backend, None if bias is None else jnp.dtype(bias.dtype))


def _check(x, bias) -> None:
    if jnp.ndim(x) != 5:
        raise ValueError(f"{_OP}: x must have rank 5 [batch, length, n, heads, head_dim], got shape {jnp.shape(x)}")
    check_rank(_OP, "x", x, 5)  # not empty
    check_float(_OP, "x", x)
    n = x.shape[2]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"{_OP}: x's n (dim 2 of [batch, length, n, heads, head_dim]) must be 1 to {MAX_N}, "
                         f"got shape {x.shape}")
    if bias is None:
        return
    check_shape(_OP, "bias", bias, x.shape[2:])
    if bias.dtype not in (jnp.dtype(_F32), x.dtype):
        raise TypeError(f"{_OP}: bias must be float32 or x's dtype {x.dtype}, got {bias.dtype}; "
                        f"cast it with .astype(...) first")


# ------------------------------------------------------------- FFI path --

def _fwd_local(backend, x, *bias):
    """The FFI forward on (local) arrays: x ``[*batch, length, n, heads, head_dim]`` -> n outputs."""
    *batch, length, n, heads, head_dim = x.shape
    out = jax.ShapeDtypeStruct((*batch, heads, length, head_dim), x.dtype)
    return tuple(ffi("split_heads_fwd", backend, (out,) * n, x, *bias))


def _bwd_local(backend, bias_dtype, *douts):
    """The FFI backward on (local) arrays: n cotangents -> ``(dx,)`` or ``(dx, dbias)``.

    With a bias XLA also allocates the kernels' float32 partial-sum workspace
    (:func:`lsjax.ops._bias_dropout.column_sum_partials`), dropped here."""
    *batch, heads, length, head_dim = douts[0].shape
    n = len(douts)
    dx = jax.ShapeDtypeStruct((*batch, length, n, heads, head_dim), douts[0].dtype)
    if bias_dtype is None:
        return tuple(ffi("split_heads_bwd", backend, (dx,), *douts))
    partials = column_sum_partials(math.prod(batch) * length, n * heads * head_dim)
    dbias = jax.ShapeDtypeStruct((n, heads, head_dim), bias_dtype)
    dx, dbias, _ = ffi("split_heads_bwd", backend, (dx, dbias, partials), *douts)
    return dx, dbias


# Operand / result layouts: x or dx [*batch, length, n, heads, head_dim], an
# output or cotangent [*batch, heads, length, head_dim], bias or dbias [n, heads, head_dim].
_X, _HEADS, _PARAM = "x", "heads", "param"


def _layouts(forward: bool, n_args: int, n_results: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if forward:  # (x[, bias]) -> n outputs
        return (_X,) + (_PARAM,) * (n_args - 1), (_HEADS,) * n_results
    return (_HEADS,) * n_args, (_X,) + (_PARAM,) * (n_results - 1)  # n cotangents -> (dx[, dbias])


def _dim_specs(shape, layout: str) -> tuple[tuple, object, object]:
    """(batch entries, length entry, heads entry) of an operand's partition spec."""
    sharding = shape.sharding
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    spec = spec + (None,) * (len(shape.shape) - len(spec))
    if layout == _X:
        *batch, length, _, heads, _ = spec
    else:
        *batch, heads, length, _ = spec
    return tuple(batch), length, heads


def _sharding(mesh, layout: str, batch: tuple, length, heads) -> NamedSharding:
    """n and head_dim replicated; batch, length and heads as given."""
    spec = {_X: (*batch, length, None, heads, None), _HEADS: (*batch, heads, length, None),
            _PARAM: (None, heads, None)}[layout]
    return NamedSharding(mesh, PartitionSpec(*spec))


def _factors(layout: str, n_batch: int) -> str:
    batch = " ".join(f"b{i}" for i in range(n_batch))
    return {_X: f"{batch} l n h d", _HEADS: f"{batch} h l d", _PARAM: "n h d"}[layout].strip()


def _make_partitioned(local_fn: Callable, forward: bool, n_static: int):
    """custom_partitioning of ``local_fn(*static, *arrays)``: batch, length and
    heads keep the first operand's sharding; parameter sums are psum-ed over
    the mesh axes sharding batch and length."""
    fn = custom_partitioning(local_fn, static_argnums=tuple(range(n_static)))

    def shardings(mesh, arg_shapes, result_shapes):
        """(batch, length, heads spec entries), operand shardings, result shardings, result layouts."""
        ins, outs = _layouts(forward, len(arg_shapes), len(result_shapes))
        dims = _dim_specs(arg_shapes[0], ins[0])
        args = tuple(_sharding(mesh, k, *dims) for k in ins)
        return dims, args, tuple(_sharding(mesh, k, *dims) for k in outs), outs

    def infer(*args):
        *_, mesh, arg_shapes, result_shape = args
        return shardings(mesh, arg_shapes, result_shape)[2]

    def partition(*args):
        *static, mesh, arg_shapes, result_shape = args
        (batch, length, _), arg_shardings, result_shardings, outs = shardings(mesh, arg_shapes, result_shape)
        sum_axes = mesh_axes((*batch, length))

        def lower(*arrays):
            results = local_fn(*static, *arrays)
            return tuple(jax.lax.psum(r, sum_axes) if (k == _PARAM and sum_axes) else r
                         for r, k in zip(results, outs))

        return mesh, lower, result_shardings, arg_shardings

    def sharding_rule(*args):
        *_, mesh, value_types, result_types = args
        ins, outs = _layouts(forward, len(value_types), len(result_types))
        n_batch = len(value_types[0].shape) - (4 if ins[0] == _X else 3)
        rule = (", ".join(_factors(k, n_batch) for k in ins) + " -> " +
                ", ".join(_factors(k, n_batch) for k in outs))
        # Shardy wants the replicated factors in the order they first appear.
        order = dict.fromkeys(re.findall(r"\w+", rule))
        return rule, {"need_replication_factors": tuple(f for f in order if f in ("n", "d"))}

    fn.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule)
    return fn


_fwd_partitioned = _make_partitioned(_fwd_local, forward=True, n_static=1)
_bwd_partitioned = _make_partitioned(_bwd_local, forward=False, n_static=2)


def _call(partitioned, forward: bool, static: tuple, arrays: tuple, n_results: int):
    """``partitioned(*static, *arrays)`` with lsjax.ops._rowwise's vmap rule: a mapped
    axis becomes one more leading batch dim, or (a mapped bias, a per-example
    dbias) the op runs once per example."""
    ins, outs = _layouts(forward, len(arrays), n_results)
    in_kinds = [PARAM if k == _PARAM else ROWS for k in ins]
    out_kinds = [ROW_SUM if k == _PARAM else ROWS for k in outs]
    fn = jax.custom_batching.custom_vmap(lambda *a: partitioned(*static, *a))

    @fn.def_vmap
    def _vmap_rule(axis_size, in_batched, *a):
        return batched_call(fn, in_kinds, out_kinds, axis_size, in_batched, a)

    return fn(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _split_heads_ffi(x, bias, backend, bias_dtype):
    arrays = (x,) if bias is None else (x, bias)
    return _call(_fwd_partitioned, True, (backend,), arrays, x.shape[2])


def _split_heads_ffi_fwd(x, bias, backend, bias_dtype):
    return _split_heads_ffi(x, bias, backend, bias_dtype), None  # the backward needs no residuals


def _split_heads_ffi_bwd(backend, bias_dtype, _, douts):
    grads = _call(_bwd_partitioned, False, (backend, bias_dtype), tuple(douts), 1 if bias_dtype is None else 2)
    return grads[0], (None if bias_dtype is None else grads[1])


_split_heads_ffi.defvjp(_split_heads_ffi_fwd, _split_heads_ffi_bwd)
