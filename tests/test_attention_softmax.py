"""Attention softmax: reference vs CPU FFI vs CUDA, masks, dropout, gradients, transforms, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lsjax import ops
from lsjax.ops.attention_softmax import attention_softmax, attention_softmax_reference
from tests.helpers import (DTYPES, KERNEL_RTOL, assert_close,
                           assert_remat_scan_grad_matches_reference, assert_sum_close, compiled_hlo, normal)

# [batch, heads, q_len, k_len]: length 1, odd k, k not a multiple of 8, long rows.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (2, 2, 9, 128), (1, 1, 2, 4097)]
VARIANTS = {
    "plain": dict(),
    "mask_dropout": dict(mask=True, dropout_rate=0.25),
    "causal_scaled": dict(causal=True, scale=0.375),
    "all": dict(mask=True, causal=True, scale=0.5, dropout_rate=0.1),
}


def _padding_mask(rng, b, k):
    """Each batch row keeps a random-length prefix (at least one key)."""
    lengths = rng.integers(1, k + 1, size=b)
    return jnp.asarray(np.arange(k)[None, :] < lengths[:, None])


def _kwargs(rng, shape, variant, seed=0):
    v = VARIANTS[variant]
    kw = dict(causal=v.get("causal", False), scale=v.get("scale", 1.0))
    if v.get("mask"):
        kw["key_padding_mask"] = _padding_mask(rng, shape[0], shape[3])
    if v.get("dropout_rate"):
        kw.update(dropout_rate=v["dropout_rate"], key=jax.random.key(seed))
    return kw


def _loss(fn, kw):
    def f(x, w):
        # Weighted so every output element gets a distinct cotangent.
        return jnp.sum(jnp.sin(fn(x, **kw).astype(jnp.float32) * w))
    return f


def _compare(backend, rng, shape, dtype, variant, fwd_rtol, grad_rtol):
    x = normal(rng, shape, dtype, scale=3.0)
    w = normal(rng, shape, jnp.float32) * 4
    kw = _kwargs(rng, shape, variant, seed=int(rng.integers(1 << 30)))
    expected = attention_softmax_reference(x, **kw)
    grad_ref = jax.grad(_loss(attention_softmax_reference, kw))(x, w)
    with ops.use_backend(backend):
        actual = jax.jit(lambda x: attention_softmax(x, **kw))(x)
        grad = jax.jit(jax.grad(_loss(attention_softmax, kw)))(x, w)
    what = f"{backend} {variant} {shape} {jnp.dtype(dtype).name}"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # Masked elements are exactly 0, and dropout drops exactly the reference's
    # elements (judged where p is not so small that a 16-bit output underflows).
    nodrop = {k: v for k, v in kw.items() if k not in ("dropout_rate", "key")}
    p32 = np.asarray(attention_softmax_reference(x.astype(jnp.float32), **nodrop))
    a, e = np.asarray(actual), np.asarray(expected)
    assert np.all(a[p32 == 0] == 0), f"{what}: masked elements not zero"
    big = p32 > 1e-5
    np.testing.assert_array_equal(a[big] == 0, e[big] == 0, err_msg=f"{what}: dropout mask")
    assert_close(actual, expected, fwd_rtol, f"{what} forward")
    assert grad.dtype == x.dtype
    assert_close(grad, grad_ref, grad_rtol, f"{what} dx")


# Every variant in float32; the 16-bit dtypes on the plain and the everything-on variants (test time).
CPU_CASES = [(d, v) for d in DTYPES for v in VARIANTS if d == jnp.float32 or v in ("plain", "all")]


@pytest.mark.parametrize("dtype,variant", CPU_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_matches_reference(rng, shape, dtype, variant):
    rtol = 1e-5 if dtype == jnp.float32 else KERNEL_RTOL[jnp.dtype(dtype)]
    _compare("cpu_ffi", rng, shape, dtype, variant, rtol, 1e-4 if dtype == jnp.float32 else 3e-2)


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_dropout_mask_bits_and_rate(rng, backend):
    shape = (2, 4, 16, 64)
    x = normal(rng, shape)
    key = jax.random.key(int(rng.integers(1 << 30)))
    with ops.use_backend(backend):
        y = attention_softmax(x, dropout_rate=0.4, key=key)
        y_same = attention_softmax(x, dropout_rate=0.4, key=key)
        y_other = attention_softmax(x, dropout_rate=0.4, key=jax.random.fold_in(key, 1))
        y_eval = attention_softmax(x, dropout_rate=0.4)  # key=None: no dropout
    p = attention_softmax_reference(x)
    assert bool(jnp.all(p > 0))
    keep = np.asarray(y != 0)
    assert abs(keep.mean() - 0.6) < 0.02
    # The mask is Philox over the flat output index, the kept values p / (1 - rate).
    from lsjax.ops import _philox
    expected_keep = _philox.dropout_mask(_philox.rng_operand(key), shape, float(np.float32(0.4)))
    np.testing.assert_array_equal(keep, np.asarray(expected_keep))
    assert_close(jnp.where(keep, y, 0), jnp.where(keep, p / 0.6, 0), 1e-5, "kept values")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_same))
    assert np.any(np.asarray(y_other != 0) != keep)
    assert_close(y_eval, p, 1e-6, "key=None is deterministic")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_fully_masked_rows_are_zero(rng, backend):
    b, h, q, k = 3, 2, 4, 6
    x = normal(rng, (b, h, q, k))
    mask = jnp.ones((b, k), bool).at[1].set(False)
    w = normal(rng, (b, h, q, k))
    with ops.use_backend(backend):
        f = lambda x: attention_softmax(x, key_padding_mask=mask, dropout_rate=0.2, key=jax.random.key(0))
        y = jax.jit(f)(x)
        g = jax.jit(jax.grad(lambda x: jnp.sum(f(x) * w)))(x)
        # q_len > k_len with causal: the first q - k queries see no key.
        yc = attention_softmax(normal(rng, (1, 1, 5, 3)), causal=True)
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(y[1] == 0)) and bool(jnp.all(g[1] == 0))
    assert bool(jnp.all(yc[0, 0, :2] == 0)) and bool(jnp.all(jnp.isfinite(yc)))
    assert_close(jnp.sum(yc[0, 0, 2:], -1), jnp.ones(3), 1e-5, "rows with keys sum to 1")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_causal_is_bottom_right_aligned(rng, backend):
    x = normal(rng, (2, 3, 4, 9))
    with ops.use_backend(backend):
        y = attention_softmax(x, causal=True)
        # Incremental decoding: one query sees every key.
        last = attention_softmax(x[:, :, -1:], causal=True)
    allowed = np.arange(9)[None, :] <= np.arange(4)[:, None] + 5
    expected = jax.nn.softmax(jnp.where(allowed, x, -jnp.inf), axis=-1)
    assert_close(y, expected, 1e-5, "causal")
    assert_close(last, jax.nn.softmax(x[:, :, -1:], axis=-1), 1e-5, "q_len = 1")


def test_reference_gradients(rng):
    x = normal(rng, (2, 2, 3, 5))
    mask = jnp.asarray([[True, True, False, True, False], [True] * 5])
    f = lambda x: attention_softmax_reference(x, key_padding_mask=mask, causal=True, scale=0.7)
    check_grads(f, (x,), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)
    g = lambda x: attention_softmax_reference(x, key_padding_mask=mask, dropout_rate=0.3, key=jax.random.key(2))
    check_grads(g, (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_cpu_ffi_custom_call_in_hlo(rng):
    x = normal(rng, (2, 2, 4, 8))
    with ops.use_backend("cpu_ffi"):
        hlo = compiled_hlo(jax.grad(lambda x: attention_softmax(x, dropout_rate=0.1, key=jax.random.key(0)).sum()), x)
    assert "lsjax_attention_softmax_fwd_cpu" in hlo and "lsjax_attention_softmax_bwd_cpu" in hlo


def test_vmap_and_per_example_grads(rng):
    x = normal(rng, (3, 2, 2, 4, 10))
    mask = jnp.asarray(rng.random((3, 2, 10)) > 0.3)
    w = normal(rng, x.shape[1:])
    keys = jax.random.split(jax.random.key(5), 3)

    def loss(fn, x, m, key):
        return jnp.sum(jnp.sin(fn(x, key_padding_mask=m, causal=True, dropout_rate=0.2, key=key) * w))

    with ops.use_backend("cpu_ffi"):
        y = jax.vmap(lambda x, m: attention_softmax(x, key_padding_mask=m), in_axes=(2, None), out_axes=2)(x, mask[:, 0])
        y_mask = jax.vmap(lambda m: attention_softmax(x[0], key_padding_mask=m))(mask)
        grads = jax.jit(jax.vmap(jax.grad(lambda x, m, k: loss(attention_softmax, x, m, k))))(x, mask, keys)
    y_ref = jnp.stack([attention_softmax_reference(x[:, :, i], key_padding_mask=mask[:, 0]) for i in range(2)], 2)
    assert_close(y, y_ref, 1e-5, "vmap over heads")
    assert_close(y_mask, jnp.stack([attention_softmax_reference(x[0], key_padding_mask=m) for m in mask]), 1e-5,
                 "vmap over the mask")
    # Per-example keys: each instance has the mask of an unbatched call.
    g_ref = jnp.stack([jax.grad(lambda x: loss(attention_softmax_reference, x, mask[i], keys[i]))(x[i]) for i in range(3)])
    assert_close(grads, g_ref, 1e-4, "per-example grads with dropout")


@pytest.mark.parametrize("spec", [P("data", "model", None, None), P("data", None, "model", None)])
def test_sharded_has_no_all_gather(rng, spec):
    """Batch+heads (or batch+queries) sharded: no all-gather, numbers (dropout mask too) as unsharded."""
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shape = (8, 4, 6, 16)
    x = normal(rng, shape)
    w = normal(rng, shape)
    mask = _padding_mask(rng, shape[0], shape[3])
    key = jax.random.key(7)
    kw = dict(causal=True, scale=0.8, dropout_rate=0.3, key=key)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    ms = jax.device_put(mask, NamedSharding(mesh, P("data", None)))
    loss = lambda fn: (lambda x, m: jnp.sum(jnp.sin(fn(x, key_padding_mask=m, **kw) * w)))
    with ops.use_backend("cpu_ffi"):
        step = jax.jit(jax.value_and_grad(loss(attention_softmax)))
        hlo = step.lower(xs, ms).compile().as_text()
        value, grad = step(xs, ms)
        fwd = jax.jit(lambda x, m: attention_softmax(x, key_padding_mask=m, **kw))
        fwd_hlo = fwd.lower(xs, ms).compile().as_text()
        y = fwd(xs, ms)
    for text in (hlo, fwd_hlo):
        assert "all-gather" not in text
        assert "lsjax_attention_softmax" in text
    local = "f32[2,2,6,16]" if spec[1] == "model" else "f32[2,4,3,16]"
    assert local in fwd_hlo and local in hlo
    assert (tuple(y.sharding.spec) + (None,) * 4)[:3] == tuple(spec)[:3]
    y_ref = attention_softmax_reference(x, key_padding_mask=mask, **kw)
    np.testing.assert_array_equal(np.asarray(y == 0), np.asarray(y_ref == 0))
    assert_close(y, y_ref, 1e-5, "sharded forward")
    v_ref, g_ref = jax.value_and_grad(loss(attention_softmax_reference))(x, mask)
    assert_sum_close(value, v_ref, x.size, what="sharded loss")
    assert_close(grad, g_ref, 1e-4, "sharded grads")


def test_remat_and_scan(rng):
    x = normal(rng, (2, 2, 4, 12))
    body = lambda c, _: (attention_softmax(c, causal=True, dropout_rate=0.1, key=jax.random.key(1)) * 3.0, None)
    f = lambda x: jnp.sum(jnp.sin(jax.lax.scan(jax.checkpoint(body), x, None, length=3)[0]))
    assert_remat_scan_grad_matches_reference(f, x, 1e-4)


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    x = jnp.ones((2, 3, 4, 5))
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="rank 4"):
            attention_softmax(jnp.ones((2, 4, 5, 1, 1)))
        with pytest.raises(ValueError, match="rank >= 4"):
            attention_softmax(jnp.ones((4, 5)))
        with pytest.raises(ValueError, match="empty"):
            attention_softmax(jnp.ones((0, 3, 4, 5)))
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            attention_softmax(jnp.ones((2, 3, 4, 5), jnp.int32))
        with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, k_len\) = \(2, 5\)"):
            attention_softmax(x, key_padding_mask=jnp.ones((2, 4), bool))
        with pytest.raises(TypeError, match="key_padding_mask must be bool"):
            attention_softmax(x, key_padding_mask=jnp.ones((2, 5), jnp.int32))
        with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
            attention_softmax(x, dropout_rate=1.0, key=jax.random.key(0))
        with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
            attention_softmax(x, dropout_rate=-0.1)
        with pytest.raises(ValueError, match="scale must be finite"):
            attention_softmax(x, scale=float("nan"))
        with pytest.raises(TypeError, match="scale must be a Python float"):
            jax.jit(lambda x, s: attention_softmax(x, scale=s))(x, 0.5)
        with pytest.raises(TypeError, match="causal must be a Python bool"):
            attention_softmax(x, causal=jnp.bool_(True))


# ------------------------------------------------------------------- GPU --

GPU_SHAPES = SHAPES + [(1, 2, 3, 1000), (8, 8, 16, 128), (2, 4, 8, 512), (2, 2, 8, 1024), (1, 2, 4, 4096), (1, 1, 4, 8192),
                       (1, 1, 3, 16384 + 8), (1, 1, 2, 40000)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_cuda_matches_reference(rng, shape, dtype, variant):
    rtol = KERNEL_RTOL[jnp.dtype(dtype)]
    _compare("cuda", rng, shape, dtype, variant, rtol, 1e-4 if dtype == jnp.float32 else 3e-2)


@pytest.mark.gpu
def test_cuda_dropout_offset_not_multiple_of_4(rng):
    """The per-element Philox path (rng offset not 8-aligned) gives the reference mask too."""
    from lsjax.ops import _philox
    import importlib

    mod = importlib.import_module("lsjax.ops.attention_softmax")

    x = normal(rng, (2, 2, 4, 64), jnp.bfloat16)
    rng_op = _philox.rng_operand(jax.random.key(3), offset=6)
    statics = (False, 1.0, float(np.float32(0.3)), "cuda")
    with ops.use_backend("cuda"):
        y = jax.jit(lambda x: mod._attention_softmax_ffi(x, None, rng_op, statics))(x)
    keep = _philox.dropout_mask(rng_op, x.shape, float(np.float32(0.3)))
    np.testing.assert_array_equal(np.asarray(y != 0), np.asarray(keep))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 4, 33, 128), (1, 3, 7, 4097), (1, 1, 5, 20000)])
def test_cuda_writes_every_output(rng, shape):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten."""
    x = normal(rng, shape, jnp.bfloat16)
    mask = _padding_mask(rng, shape[0], shape[3])
    kw = dict(key_padding_mask=mask, causal=True, dropout_rate=0.1, key=jax.random.key(0))

    def step(poison, x):
        y, vjp = jax.vjp(lambda x: attention_softmax(x, **kw), x)
        return poison, y, vjp(jnp.ones_like(y))[0]

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the outputs
            poison = jnp.full(shape, jnp.nan, jnp.bfloat16)
            _, y, dx = jax.jit(step, donate_argnums=0)(poison, x)
            assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(dx)))
    assert_close(y, attention_softmax_reference(x, **kw), 2e-2, "poisoned y")
