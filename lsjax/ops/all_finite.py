"""Whether every element of a list of tensors is finite, in (nearly) one launch (forward-only op).

The gradient check of dynamic loss scaling: one bool for all leaves instead of
one ``jnp.all(jnp.isfinite(g))`` reduction per leaf. The leaves are grouped by
dtype and each group is one FFI call, which the CUDA kernel runs as a memset
and one launch per few hundred tensors (apex's ``multi_tensor_apply``).

Backends: ``"xla"`` runs :func:`all_finite_reference`; ``"cpu_ffi"``/``"cuda"``
the FFI target ``lsjax_all_finite_{cpu,cuda}`` (an ``int32[]`` flag, 0 when
all are finite). Partitioning: every leaf keeps its own sharding; each
device checks its shards and the flags are combined by a ``pmax`` over all
mesh axes, so the replicated result is the global answer and no leaf is
gathered. Not vmappable (use it on whole gradient trees).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float
from lsjax.ops._multi_tensor import leaf_factors, leaf_shardings


def all_finite_reference(tensors: Sequence[jax.Array]) -> jax.Array:
    """Pure-JAX :func:`all_finite`: ``jnp.all(jnp.isfinite(x))`` per leaf, ANDed."""
    ok = jnp.asarray(True)
    for x in tensors:
        ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def all_finite(tensors: Sequence[jax.Array]) -> jax.Array:
    """True iff every element of every tensor is finite (no inf, no NaN).

    Args:
      tensors: leaves of any shapes (empty ones included), each float32, float16
        or bfloat16 (mixed dtypes allowed).

    Returns:
      A ``bool[]`` scalar; True for an empty list.
    """
    op = "all_finite"
    tensors = list(tensors)
    for i, x in enumerate(tensors):
        check_float(op, f"tensors[{i}]", x)
    backend = _backend.get_backend()
    if backend == "xla":
        return all_finite_reference(tensors)
    groups: dict[jnp.dtype, list[jax.Array]] = {}
    for x in tensors:
        if x.size:
            groups.setdefault(jnp.dtype(x.dtype), []).append(x)
    ok = jnp.asarray(True)
    for group in groups.values():
        ok = ok & (_all_finite_ffi(backend, tuple(group)) == 0)
    return ok


# ------------------------------------------------------------- FFI path --

def _local_check(backend, tensors):
    """``int32[]``: 0 iff every element of ``tensors`` (one dtype) is finite."""
    call = jax.ffi.ffi_call(_backend.ffi_target("all_finite", backend), jax.ShapeDtypeStruct((), jnp.int32))
    return call(*tensors)


# Every leaf keeps its own sharding (any axes), independently of the others;
# each device checks its local blocks and a pmax over all mesh axes gives every
# device the global flag (harmless over axes that shard nothing).
_all_finite_ffi = custom_partitioning(_local_check, static_argnums=(0,))


def _infer(backend, mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, PartitionSpec())


def _partition(backend, mesh, arg_shapes, result_shape):
    def lower(tensors):
        return jax.lax.pmax(_local_check(backend, tensors), mesh.axis_names)

    return mesh, lower, NamedSharding(mesh, PartitionSpec()), (leaf_shardings(mesh, arg_shapes[0]),)


def _sharding_rule(backend, mesh, value_types, result_types):
    return f"{', '.join(leaf_factors(value_types))} -> "  # the scalar result has no factors


_all_finite_ffi.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                              sharding_rule=_sharding_rule)
