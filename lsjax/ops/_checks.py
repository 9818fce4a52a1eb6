"""Input validation shared by the ops: clear errors before tracing reaches a kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def check_float(op: str, name: str, x) -> None:
    """TypeError unless ``x`` is float32, float16 or bfloat16."""
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}; cast it with .astype(...) first"
        )


def check_rank(op: str, name: str, x, min_rank: int) -> None:
    """ValueError unless ``x`` has rank >= ``min_rank`` and is not empty."""
    if np.ndim(x) < min_rank:
        raise ValueError(f"{op}: {name} must have rank >= {min_rank}, got shape {tuple(np.shape(x))}")
    if np.size(x) == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(np.shape(x))}); fused kernels need at least one element")


def check_shape(op: str, name: str, x, shape: tuple[int, ...]) -> None:
    """ValueError unless ``x.shape == shape``."""
    if tuple(np.shape(x)) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(np.shape(x))}")


def check_same_dtype(op: str, name: str, x, like) -> None:
    """TypeError unless ``x`` has the dtype of ``like``."""
    if x.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have dtype {like.dtype} like the input, got {x.dtype}")


def static_scale(op: str, scale) -> float:
    """``scale`` as a Python float (compiled into the kernel call): TypeError if it is
    traced, ValueError unless finite."""
    try:
        value = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(f"{op}: scale must be a Python float (a trace-time constant), got {scale!r}") from err
    if not math.isfinite(value):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return value
