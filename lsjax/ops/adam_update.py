"""Fused Adam/AdamW update of one parameter tensor (forward-only op).

One pass reads ``param, grad, m, v`` and writes ``new_param, m, v``; all math in
float32, the new param rounded once to its dtype. The per-step scalars travel as
one float32 array operand (not attributes), so a jitted step does not recompile
when the learning rate or bias corrections change.

Backends: ``"xla"`` runs :func:`adam_update_reference`; ``"cpu_ffi"``/``"cuda"``
the FFI target ``lsjax_adam_update_{cpu,cuda}`` with ``m`` and ``v`` aliased to
their outputs (updated in place when the caller donates them). Elementwise
partitioning: a tensor sharded along any axes is updated shard by shard. Not
vmappable (an optimizer update has no batch axis).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_same_dtype, check_shape

_F32 = jnp.float32

#: Order of the entries of the ``scalars`` operand (csrc/adam_update.h: AdamScalars).
ADAM_SCALARS = ("lr", "b1", "b2", "eps", "weight_decay", "bias_correction1", "bias_correction2",
                "grad_scale")


def adam_scalars(lr, b1, b2, eps, weight_decay, bias_correction1, bias_correction2,
                 grad_scale=1.0) -> jax.Array:
    """Packs the step's scalars into the ``float32[8]`` operand (order: ``ADAM_SCALARS``).

    ``bias_correction{1,2} = 1 - b{1,2} ** t`` for update number ``t >= 1``;
    ``grad_scale`` multiplies the gradient first (e.g. ``1 / loss_scale``).
    """
    values = (lr, b1, b2, eps, weight_decay, bias_correction1, bias_correction2, grad_scale)
    return jnp.stack([jnp.asarray(x, _F32) for x in values])


def leaf_scalars(scalars: jax.Array, decay: bool) -> jax.Array:
    """``scalars`` for one leaf: as they are where weight decay applies, else with it set to 0."""
    return scalars if decay else scalars.at[ADAM_SCALARS.index("weight_decay")].set(0.0)


def adam_step_reference(param, grad, m, v, scalars):
    """The float32 math: ``(step, m, v)``, all float32, with ``new_param = param + step``.

    Same operation order as ``optax.adamw``: ``m_hat = m / bc1``, ``v_hat = v / bc2``,
    ``step = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * param)``.
    """
    lr, b1, b2, eps, wd, bc1, bc2, grad_scale = (scalars[i] for i in range(len(ADAM_SCALARS)))
    p, g = param.astype(_F32), grad.astype(_F32) * grad_scale
    m = (1.0 - b1) * g + b1 * m.astype(_F32)
    v = (1.0 - b2) * (g * g) + b2 * v.astype(_F32)
    direction = (m / bc1) / (jnp.sqrt(v / bc2) + eps) + wd * p
    return -lr * direction, m, v


def adam_update_reference(param, grad, m, v, scalars):
    """Pure-JAX :func:`adam_update`."""
    step, m, v = adam_step_reference(param, grad, m, v, scalars)
    return (param.astype(_F32) + step).astype(param.dtype), m, v


def adam_update(param: jax.Array, grad: jax.Array, m: jax.Array, v: jax.Array, scalars: jax.Array, *,
                in_place: bool = True):
    """One fused Adam/AdamW step on one tensor.

    Args:
      param: any shape, float32, float16 or bfloat16.
      grad: ``param``'s shape, float32/float16/bfloat16 (any of them).
      m, v: ``param``'s shape, float32 moments.
      scalars: ``float32[8]`` from :func:`adam_scalars`.
      in_place: alias ``m``/``v`` to the new moments (FFI backends). In a jitted
        step whose optimizer state is donated they are updated in place; when
        ``m``/``v`` stay live (not donated) XLA copies them first, so pass
        ``False`` to get fresh output buffers instead. ``new_param`` always
        gets its own buffer: callers such as :mod:`lsjax.optim` still read
        ``param`` afterwards (aliasing it would force a copy there).

    Returns:
      ``(new_param, new_m, new_v)``: ``new_param`` in ``param``'s dtype (rounded
      to nearest once), moments float32.
    """
    op = "adam_update"
    check_float(op, "param", param)
    check_float(op, "grad", grad)
    for name, x in (("grad", grad), ("m", m), ("v", v)):
        check_shape(op, name, x, param.shape)
    for name, x in (("m", m), ("v", v)):
        if x.dtype != _F32:
            raise TypeError(f"{op}: {name} must be float32 (the fused kernel keeps float32 moments), got {x.dtype}")
    check_shape(op, "scalars", scalars, (len(ADAM_SCALARS),))
    check_same_dtype(op, "scalars", scalars, jnp.zeros((), _F32))
    backend = _backend.get_backend()
    if backend == "xla" or param.size == 0:
        return adam_update_reference(param, grad, m, v, scalars)
    return _adam_update_ffi(backend, bool(in_place), param, grad, m, v, scalars)


# ------------------------------------------------------------- FFI path --

def _local_update(backend, in_place, param, grad, m, v, scalars):
    out = (jax.ShapeDtypeStruct(param.shape, param.dtype), jax.ShapeDtypeStruct(m.shape, _F32),
           jax.ShapeDtypeStruct(v.shape, _F32))
    call = jax.ffi.ffi_call(_backend.ffi_target("adam_update", backend), out,
                            input_output_aliases={2: 1, 3: 2} if in_place else None)
    return call(param, grad, m, v, scalars)


# Elementwise partitioning: param, grad, m, v and the outputs share one sharding
# (any axis may be sharded: data, tensor, ZeRO); the scalars are replicated. So
# a sharded optimizer state is updated shard by shard, never all-gathered.
_adam_update_ffi = custom_partitioning(_local_update, static_argnums=(0, 1))


def _shardings(mesh, arg_shapes):
    like = arg_shapes[0].sharding
    spec = like.spec if isinstance(like, NamedSharding) else PartitionSpec()
    tensor = NamedSharding(mesh, spec)
    return tensor, (tensor,) * 4 + (NamedSharding(mesh, PartitionSpec()),)


def _infer(backend, in_place, mesh, arg_shapes, result_shape):
    return (_shardings(mesh, arg_shapes)[0],) * 3


def _partition(backend, in_place, mesh, arg_shapes, result_shape):
    tensor, args = _shardings(mesh, arg_shapes)
    return mesh, functools.partial(_local_update, backend, in_place), (tensor,) * 3, args


def _sharding_rule(backend, in_place, mesh, value_types, result_types):
    dims = " ".join(f"d{i}" for i in range(len(value_types[0].shape)))
    return f"{dims}, {dims}, {dims}, {dims}, s -> {dims}, {dims}, {dims}"


_adam_update_ffi.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                               sharding_rule=_sharding_rule)
