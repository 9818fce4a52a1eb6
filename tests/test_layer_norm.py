"""Layer norm: reference vs CPU FFI vs CUDA, gradients, transforms, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lsjax import ops
from lsjax.ops import layer_norm, layer_norm_reference
from tests.helpers import (DTYPES, KERNEL_RTOL, assert_close,
                           assert_remat_scan_grad_matches_reference, compiled_hlo, normal)

SHAPES = [(3, 1), (5, 7), (2, 3, 1000), (4, 4097), (6, 512), (2, 5, 1024), (3, 16384)]


def _inputs(rng, shape, dtype, param_dtype=jnp.float32):
    h = shape[-1]
    return (normal(rng, shape, dtype) * 3 + 1, normal(rng, (h,), param_dtype), normal(rng, (h,), param_dtype),
            normal(rng, shape, dtype))


def _loss(fn, residual):
    def f(x, s, b, r):
        out = fn(x, s, b, residual=r if residual else None)
        ys = out if residual else (out,)
        # Weighted sum so every output element gets a distinct cotangent.
        return sum(jnp.sum(jnp.sin(y.astype(jnp.float32) * (i + 1))) for i, y in enumerate(ys))
    return f


def _compare(backend, rng, shape, dtype, residual, fwd_rtol, grad_rtol, param_dtype=jnp.float32):
    x, s, b, r = _inputs(rng, shape, dtype, param_dtype)
    kw = {"residual": r} if residual else {}
    expected = layer_norm_reference(x, s, b, **kw)
    grads_ref = jax.grad(_loss(layer_norm_reference, residual), argnums=(0, 1, 2, 3))(x, s, b, r)
    with ops.use_backend(backend):
        actual = jax.jit(lambda *a: layer_norm(a[0], a[1], a[2], **({"residual": a[3]} if residual else {})))(x, s, b, r)
        grads = jax.jit(jax.grad(_loss(layer_norm, residual), argnums=(0, 1, 2, 3)))(x, s, b, r)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, fwd_rtol, f"{backend} forward {shape} {jnp.dtype(dtype).name}")
    names = ["dx", "dscale", "dbias", "dresidual"] if residual else ["dx", "dscale", "dbias"]
    for name, a, e in zip(names, grads, grads_ref):
        assert a.dtype == e.dtype, name
        assert_close(a, e, grad_rtol, f"{backend} {name} {shape} {jnp.dtype(dtype).name}")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_matches_reference(rng, shape, dtype, residual):
    # Same float32 math on both sides: differences are summation-order rounding
    # (and one rounding of the 16-bit output).
    rtol = 1e-5 if dtype == jnp.float32 else KERNEL_RTOL[jnp.dtype(dtype)]
    _compare("cpu_ffi", rng, shape, dtype, residual, rtol, 1e-4 if dtype == jnp.float32 else 3e-2)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7), (6, 512), (2, 3, 1000)])
def test_cpu_ffi_params_in_input_dtype(rng, shape, dtype, residual):
    """16-bit scale/bias are read as they are and their gradients written in their dtype."""
    _compare("cpu_ffi", rng, shape, dtype, residual, KERNEL_RTOL[jnp.dtype(dtype)], 3e-2, param_dtype=dtype)


def test_cpu_ffi_rejects_mixed_param_dtypes():
    x = jnp.ones((2, 8), jnp.float16)
    stats = jax.ShapeDtypeStruct((2,), jnp.float32)
    call = jax.ffi.ffi_call(ops.backend.ffi_target("layer_norm_fwd", "cpu_ffi"),
                            (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats))
    with pytest.raises(Exception, match="scale, bias and their gradients must share one dtype"):
        call(x, jnp.ones(8, jnp.float16), jnp.ones(8, jnp.float32), eps=np.float32(1e-5))[0].block_until_ready()
    with pytest.raises(Exception, match=r"must be \[8\] of float32 or the input's dtype"):
        call(x, jnp.ones(8, jnp.bfloat16), jnp.ones(8, jnp.bfloat16), eps=np.float32(1e-5))[0].block_until_ready()


def test_reference_gradients(rng):
    x, s, b, r = _inputs(rng, (3, 9), jnp.float32)
    check_grads(lambda x, s, b: layer_norm_reference(x, s, b), (x, s, b), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)
    check_grads(lambda x, r: layer_norm_reference(x, s, b, residual=r)[0], (x, r), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_cpu_ffi_custom_call_in_hlo(rng):
    x, s, b, _ = _inputs(rng, (4, 8), jnp.float32)
    with ops.use_backend("cpu_ffi"):
        hlo = compiled_hlo(jax.grad(lambda x: layer_norm(x, s, b).sum()), x)
    assert "lsjax_layer_norm_fwd_cpu" in hlo and "lsjax_layer_norm_bwd_cpu" in hlo


def test_vmap_and_per_example_grads(rng):
    x, s, b, _ = _inputs(rng, (4, 6, 33), jnp.float32)
    loss = lambda x, s: jnp.sum(jnp.sin(layer_norm(x, s, b)))
    loss_ref = lambda x, s: jnp.sum(jnp.sin(layer_norm_reference(x, s, b)))
    with ops.use_backend("cpu_ffi"):
        y = jax.vmap(lambda x: layer_norm(x, s, b), in_axes=1, out_axes=1)(x)
        per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(x, s)
        batched_scale = jax.vmap(lambda x, s: layer_norm(x, s, b))(x, jnp.stack([s] * 4))
    assert_close(y, layer_norm_reference(x, s, b), 1e-5, "vmap forward")
    expected = jax.vmap(jax.grad(loss_ref, argnums=(0, 1)), in_axes=(0, None))(x, s)
    for a, e in zip(per_example, expected):
        assert_close(a, e, 1e-4, "per-example grads")
    assert_close(batched_scale, layer_norm_reference(x, s, b), 1e-5, "vmapped scale")


def test_batch_sharded_has_no_all_gather(rng):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = jax.make_mesh((4, 2), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, s, b, r = _inputs(rng, (8, 6, 64), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq", None)))
    rs = jax.device_put(r, NamedSharding(mesh, P("data", "seq", None)))
    loss = lambda x, r, s, b: sum(jnp.sum(o ** 2) for o in layer_norm(x, s, b, residual=r))
    with ops.use_backend("cpu_ffi"):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        hlo = step.lower(xs, rs, s, b).compile().as_text()
        value, grads = step(xs, rs, s, b)
        fwd = jax.jit(lambda x: layer_norm(x, s, b))
        fwd_hlo = fwd.lower(xs).compile().as_text()
        y = fwd(xs)
    for text in (hlo, fwd_hlo):
        assert "all-gather" not in text
        assert "lsjax_layer_norm" in text
    # The kernel ran on local shards: [8/4, 6/2, 64].
    assert "f32[2,3,64]" in hlo
    assert y.sharding.spec[:2] == ("data", "seq")
    # dscale/dbias are summed across shards (all-reduce), and match unsharded.
    assert "all-reduce" in hlo
    v_ref, g_ref = jax.value_and_grad(
        lambda x, r, s, b: sum(jnp.sum(o ** 2) for o in layer_norm_reference(x, s, b, residual=r)), argnums=(0, 1, 2, 3)
    )(x, r, s, b)
    assert_close(value, v_ref, 1e-5, "sharded loss")  # positive terms: relative to the total
    for a, e in zip(grads, g_ref):
        assert_close(a, e, 1e-4, "sharded grads")


def test_remat_and_scan(rng):
    x, s, b, _ = _inputs(rng, (5, 16), jnp.float32)
    body = lambda c, _: (layer_norm(c, s, b) * 1.5, None)
    f = lambda x: jnp.sum(jax.lax.scan(jax.checkpoint(body), x, None, length=3)[0])
    assert_remat_scan_grad_matches_reference(f, x, 1e-4)


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    x = jnp.ones((4, 8))
    s = b = jnp.ones((8,))
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="rank >= 1"):
            layer_norm(jnp.float32(1.0), jnp.ones(()), jnp.ones(()))
        with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
            layer_norm(x, jnp.ones((7,)), b)
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            layer_norm(jnp.ones((4, 8), jnp.int32), s, b)
        with pytest.raises(ValueError, match="residual must have shape"):
            layer_norm(x, s, b, residual=jnp.ones((4, 9)))
        with pytest.raises(TypeError, match="residual must have dtype"):
            layer_norm(x, s, b, residual=jnp.ones((4, 8), jnp.bfloat16))
        with pytest.raises(ValueError, match="empty"):
            layer_norm(jnp.ones((0, 8)), s, b)


# ------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(64, 8192), (2, 65536 + 8), (1000, 1024)])
def test_cuda_matches_reference(rng, shape, dtype, residual):
    rtol = KERNEL_RTOL[jnp.dtype(dtype)]
    _compare("cuda", rng, shape, dtype, residual, rtol, 1e-4 if dtype == jnp.float32 else 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7), (8192, 512), (64, 1024), (33, 4097)])
def test_cuda_params_in_input_dtype(rng, shape, dtype, residual):
    _compare("cuda", rng, shape, dtype, residual, KERNEL_RTOL[jnp.dtype(dtype)], 3e-2, param_dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(257, 1024), (33, 4097)])
def test_cuda_writes_every_output(rng, shape):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten."""
    x, s, b, r = _inputs(rng, shape, jnp.bfloat16)

    def step(poison, x, r):
        y, z = layer_norm(x, s, b, residual=r)
        return poison, y, z

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the outputs
            poison = jnp.full(shape, jnp.nan, jnp.bfloat16)
            _, y, z = jax.jit(step, donate_argnums=0)(poison, x, r)
            assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(z)))
    y_ref, z_ref = layer_norm_reference(x, s, b, residual=r)
    assert_close(y, y_ref, 2e-2, "poisoned y")
    assert_close(z, z_ref, 2e-2, "poisoned z")


def test_nested_vmap(rng):
    x, s, b, _ = _inputs(rng, (3, 4, 5, 16), jnp.float32)
    with ops.use_backend("cpu_ffi"):
        y = jax.vmap(jax.vmap(lambda x: layer_norm(x, s, b)))(x)
        g = jax.vmap(jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(layer_norm(x, s, b))))))(x)
    assert_close(y, layer_norm_reference(x, s, b), 1e-5, "nested vmap")
    g_ref = jax.vmap(jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(layer_norm_reference(x, s, b))))))(x)
    assert_close(g, g_ref, 1e-4, "nested vmap grads")
