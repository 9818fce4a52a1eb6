"""bias_dropout_residual (and plain dropout): reference vs CPU FFI vs CUDA, masks, gradients,
transforms, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lsjax import ops
from lsjax.ops import _philox
from lsjax.ops.bias_dropout_residual import (
    _fwd,
    bias_dropout_residual,
    bias_dropout_residual_reference,
    dropout,
    dropout_reference,
)
from tests.helpers import (DTYPES, KERNEL_RTOL, assert_close,
                           assert_remat_scan_grad_matches_reference, assert_sum_close, compiled_hlo, normal)

SHAPES = [(3, 1), (5, 7), (2, 3, 1000), (3, 4097)]


def _inputs(rng, shape, dtype, bias_dtype=jnp.float32):
    h = shape[-1]
    return normal(rng, shape, dtype) * 2, normal(rng, (h,), bias_dtype), normal(rng, shape, dtype)


def _key(rng):
    return jax.random.key(int(rng.integers(1 << 31)))


def _loss(fn, rate, key):
    def f(x, b, r):
        y = fn(x, b, r, rate=rate, key=key)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))
    return f


def _compare(backend, rng, shape, dtype, rate, with_key, fwd_rtol, grad_rtol, bias_dtype=jnp.float32):
    x, b, r = _inputs(rng, shape, dtype, bias_dtype)
    key = _key(rng) if with_key else None
    expected = bias_dropout_residual_reference(x, b, r, rate=rate, key=key)
    grads_ref = jax.grad(_loss(bias_dropout_residual_reference, rate, key), argnums=(0, 1, 2))(x, b, r)
    with ops.use_backend(backend):
        actual = jax.jit(lambda x, b, r: bias_dropout_residual(x, b, r, rate=rate, key=key))(x, b, r)
        grads = jax.jit(jax.grad(_loss(bias_dropout_residual, rate, key), argnums=(0, 1, 2)))(x, b, r)
    what = f"{backend} {shape} {jnp.dtype(dtype).name} rate={rate} key={with_key}"
    assert actual.dtype == x.dtype and actual.shape == x.shape
    assert_close(actual, expected, fwd_rtol, f"forward {what}")
    for name, a, e, like in zip(["dx", "dbias", "dresidual"], grads, grads_ref, (x, b, r)):
        assert a.dtype == like.dtype and a.shape == like.shape, name
        assert_close(a, e, grad_rtol, f"{name} {what}")


def _tols(dtype):
    if dtype == jnp.float32:
        return 1e-5, 1e-4
    return KERNEL_RTOL[jnp.dtype(dtype)], 3e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_matches_reference(rng, shape, dtype):
    _compare("cpu_ffi", rng, shape, dtype, 0.3, True, *_tols(dtype))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_cpu_ffi_bias_in_input_dtype(rng, dtype):
    """A 16-bit bias is read as it is and dbias written in its dtype."""
    _compare("cpu_ffi", rng, (2, 3, 1000), dtype, 0.3, True, *_tols(dtype), bias_dtype=dtype)


@pytest.mark.parametrize("rate,with_key", [(0.0, True), (0.5, False)])
def test_cpu_ffi_without_randomness(rng, rate, with_key):
    _compare("cpu_ffi", rng, (4, 37), jnp.bfloat16, rate, with_key, *_tols(jnp.bfloat16))
    x, b, r = _inputs(rng, (4, 37), jnp.float32)
    key = _key(rng) if with_key else None
    with ops.use_backend("cpu_ffi"):
        y, vjp = jax.vjp(lambda x, b, r: bias_dropout_residual(x, b, r, rate=rate, key=key), x, b, r)
        hlo = compiled_hlo(lambda x: bias_dropout_residual(x, b, r, rate=rate, key=key), x)
    np.testing.assert_allclose(y, r + x + b, rtol=1e-6, atol=1e-5)
    dy = normal(rng, (4, 37))
    dx, db, dr = vjp(dy)
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_array_equal(dr, dy)
    np.testing.assert_allclose(db, dy.sum(0), rtol=1e-5, atol=1e-5)
    assert "threefry" not in hlo.lower(), "no random bits drawn without dropout"


def _masks(fn, rng, shape, dtype):
    """(zeros of y, zeros of dx for dy = 1) with residual = 0, for the same key."""
    x, b, _ = _inputs(rng, shape, dtype)
    r = jnp.zeros(shape, dtype)
    key = jax.random.key(7)
    y, vjp = jax.vjp(lambda x: fn(x, b, r, rate=0.4, key=key), x)
    (dx,) = vjp(jnp.ones(shape, dtype))
    return np.asarray(y == 0), np.asarray(dx == 0), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 1000), (4, 4097)])
def test_masks_bit_identical(rng, shape, dtype):
    y_ref, dx_ref, key = _masks(bias_dropout_residual_reference, rng, shape, dtype)
    with ops.use_backend("cpu_ffi"):
        y_ffi, dx_ffi, _ = _masks(jax.jit(bias_dropout_residual, static_argnames="rate"), rng, shape, dtype)
    dropped = ~np.asarray(_philox.dropout_mask(_philox.rng_operand(key), shape, 0.4))
    np.testing.assert_array_equal(y_ref, dropped)
    np.testing.assert_array_equal(y_ffi, dropped)
    np.testing.assert_array_equal(dx_ffi, dropped)
    np.testing.assert_array_equal(dx_ref, dropped)
    assert 0.3 < dropped.mean() < 0.5 or dropped.size < 100


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_dropout(rng, dtype):
    x = normal(rng, (3, 5, 41), dtype)
    key = _key(rng)
    expected = dropout_reference(x, rate=0.25, key=key)
    loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x, rate=0.25, key=key).astype(jnp.float32)))
    g_ref = jax.grad(loss(dropout_reference))(x)
    with ops.use_backend("cpu_ffi"):
        y = jax.jit(lambda x: dropout(x, rate=0.25, key=key))(x)
        g = jax.jit(jax.grad(loss(dropout)))(x)
        assert dropout(x, rate=0.25, key=None) is x
    np.testing.assert_array_equal(np.asarray(y == 0), np.asarray(expected == 0))
    assert_close(y, expected, _tols(dtype)[0], "dropout forward")
    assert_close(g, g_ref, _tols(dtype)[1], "dropout grad")
    # Same mask as bias_dropout_residual for the same key and shape.
    z = jnp.zeros_like(x)
    bdr = bias_dropout_residual_reference(x, jnp.zeros(41), z, rate=0.25, key=key)
    np.testing.assert_array_equal(np.asarray(bdr == 0), np.asarray(expected == 0))


def test_reference_gradients(rng):
    x, b, r = _inputs(rng, (3, 9), jnp.float32)
    key = _key(rng)
    f = lambda x, b, r: bias_dropout_residual_reference(x, b, r, rate=0.3, key=key)
    check_grads(f, (x, b, r), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    check_grads(lambda x: dropout_reference(x, rate=0.3, key=key), (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_cpu_ffi_custom_call_in_hlo(rng):
    x, b, r = _inputs(rng, (4, 8), jnp.float32)
    key = _key(rng)
    with ops.use_backend("cpu_ffi"):
        hlo = compiled_hlo(jax.value_and_grad(
            lambda x, b: jnp.sum(bias_dropout_residual(x, b, r, rate=0.1, key=key) ** 2), argnums=(0, 1)), x, b)
    assert "lsjax_bias_dropout_residual_fwd_cpu" in hlo and "lsjax_bias_dropout_residual_bwd_cpu" in hlo


def test_vmap(rng):
    x, b, r = _inputs(rng, (4, 6, 33), jnp.float32)
    key = _key(rng)
    keys = jax.random.split(key, 4)
    f = lambda x, r, k: bias_dropout_residual(x, b, r, rate=0.3, key=k)
    f_ref = lambda x, r, k: bias_dropout_residual_reference(x, b, r, rate=0.3, key=k)
    with ops.use_backend("cpu_ffi"):
        same_key = jax.vmap(f, in_axes=(1, 1, None), out_axes=1)(x, r, key)
        per_key = jax.jit(jax.vmap(f, in_axes=(0, 0, 0)))(x, r, keys)
        grads = jax.jit(jax.vmap(jax.grad(lambda x, b, r, k: jnp.sum(jnp.sin(
            bias_dropout_residual(x, b, r, rate=0.3, key=k))), argnums=(0, 1, 2)), in_axes=(0, None, 0, 0)))(
                x, b, r, keys)
        no_drop = jax.vmap(lambda x, r: bias_dropout_residual(x, b, r, rate=0.3, key=None))(x, r)
    assert_close(same_key, jax.vmap(f_ref, in_axes=(1, 1, None), out_axes=1)(x, r, key), 1e-5, "vmap same key")
    assert_close(per_key, jax.vmap(f_ref)(x, r, keys), 1e-5, "vmap per-example keys")
    expected = jax.vmap(jax.grad(lambda x, b, r, k: jnp.sum(jnp.sin(
        bias_dropout_residual_reference(x, b, r, rate=0.3, key=k))), argnums=(0, 1, 2)), in_axes=(0, None, 0, 0))(
            x, b, r, keys)
    for a, e in zip(grads, expected):
        assert_close(a, e, 1e-4, "per-example grads")
    assert_close(no_drop, x + b + r, 1e-6, "vmap without dropout")


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def test_batch_sharded_has_no_all_gather(rng):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = _mesh((8,), ("data",))
    x, b, r = _inputs(rng, (16, 6, 64), jnp.float32)
    key = _key(rng)
    spec = NamedSharding(mesh, P("data", None, None))
    xs, rs = jax.device_put(x, spec), jax.device_put(r, spec)
    loss = lambda x, b, r: jnp.sum(jnp.sin(bias_dropout_residual(x, b, r, rate=0.3, key=key)))
    with ops.use_backend("cpu_ffi"):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        hlo = step.lower(xs, b, rs).compile().as_text()
        value, grads = step(xs, b, rs)
        fwd = jax.jit(lambda x, r: bias_dropout_residual(x, b, r, rate=0.3, key=key))
        fwd_hlo = fwd.lower(xs, rs).compile().as_text()
        y = fwd(xs, rs)
    for text in (hlo, fwd_hlo):
        assert "all-gather" not in text
        assert "lsjax_bias_dropout_residual" in text
    assert "f32[12,64]" in hlo  # the kernels ran on local shards ([2, 6] rows of 64)
    assert y.sharding.spec[0] == "data"
    assert "all-reduce" in hlo  # dbias summed across shards
    # Sharding the first dim only: the shard offsets reproduce the unsharded mask.
    y_ref = bias_dropout_residual_reference(x, b, r, rate=0.3, key=key)
    np.testing.assert_array_equal(np.asarray(y) == np.asarray(r), np.asarray(y_ref) == np.asarray(r))
    assert_close(y, y_ref, 1e-5, "sharded forward")
    v_ref, g_ref = jax.value_and_grad(
        lambda x, b, r: jnp.sum(jnp.sin(bias_dropout_residual_reference(x, b, r, rate=0.3, key=key))),
        argnums=(0, 1, 2))(x, b, r)
    assert_sum_close(value, v_ref, x.size, what="sharded loss")
    for a, e in zip(grads, g_ref):
        assert_close(a, e, 1e-4, "sharded grads")


@pytest.mark.parametrize("mesh_shape, names, spec, shape", [
    ((4, 2), ("data", "seq"), P("data", "seq", None), (8, 6, 5)),
    ((2, 4), ("data", "tensor"), P("data", None, "tensor"), (8, 6, 12)),
])
def test_two_axis_sharding_keeps_the_mask(rng, mesh_shape, names, spec, shape):
    """Rows sharded over two dims (local blocks not contiguous, offsets not
    multiples of 4), or rows and hidden (row stride 12, blocks 3 wide), and a
    replicated cotangent, so XLA partitions the forward and the backward
    differently: both must still draw the unsharded mask."""
    mesh = _mesh(mesh_shape, names)
    x, b, _ = _inputs(rng, shape, jnp.float32)
    r = jnp.zeros(shape)
    spec = NamedSharding(mesh, spec)
    xs, rs = jax.device_put(x, spec), jax.device_put(r, spec)
    key = _key(rng)

    def f(x, r):
        y, vjp = jax.vjp(lambda x: bias_dropout_residual(x, b, r, rate=0.5, key=key), x)
        return y, vjp(jnp.ones(shape))[0]

    with ops.use_backend("cpu_ffi"):
        y, dx = jax.jit(f)(xs, rs)
    dropped = ~np.asarray(_philox.dropout_mask(_philox.rng_operand(key), shape, 0.5))
    np.testing.assert_array_equal(np.asarray(y == 0), dropped)
    np.testing.assert_array_equal(np.asarray(dx == 0), dropped)


def test_remat_and_scan(rng):
    x, b, r = _inputs(rng, (5, 16), jnp.float32)
    key = _key(rng)
    body = lambda c, k: (bias_dropout_residual(c, b, r, rate=0.2, key=k) * 0.5, None)
    f = lambda x: jnp.sum(jax.lax.scan(jax.checkpoint(body), x, jax.random.split(key, 3))[0])
    assert_remat_scan_grad_matches_reference(f, x, 1e-4)


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    x = r = jnp.ones((4, 8))
    b = jnp.ones((8,))
    key = jax.random.key(0)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="rank >= 1"):
            bias_dropout_residual(jnp.float32(1.0), jnp.ones(()), jnp.float32(1.0), rate=0.1, key=key)
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            bias_dropout_residual(x, jnp.ones((7,)), r, rate=0.1, key=key)
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            bias_dropout_residual(jnp.ones((4, 8), jnp.int32), b, r, rate=0.1, key=key)
        with pytest.raises(ValueError, match="residual must have shape"):
            bias_dropout_residual(x, b, jnp.ones((4, 9)), rate=0.1, key=key)
        with pytest.raises(TypeError, match="residual must have dtype"):
            bias_dropout_residual(x, b, jnp.ones((4, 8), jnp.bfloat16), rate=0.1, key=key)
        with pytest.raises(ValueError, match="empty"):
            bias_dropout_residual(jnp.ones((0, 8)), b, jnp.ones((0, 8)), rate=0.1, key=key)
        for rate in (1.0, -0.1, 1.5):
            with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
                bias_dropout_residual(x, b, r, rate=rate, key=key)
            with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
                dropout(x, rate=rate, key=key)
        with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
            bias_dropout_residual(x, b, r, rate=0.1, key=3)


# ------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(6, 512), (1, 1, 12), (64, 8192), (2, 65536 + 8), (1000, 1024), (257, 4100), (33, 4097)])
def test_cuda_matches_reference(rng, shape, dtype):
    _compare("cuda", rng, shape, dtype, 0.3, True, *_tols(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7), (8192, 512), (33, 4097)])
def test_cuda_bias_in_input_dtype(rng, shape, dtype):
    _compare("cuda", rng, shape, dtype, 0.3, True, *_tols(dtype), bias_dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rate,with_key", [(0.0, True), (0.5, False)])
def test_cuda_without_randomness(rng, rate, with_key):
    _compare("cuda", rng, (300, 1024), jnp.bfloat16, rate, with_key, *_tols(jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (64, 1024), (3, 4097), (130, 4100)])
def test_cuda_masks_bit_identical(rng, shape, dtype):
    y_ref, dx_ref, _ = _masks(bias_dropout_residual_reference, rng, shape, dtype)
    with ops.use_backend("cuda"):
        y, dx, _ = _masks(jax.jit(bias_dropout_residual, static_argnames="rate"), rng, shape, dtype)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 - 2])
@pytest.mark.parametrize("shape", [(16, 1024), (7, 36), (5, 7)])
def test_cuda_mask_with_stream_offset(rng, offset, shape):
    """Offsets that are not multiples of 8 make each 8-element group straddle two Philox calls."""
    x, b, _ = _inputs(rng, shape, jnp.bfloat16)
    r = jnp.zeros(shape, jnp.bfloat16)
    rng_op = _philox.rng_operand(_key(rng), offset=offset)
    with ops.use_backend("cuda"):
        y = jax.jit(lambda x, r, k: _fwd(0.5, "cuda", x, b, r, k))(x, r, rng_op)
    dropped = ~np.asarray(_philox.dropout_mask(rng_op, shape, 0.5))
    np.testing.assert_array_equal(np.asarray(y == 0), dropped)


@pytest.mark.gpu
def test_cuda_dbias_deterministic(rng):
    x, b, r = _inputs(rng, (4096, 1024), jnp.bfloat16)
    key = _key(rng)
    with ops.use_backend("cuda"):
        g = jax.jit(jax.grad(_loss(bias_dropout_residual, 0.1, key), argnums=1))
        first = np.asarray(g(x, b, r))
        for _ in range(3):
            np.testing.assert_array_equal(np.asarray(g(x, b, r)), first)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(257, 1024), (33, 4097)])
def test_cuda_writes_every_output(rng, shape):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten."""
    x, b, r = _inputs(rng, shape, jnp.bfloat16)
    key = _key(rng)

    def step(poison, x, r):
        y, vjp = jax.vjp(lambda x, b: bias_dropout_residual(x, b, r, rate=0.2, key=key), x, b)
        dx, db = vjp(jnp.ones_like(y))
        return poison, y, dx, db

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the outputs
            poison = jnp.full(shape, jnp.nan, jnp.bfloat16)
            _, y, dx, db = jax.jit(step, donate_argnums=0)(poison, x, r)
            for out in (y, dx, db):
                assert bool(jnp.all(jnp.isfinite(out)))
    assert_close(y, bias_dropout_residual_reference(x, b, r, rate=0.2, key=key), 2e-2, "poisoned y")
