"""The one float32 -> low-precision cast of the optimizer: nearest or stochastic."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32
ROUNDINGS = ("nearest", "stochastic")


def round_to(x: jax.Array, dtype, key: jax.Array | None = None) -> jax.Array:
    """Casts float32 ``x`` to ``dtype`` once: to nearest, or stochastically with ``key``.

    Stochastic rounding picks one of the two ``dtype`` neighbours ``lo <= x <= hi``
    with probability proportional to closeness, so ``E[round_to(x)] == x``: an
    update far below half an ulp still moves the parameter in expectation.
    Non-finite values and values beyond the format's range round to nearest.
    """
    nearest = x.astype(dtype)
    if key is None or jnp.dtype(dtype) == jnp.dtype(_F32):
        return nearest
    below = nearest.astype(_F32) <= x
    other = jnp.nextafter(nearest, jnp.where(below, jnp.inf, -jnp.inf).astype(dtype))
    lo = jnp.where(below, nearest, other)
    hi = jnp.where(below, other, nearest)
    lo32, hi32 = lo.astype(_F32), hi.astype(_F32)
    gap = hi32 - lo32
    p_hi = jnp.where(gap > 0, (x - lo32) / jnp.where(gap > 0, gap, 1.0), 0.0)
    u = jax.random.uniform(key, x.shape, _F32)
    out = jnp.where(u < p_hi, hi, lo)
    return jnp.where(jnp.isfinite(hi32) & jnp.isfinite(lo32), out, nearest)
