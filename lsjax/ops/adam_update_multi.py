"""Fused Adam/AdamW update of many parameter tensors in (nearly) one launch (forward-only op).

Each leaf gets exactly the update of :func:`lsjax.ops.adam_update` (bit for bit),
with weight decay 0 for the leaves whose ``decay`` flag is False; the leaves are
grouped by (param dtype, grad dtype) and each group is one FFI call, which the
CUDA kernel runs as one launch per few dozen tensors (apex's
``multi_tensor_apply``), instead of one launch (plus XLA's glue) per leaf.

Backends: ``"xla"`` runs :func:`adam_update_multi_reference`; ``"cpu_ffi"``/``"cuda"``
the FFI target ``lsjax_adam_update_multi_{cpu,cuda}`` with params and moments aliased
to their outputs (updated in place when the caller donates them). An ``apply`` flag
that is False makes the kernel write nothing, so a skipped (non-finite) step costs
no copy of the state. Elementwise
partitioning: every leaf keeps its own sharding and is updated shard by shard.
Not vmappable (an optimizer update has no batch axis).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_same_dtype, check_shape
from lsjax.ops._multi_tensor import leaf_factors, leaf_shardings
from lsjax.ops.adam_update import ADAM_SCALARS, adam_update_reference, leaf_scalars

_F32 = jnp.float32


def adam_update_multi_reference(params, grads, mus, nus, scalars, decay, apply=None):
    """Pure-JAX :func:`adam_update_multi`: :func:`adam_update_reference` per leaf."""
    out = [adam_update_reference(p, g, m, v, leaf_scalars(scalars, d))
           for p, g, m, v, d in zip(params, grads, mus, nus, decay)]
    if apply is not None:
        out = [tuple(jnp.where(apply, n, o) for n, o in zip(new, old)) for new, old in zip(out, zip(params, mus, nus))]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def adam_update_multi(params: Sequence[jax.Array], grads: Sequence[jax.Array], mus: Sequence[jax.Array],
                      nus: Sequence[jax.Array], scalars: jax.Array, decay: Sequence[bool], *,
                      in_place: bool = True, apply: jax.Array | None = None):
    """One fused Adam/AdamW step on a list of tensors.

    Args:
      params: leaves of any shapes, each float32, float16 or bfloat16 (mixed dtypes allowed).
      grads: one per param, its shape, float32/float16/bfloat16.
      mus, nus: one per param, its shape, float32 moments.
      scalars: ``float32[8]`` from :func:`lsjax.ops.adam_scalars`.
      decay: static bools, one per param: False sets its weight decay to 0.
      in_place: alias each param, ``m`` and ``v`` to its output (FFI backends); XLA
        copies an operand that stays live, so ``False`` only saves those copies.
      apply: optional bool scalar (traced): False returns params and moments unchanged
        (the FFI kernels write nothing into the aliased outputs); needs ``in_place``.

    Returns:
      ``(new_params, new_mus, new_nus)`` lists: new params in each param's dtype
      (rounded to nearest once), moments float32. Bit-identical to
      :func:`lsjax.ops.adam_update` per leaf.
    """
    op = "adam_update_multi"
    params, grads, mus, nus, decay = (list(x) for x in (params, grads, mus, nus, decay))
    k = len(params)
    if any(len(x) != k for x in (grads, mus, nus, decay)):
        raise ValueError(f"{op}: params, grads, mus, nus and decay must have one entry per leaf, got lengths "
                         f"{[len(x) for x in (params, grads, mus, nus, decay)]}")
    for i, d in enumerate(decay):
        if not isinstance(d, (bool, np.bool_)):
            raise TypeError(f"{op}: decay[{i}] must be a Python bool (static), got {type(d).__name__}")
    for i, (p, g, m, v) in enumerate(zip(params, grads, mus, nus)):
        check_float(op, f"params[{i}]", p)
        check_float(op, f"grads[{i}]", g)
        for name, x in (("grads", g), ("mus", m), ("nus", v)):
            check_shape(op, f"{name}[{i}]", x, p.shape)
        for name, x in (("mus", m), ("nus", v)):
            if x.dtype != _F32:
                raise TypeError(f"{op}: {name}[{i}] must be float32 (the fused kernel keeps float32 moments), "
                                f"got {x.dtype}")
    check_shape(op, "scalars", scalars, (len(ADAM_SCALARS),))
    check_same_dtype(op, "scalars", scalars, jnp.zeros((), _F32))
    if apply is not None:
        check_shape(op, "apply", apply, ())
        if not in_place:
            raise ValueError(f"{op}: apply needs in_place=True (a skipped step leaves the aliased outputs as they were)")
    decay = tuple(bool(d) for d in decay)
    backend = _backend.get_backend()
    if backend == "xla":
        return adam_update_multi_reference(params, grads, mus, nus, scalars, decay, apply)
    flag = jnp.ones((), jnp.int32) if apply is None else jnp.asarray(apply).astype(jnp.int32)

    new_p, new_m, new_v = [None] * k, [None] * k, [None] * k
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.size == 0:
            new_p[i], new_m[i], new_v[i] = params[i], mus[i], nus[i]
        else:
            groups.setdefault((jnp.dtype(p.dtype), jnp.dtype(grads[i].dtype)), []).append(i)
    for idx in groups.values():
        pick = lambda xs: tuple(xs[i] for i in idx)  # noqa: E731
        outs = _adam_update_multi_ffi(backend, bool(in_place), pick(decay), scalars, flag, pick(params),
                                      pick(grads), pick(mus), pick(nus))
        for j, i in enumerate(idx):
            new_p[i], new_m[i], new_v[i] = outs[0][j], outs[1][j], outs[2][j]
    return new_p, new_m, new_v


# ------------------------------------------------------------- FFI path --

def _local_update(backend, in_place, decay, scalars, apply, params, grads, mus, nus):
    k = len(params)
    out = ([jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
           + [jax.ShapeDtypeStruct(m.shape, _F32) for m in mus] * 2)
    # operands: scalars, apply, params, grads, mus, nus; results: new params, new mus, new nus.
    aliases = None
    if in_place:
        aliases = {2 + i: i for i in range(k)} | {2 + 2 * k + i: k + i for i in range(2 * k)}
    call = jax.ffi.ffi_call(_backend.ffi_target("adam_update_multi", backend), out,
                            input_output_aliases=aliases)
    res = call(scalars, apply, *params, *grads, *mus, *nus, decay=np.asarray(decay, np.int32))
    return tuple(res[:k]), tuple(res[k:2 * k]), tuple(res[2 * k:])


# Elementwise partitioning per leaf: param i, grad i, m i, v i and leaf i's
# outputs share param i's sharding (any axes: data, tensor, ZeRO), leaves
# independently of each other; the scalars and the apply flag are replicated. So a sharded
# optimizer state is updated shard by shard, never all-gathered.
_adam_update_multi_ffi = custom_partitioning(_local_update, static_argnums=(0, 1, 2))


def _infer(backend, in_place, decay, mesh, arg_shapes, result_shape):
    leaves = leaf_shardings(mesh, arg_shapes[2])
    return leaves, leaves, leaves


def _partition(backend, in_place, decay, mesh, arg_shapes, result_shape):
    leaves = leaf_shardings(mesh, arg_shapes[2])
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (replicated, replicated, leaves, leaves, leaves, leaves)
    return mesh, functools.partial(_local_update, backend, in_place, decay), (leaves, leaves, leaves), args


def _sharding_rule(backend, in_place, decay, mesh, value_types, result_types):
    # value_types: scalars, apply, then 4 lists of k leaves (params, grads, mus, nus).
    dims = leaf_factors(value_types[2:2 + len(decay)])
    return f"s, , {', '.join(dims * 4)} -> {', '.join(dims * 3)}"


_adam_update_multi_ffi.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                                     sharding_rule=_sharding_rule)
