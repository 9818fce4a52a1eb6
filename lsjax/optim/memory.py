"""Bytes per parameter held by a training state (params + grads + optimizer state)."""

from __future__ import annotations

import jax


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def state_bytes_per_param(params, grads, opt_state) -> float:
    """``(bytes of params + grads + opt_state) / number of params``.

    Works on arrays or ``jax.ShapeDtypeStruct`` trees (e.g. from ``jax.eval_shape``).
    float16 params and grads with float32 Adam moments give ~12 (plus the few
    bytes of the step count); the float32-master recipe (float32 params, grads
    and two moments) gives 16.
    """
    n = sum(x.size for x in jax.tree.leaves(params))
    if n == 0:
        raise ValueError("state_bytes_per_param: params have no elements")
    return (_nbytes(params) + _nbytes(grads) + _nbytes(opt_state)) / n
