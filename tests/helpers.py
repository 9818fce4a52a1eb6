"""Shared test utilities: tolerances by dtype, random inputs, HLO checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]

# Relative tolerance of a kernel against the float32 reference, by input dtype.
KERNEL_RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float16): 1e-2, jnp.dtype(jnp.bfloat16): 2e-2}


def normal(rng: np.random.Generator, shape, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
    """Fresh standard-normal values, rounded to ``dtype``."""
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    """max|a - e| <= rtol * max(1, max|e|), computed in float32; NaN never passes."""
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values in result"
    err = float(np.max(np.abs(a - e))) if a.size else 0.0
    bound = rtol * max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def assert_sum_close(actual, expected, n_terms: int, rtol: float = 1e-5, what: str = "") -> None:
    """Scalar sums of ``n_terms`` terms of magnitude <= ~1 (e.g. ``sum(sin(y))``) agree within
    ``rtol * sqrt(n_terms)``: a sharded sum adds its terms in another order than the unsharded one,
    so its rounding grows with the term count, not with the size of the total."""
    err = abs(float(actual) - float(expected))
    bound = rtol * max(1.0, float(np.sqrt(n_terms)))
    assert np.isfinite(float(actual)), f"{what}: non-finite value"
    assert err <= bound, f"{what}: abs error {err:.3g} > {bound:.3g} for a sum of {n_terms} terms"


def assert_remat_scan_grad_matches_reference(f, x, rtol: float) -> None:
    """``grad(f)(x)`` jitted on the ``cpu_ffi`` backend equals it on ``xla`` (the reference);
    ``f`` is built around ``lax.scan`` of a ``jax.checkpoint``-ed body that calls a fused op."""
    from lsjax import ops

    with ops.use_backend("cpu_ffi"):
        g = jax.jit(jax.grad(f))(x)
    with ops.use_backend("xla"):
        g_ref = jax.grad(f)(x)
    assert_close(g, g_ref, rtol, "remat+scan grads")


def compiled_hlo(fn, *args) -> str:
    """Optimised HLO text of ``jax.jit(fn)`` for ``args``."""
    return jax.jit(fn).lower(*args).compile().as_text()
