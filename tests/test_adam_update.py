"""Fused Adam update op: reference vs CPU FFI (and CUDA), in-place moments, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax import ops
from lsjax.ops.adam_update import adam_scalars, adam_update, adam_update_reference
from tests.helpers import DTYPES, KERNEL_RTOL, normal

needs_ffi = pytest.mark.skipif("cpu_ffi" not in ops.available_backends(), reason="lsjax._ffi not built")


def _inputs(rng, shape, dtype, grad_dtype=None):
    p = normal(rng, shape, dtype)
    g = normal(rng, shape, grad_dtype or dtype)
    m = normal(rng, shape, jnp.float32, 0.1)
    v = jnp.abs(normal(rng, shape, jnp.float32, 0.01))
    s = adam_scalars(3e-3, 0.9, 0.98, 1e-8, 0.01, 1 - 0.9 ** 3, 1 - 0.98 ** 3, 1 / 1024)
    return p, g, m, v, s


def _check(got, want, param_dtype, rtol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        tol = rtol if i else max(rtol, float(jnp.finfo(param_dtype).eps))  # param: one rounding apart
        np.testing.assert_allclose(a32, b32, rtol=tol, atol=tol * 1e-3, err_msg=f"output {i}")


@needs_ffi
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 33), (1,), (), (2, 3, 5)])
def test_cpu_ffi_matches_reference(rng, dtype, shape):
    args = _inputs(rng, shape, dtype)
    want = adam_update_reference(*args)
    with ops.use_backend("cpu_ffi"):
        got = jax.jit(adam_update)(*args)
    _check(got, want, dtype, rtol=1e-6)


@needs_ffi
def test_mixed_grad_dtype_and_donated_moments(rng):
    args = _inputs(rng, (64, 16), jnp.float16, jnp.float32)
    want = adam_update_reference(*args)
    with ops.use_backend("cpu_ffi"):
        step = jax.jit(adam_update, donate_argnums=(2, 3))
        got = step(*[jnp.array(x) for x in args])
    _check(got, want, jnp.float16, rtol=1e-6)


@needs_ffi
@pytest.mark.parametrize("spec", [("data", None), (None, "tensor"), ("data", "tensor")])
def test_sharded_update_has_no_all_gather(rng, spec):
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    p, g, m, v, s = _inputs(rng, (16, 12), jnp.bfloat16)
    p, g, m, v = (jax.device_put(x, sharding) for x in (p, g, m, v))
    with ops.use_backend("cpu_ffi"):
        fn = jax.jit(adam_update)
        hlo = fn.lower(p, g, m, v, s).compile().as_text()
        got = fn(p, g, m, v, s)
    assert "all-gather" not in hlo
    assert all(x.sharding.is_equivalent_to(sharding, 2) for x in got)
    _check(got, adam_update_reference(p, g, m, v, s), jnp.bfloat16, rtol=1e-6)


def test_bad_input():
    p = jnp.ones((4,), jnp.float16)
    s = adam_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001)
    with pytest.raises(TypeError, match="m must be float32"):
        adam_update(p, p, p, p, s)
    with pytest.raises(ValueError, match="scalars must have shape"):
        adam_update(p, p, p.astype(jnp.float32), p.astype(jnp.float32), s[:3])
    with pytest.raises(ValueError, match="grad must have shape"):
        adam_update(p, p[:2], p.astype(jnp.float32), p.astype(jnp.float32), s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 4096 + 3, 1 << 20])
def test_cuda_matches_reference(rng, dtype, n):
    args = [jax.device_put(x, jax.devices("gpu")[0]) for x in _inputs(rng, (n,), dtype)]
    want = adam_update_reference(*args)
    with ops.use_backend("cuda"):
        got = jax.jit(adam_update)(*args)
    _check(got, want, dtype, rtol=KERNEL_RTOL[jnp.dtype(jnp.float32)])
