"""bias_act_dropout: reference vs CPU FFI vs CUDA, masks, gradients, transforms, sharding, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lsjax import ops
from lsjax.ops import _philox
from lsjax.ops._bias_dropout import dbias_call, ffi, like
from lsjax.ops.bias_act_dropout import ACTIVATIONS, bias_act_dropout, bias_act_dropout_reference
from tests.helpers import DTYPES, KERNEL_RTOL, assert_close, assert_sum_close, compiled_hlo, normal

ACTS = ["relu", "gelu", "gelu_tanh"]
SHAPES = [(3, 1), (5, 7), (2, 3, 1000), (3, 4097)]


def _inputs(rng, shape, dtype, bias_dtype=jnp.float32):
    return normal(rng, shape, dtype) * 2, normal(rng, (shape[-1],), bias_dtype)


def _key(rng):
    return jax.random.key(int(rng.integers(1 << 31)))


def _loss(fn, act, rate, key):
    def f(x, b):
        y = fn(x, b, activation=act, rate=rate, key=key)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))
    return f


def _tols(dtype):
    if dtype == jnp.float32:
        return 1e-5, 1e-4
    return KERNEL_RTOL[jnp.dtype(dtype)], 3e-2


def _compare(backend, rng, shape, dtype, act, rate=0.3, with_key=True, bias_dtype=jnp.float32):
    fwd_rtol, grad_rtol = _tols(dtype)
    x, b = _inputs(rng, shape, dtype, bias_dtype)
    key = _key(rng) if with_key else None
    expected = bias_act_dropout_reference(x, b, activation=act, rate=rate, key=key)
    grads_ref = jax.grad(_loss(bias_act_dropout_reference, act, rate, key), argnums=(0, 1))(x, b)
    with ops.use_backend(backend):
        actual = jax.jit(lambda x, b: bias_act_dropout(x, b, activation=act, rate=rate, key=key))(x, b)
        grads = jax.jit(jax.grad(_loss(bias_act_dropout, act, rate, key), argnums=(0, 1)))(x, b)
    what = f"{backend} {act} {shape} {jnp.dtype(dtype).name} rate={rate} key={with_key}"
    assert actual.dtype == x.dtype and actual.shape == x.shape
    assert_close(actual, expected, fwd_rtol, f"forward {what}")
    for name, a, e, like in zip(["dx", "dbias"], grads, grads_ref, (x, b)):
        assert a.dtype == like.dtype and a.shape == like.shape, name
        assert_close(a, e, grad_rtol, f"{name} {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_cpu_ffi_matches_reference(rng, act, dtype):
    _compare("cpu_ffi", rng, (5, 37), dtype, act)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_cpu_ffi_bias_in_input_dtype(rng, act, dtype):
    """A 16-bit bias is read as it is and dbias written in its dtype."""
    _compare("cpu_ffi", rng, (2, 3, 1000), dtype, act, bias_dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_shapes(rng, shape):
    _compare("cpu_ffi", rng, shape, jnp.bfloat16, "gelu")


@pytest.mark.parametrize("rate,with_key", [(0.0, True), (0.5, False)])
def test_cpu_ffi_without_randomness(rng, rate, with_key):
    _compare("cpu_ffi", rng, (4, 37), jnp.float32, "gelu_tanh", rate, with_key)
    x, b = _inputs(rng, (4, 37), jnp.float32)
    with ops.use_backend("cpu_ffi"):
        y = bias_act_dropout(x, b, activation="gelu", rate=rate, key=_key(rng) if with_key else None)
    assert_close(y, jax.nn.gelu(x + b, approximate=False), 1e-5, "no dropout")


def _masks(fn, rng, shape, dtype, act):
    """(zeros of y, zeros of dx for dy = 1) for the same key. Inputs are >= 0.4
    (after bias), where gelu and its derivative are far from 0, so a zero means
    dropped (an approximate tanh cannot round a value to 0 there)."""
    x, b = jnp.abs(normal(rng, shape, dtype)) + 0.5, normal(rng, (shape[-1],), scale=0.02)
    key = jax.random.key(11)
    y, vjp = jax.vjp(lambda x: fn(x, b, activation=act, rate=0.4, key=key), x)
    (dx,) = vjp(jnp.ones(shape, dtype))
    return np.asarray(y == 0), np.asarray(dx == 0), key


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_bit_identical(rng, dtype):
    shape = (3, 5, 67)
    y_ref, dx_ref, key = _masks(bias_act_dropout_reference, rng, shape, dtype, "gelu_tanh")
    with ops.use_backend("cpu_ffi"):
        y, dx, _ = _masks(jax.jit(bias_act_dropout, static_argnames=("activation", "rate")), rng, shape, dtype,
                          "gelu_tanh")
    dropped = ~np.asarray(_philox.dropout_mask(_philox.rng_operand(key), shape, 0.4))
    for zeros in (y_ref, dx_ref, y, dx):
        np.testing.assert_array_equal(zeros, dropped)


def test_reference_gradients(rng):
    key = _key(rng)
    x, b = _inputs(rng, (3, 9), jnp.float32)
    for act in ("gelu", "gelu_tanh"):
        check_grads(lambda x, b: bias_act_dropout_reference(x, b, activation=act, rate=0.3, key=key), (x, b),
                    order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    # relu away from its kink: |x + b| >= 0.5 and perturbations are small.
    b = jnp.zeros(9)
    x = jnp.where(x >= 0, x + 0.5, x - 0.5)
    check_grads(lambda x, b: bias_act_dropout_reference(x, b, activation="relu", rate=0.3, key=key), (x, b),
                order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_matches_jax_activations(rng):
    x, b = _inputs(rng, (4, 16), jnp.float32)
    for act, f in [("relu", jax.nn.relu), ("gelu", lambda v: jax.nn.gelu(v, approximate=False)),
                   ("gelu_tanh", lambda v: jax.nn.gelu(v, approximate=True))]:
        with ops.use_backend("cpu_ffi"):
            y, vjp = jax.vjp(lambda x: bias_act_dropout(x, b, activation=act, rate=0.0, key=None), x)
        y_ref, vjp_ref = jax.vjp(lambda x: f(x + b), x)
        assert_close(y, y_ref, 1e-5, act)
        dy = normal(rng, (4, 16))
        assert_close(vjp(dy)[0], vjp_ref(dy)[0], 1e-5, f"{act} derivative")


def _gelus_float64(v):
    """{activation: (gelu(v), gelu'(v))} in float64, the ground truth."""
    v = np.asarray(v, np.float64)
    cdf = 0.5 * np.vectorize(math.erfc)(-v / math.sqrt(2))
    u = math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)
    t = np.tanh(u)
    du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * v**2)
    return {"gelu": (v * cdf, cdf + v * np.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)),
            "gelu_tanh": (0.5 * v * (1 + t), 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * du)}


def _check_gelu_wide_range(backend):
    """Both gelus and their derivatives over the whole useful range, float32, no
    dropout, against float64 (XLA's float32 gelu_tanh gradient is itself off by
    3.5e-6 there: its 1 - tanh^2 cancels): the kernels' erfc fit keeps Phi
    within 3e-7, and gelu_tanh's sigmoid form has no cancellation."""
    v = jnp.linspace(-12.0, 12.0, 24001, dtype=jnp.float32)
    for act, (y_ref, dy_ref) in _gelus_float64(v).items():
        with ops.use_backend(backend):
            y, vjp = jax.vjp(lambda v: bias_act_dropout(v, jnp.zeros(1), activation=act, rate=0.0, key=None),
                             v[:, None])
            (dv,) = vjp(jnp.ones_like(y))
        assert_close(y[:, 0], y_ref, 5e-7, f"{backend} {act}")
        assert_close(dv[:, 0], dy_ref, 1e-6, f"{backend} {act} derivative")


def test_cpu_ffi_gelus_wide_range():
    _check_gelu_wide_range("cpu_ffi")


def _check_relu_backward(backend, dtype):
    """relu's backward reads y: exact zeros, negatives, NaN and dropped
    elements all get gradient 0, as in the reference."""
    x = jnp.asarray(np.tile([0.0, -0.0, -1.5, 2.0, np.nan, 1e-3, -3.0, 0.75], (9, 33)), dtype)
    b = jnp.zeros(x.shape[-1])
    dy = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), dtype)
    key = jax.random.key(5)
    dx_ref, db_ref = jax.vjp(lambda x, b: bias_act_dropout_reference(x, b, activation="relu", rate=0.3, key=key),
                             x, b)[1](dy)
    with ops.use_backend(backend):
        dx, db = jax.vjp(lambda x, b: bias_act_dropout(x, b, activation="relu", rate=0.3, key=key), x, b)[1](dy)
    np.testing.assert_array_equal(np.asarray(dx.astype(jnp.float32)), np.asarray(dx_ref.astype(jnp.float32)))
    assert_close(db, db_ref, 1e-5, f"{backend} relu dbias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_ffi_relu_backward_from_output(dtype):
    _check_relu_backward("cpu_ffi", dtype)


def test_relu_saves_output_not_input(rng):
    """The relu backward's residuals: y (no x, no rng); gelu keeps x and the rng."""
    x, b = _inputs(rng, (4, 8), jnp.float32)
    key = _key(rng)
    with ops.use_backend("cpu_ffi"):
        for act in ("relu", "gelu"):
            y, vjp = jax.vjp(lambda x: bias_act_dropout(x, b, activation=act, rate=0.1, key=key), x)
            big = [leaf for leaf in jax.tree.leaves(vjp) if getattr(leaf, "shape", None) == x.shape]
            assert len(big) == 1, act
            np.testing.assert_array_equal(np.asarray(big[0]), np.asarray(y if act == "relu" else x))


def test_cpu_ffi_custom_call_in_hlo(rng):
    x, b = _inputs(rng, (4, 8), jnp.float32)
    key = _key(rng)
    with ops.use_backend("cpu_ffi"):
        hlo = compiled_hlo(jax.value_and_grad(
            lambda x, b: jnp.sum(bias_act_dropout(x, b, activation="gelu", rate=0.1, key=key) ** 2),
            argnums=(0, 1)), x, b)
    assert "lsjax_bias_act_dropout_fwd_cpu" in hlo and "lsjax_bias_act_dropout_bwd_cpu" in hlo


def test_vmap(rng):
    x, b = _inputs(rng, (4, 6, 33), jnp.float32)
    keys = jax.random.split(_key(rng), 4)
    loss = lambda f: lambda x, b, k: jnp.sum(jnp.sin(f(x, b, activation="gelu", rate=0.3, key=k)))
    with ops.use_backend("cpu_ffi"):
        y = jax.jit(jax.vmap(lambda x, k: bias_act_dropout(x, b, activation="relu", rate=0.3, key=k)))(x, keys)
        grads = jax.jit(jax.vmap(jax.grad(loss(bias_act_dropout), argnums=(0, 1)), in_axes=(0, None, 0)))(x, b, keys)
    y_ref = jax.vmap(lambda x, k: bias_act_dropout_reference(x, b, activation="relu", rate=0.3, key=k))(x, keys)
    assert_close(y, y_ref, 1e-5, "vmap forward")
    expected = jax.vmap(jax.grad(loss(bias_act_dropout_reference), argnums=(0, 1)), in_axes=(0, None, 0))(x, b, keys)
    for a, e in zip(grads, expected):
        assert_close(a, e, 1e-4, "per-example grads")


def test_batch_sharded_has_no_all_gather(rng):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, b = _inputs(rng, (16, 3, 40), jnp.float32)
    key = _key(rng)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    loss = lambda f: lambda x, b: jnp.sum(jnp.sin(f(x, b, activation="gelu", rate=0.3, key=key)))
    with ops.use_backend("cpu_ffi"):
        step = jax.jit(jax.value_and_grad(loss(bias_act_dropout), argnums=(0, 1)))
        hlo = step.lower(xs, b).compile().as_text()
        value, grads = step(xs, b)
        # Without dropout the op runs on the unflattened shards.
        det = jax.jit(jax.grad(lambda x, b: jnp.sum(bias_act_dropout(x, b, activation="relu", rate=0.0, key=None)),
                               argnums=(0, 1)))
        det_hlo = det.lower(xs, b).compile().as_text()
    for text in (hlo, det_hlo):
        assert "all-gather" not in text
        assert "lsjax_bias_act_dropout" in text
        assert "all-reduce" in text  # dbias summed across shards
    assert "f32[6,40]" in hlo and "f32[2,3,40]" in det_hlo  # local shards
    v_ref, g_ref = jax.value_and_grad(loss(bias_act_dropout_reference), argnums=(0, 1))(x, b)
    assert_sum_close(value, v_ref, x.size, what="sharded loss")
    for a, e in zip(grads, g_ref):
        assert_close(a, e, 1e-4, "sharded grads")


def _check_row_stride(backend, rng, dtype, shape, block):
    """The kernels on the block ``[r0:r0 + rows, c0:c0 + cols]`` of a wider
    ``[R, H]`` tensor, with ``row_stride = H`` and the offset advanced by
    ``r0 * H + c0``, drop exactly that block of the tensor's mask (the whole
    tensor: ``row_stride == cols``, the flat index). Inputs >= 0.5 (gelu and
    its derivative far from 0), so a zero means dropped."""
    (_, hidden), (r0, c0, rows, cols) = shape, block
    key = _key(rng)
    want = ~np.asarray(_philox.dropout_mask(_philox.rng_operand(key), shape, 0.4))[r0 : r0 + rows, c0 : c0 + cols]
    x = (jnp.abs(normal(rng, (rows, cols))) + 0.5).astype(dtype)
    b = jnp.zeros((cols,))
    rng_op = _philox.rng_operand(key, r0 * hidden + c0)
    attrs = dict(rate=np.float32(0.4), row_stride=np.int64(hidden))
    gelu = np.int32(ACTIVATIONS["gelu"])
    outs = {
        "bias_act_dropout_fwd": ffi("bias_act_dropout_fwd", backend, like(x), x, b, rng_op, activation=gelu, **attrs),
        "bias_act_dropout_bwd": dbias_call("bias_act_dropout_bwd", backend, b.dtype, x, x, b, rng_op,
                                           activation=gelu, **attrs)[0],
        "dropout_fwd": ffi("dropout_fwd", backend, like(x), x, rng_op, **attrs),
        "dropout_bwd": ffi("dropout_bwd", backend, like(x), x, rng_op, **attrs),
    }
    for target, out in outs.items():
        np.testing.assert_array_equal(np.asarray(out == 0), want, err_msg=f"{backend} {target} {shape} {block}")


# (R, H), (r0, c0, rows, cols): whole tensors (row_stride == cols), blocks with
# offsets and strides that are and are not multiples of 4.
STRIDE_CASES = [((5, 37), (0, 0, 5, 37)), ((9, 37), (2, 5, 4, 20)), ((6, 64), (1, 16, 5, 16)),
                ((6, 66), (3, 2, 3, 16)), ((4, 40), (1, 30, 3, 10))]


@pytest.mark.parametrize("shape, block", STRIDE_CASES)
def test_cpu_ffi_row_stride(rng, shape, block):
    _check_row_stride("cpu_ffi", rng, jnp.float32, shape, block)


def test_cpu_ffi_rejects_short_row_stride():
    x = jnp.ones((2, 8))
    with pytest.raises(Exception, match="row_stride must be >= the last dim"):
        ffi("dropout_fwd", "cpu_ffi", like(x), x, jnp.zeros(4, jnp.uint32), rate=np.float32(0.1),
            row_stride=np.int64(7)).block_until_ready()


def test_cpu_ffi_rejects_bias_of_another_16_bit_dtype():
    x = jnp.ones((2, 8), jnp.float16)
    with pytest.raises(Exception, match=r"bias must be \[8\] of float32 or the input's dtype"):
        ffi("bias_act_dropout_fwd", "cpu_ffi", like(x), x, jnp.ones(8, jnp.bfloat16), jnp.zeros(4, jnp.uint32),
            rate=np.float32(0.1), row_stride=np.int64(8), activation=np.int32(0)).block_until_ready()


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("spec, local", [(P(None, None, "tensor"), (12, 10)), (P("data", None, "tensor"), (6, 10)),
                                         (P(None, None, ("data", "tensor")), (12, 5))])
def test_hidden_sharded(rng, act, spec, local):
    """Tensor parallel FFN: hidden (and rows) sharded, bias split alike. The
    kernels run on the local blocks (no all-gather), draw the unsharded mask
    in the forward and the backward, and dbias comes out split."""
    mesh = _mesh((2, 4), ("data", "tensor"))
    shape = (4, 3, 40)
    x = jnp.abs(normal(rng, shape)) + 0.5  # zeros mean dropped (see _masks)
    b, dy = normal(rng, (40,), scale=0.02), normal(rng, shape)
    key = _key(rng)
    xs, dys = (jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, dy))
    bs = jax.device_put(b, NamedSharding(mesh, P(spec[-1])))

    def f(fn):
        def run(x, b, dy):
            y, vjp = jax.vjp(lambda x, b: fn(x, b, activation=act, rate=0.4, key=key), x, b)
            return y, *vjp(dy)
        return run

    with ops.use_backend("cpu_ffi"):
        step = jax.jit(f(bias_act_dropout))
        hlo = step.lower(xs, bs, dys).compile().as_text()
        y, dx, db = step(xs, bs, dys)
    assert "all-gather" not in hlo
    assert "f32[{},{}]".format(*local) in hlo  # the kernels' local blocks of the [12, 40] view
    assert db.sharding.is_equivalent_to(NamedSharding(mesh, P(spec[-1])), 1)
    dropped = ~np.asarray(_philox.dropout_mask(_philox.rng_operand(key), shape, 0.4))
    np.testing.assert_array_equal(np.asarray(y == 0), dropped)
    np.testing.assert_array_equal(np.asarray(dx == 0), dropped)
    for name, a, e in zip(["y", "dx", "dbias"], (y, dx, db), f(bias_act_dropout_reference)(x, b, dy)):
        assert_close(a, e, 1e-5, f"sharded {name} {act} {spec}")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    x, b = jnp.ones((4, 8)), jnp.ones((8,))
    key = jax.random.key(0)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="rank >= 1"):
            bias_act_dropout(jnp.float32(1.0), jnp.ones(()), rate=0.1, key=key)
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            bias_act_dropout(x, jnp.ones((9,)), rate=0.1, key=key)
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            bias_act_dropout(x.astype(jnp.int8), b, rate=0.1, key=key)
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            bias_act_dropout(x, b.astype(jnp.int32), rate=0.1, key=key)
        with pytest.raises(ValueError, match="activation must be one of"):
            bias_act_dropout(x, b, activation="swish", rate=0.1, key=key)
        with pytest.raises(ValueError, match="empty"):
            bias_act_dropout(jnp.ones((0, 8)), b, rate=0.1, key=key)
        for rate in (1.0, -0.01):
            with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
                bias_act_dropout(x, b, rate=rate, key=key)


# ------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES + [(64, 4096), (2, 65536 + 8), (257, 4100), (33, 4097)])
def test_cuda_matches_reference(rng, shape, act, dtype):
    _compare("cuda", rng, shape, dtype, act)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(5, 7), (8192, 2048), (33, 4097)])
def test_cuda_bias_in_input_dtype(rng, shape, act, dtype):
    _compare("cuda", rng, shape, dtype, act, bias_dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rate,with_key", [(0.0, True), (0.5, False)])
def test_cuda_without_randomness(rng, rate, with_key):
    _compare("cuda", rng, (300, 1024), jnp.bfloat16, "gelu", rate, with_key)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 67), (64, 4096), (3, 4097), (130, 4100)])
def test_cuda_masks_bit_identical(rng, shape, dtype):
    y_ref, dx_ref, _ = _masks(bias_act_dropout_reference, rng, shape, dtype, "gelu_tanh")
    with ops.use_backend("cuda"):
        y, dx, _ = _masks(jax.jit(bias_act_dropout, static_argnames=("activation", "rate")), rng, shape, dtype,
                          "gelu_tanh")
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, block", STRIDE_CASES + [((130, 4100), (3, 4, 100, 4096)),
                                                         ((70, 4106), (5, 2, 64, 4096))])
def test_cuda_row_stride(rng, shape, block, dtype):
    """Vectorised blocks with the 8- or 4-element Philox fast path (strides and
    offsets multiples of the vector width) and the per-element fallback (not)."""
    _check_row_stride("cuda", rng, dtype, shape, block)


@pytest.mark.gpu
def test_cuda_gelus_wide_range():
    _check_gelu_wide_range("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_relu_backward_from_output(dtype):
    _check_relu_backward("cuda", dtype)


@pytest.mark.gpu
def test_cuda_dbias_deterministic(rng):
    x, b = _inputs(rng, (4096, 4096), jnp.bfloat16)
    key = _key(rng)
    with ops.use_backend("cuda"):
        g = jax.jit(jax.grad(_loss(bias_act_dropout, "gelu", 0.1, key), argnums=1))
        first = np.asarray(g(x, b))
        for _ in range(3):
            np.testing.assert_array_equal(np.asarray(g(x, b)), first)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(257, 1024), (33, 4097)])
def test_cuda_writes_every_output(rng, shape):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten."""
    x, b = _inputs(rng, shape, jnp.bfloat16)
    key = _key(rng)

    def step(poison, x):
        y, vjp = jax.vjp(lambda x, b: bias_act_dropout(x, b, activation="gelu", rate=0.2, key=key), x, b)
        dx, db = vjp(jnp.ones_like(y))
        return poison, y, dx, db

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the outputs
            poison = jnp.full(shape, jnp.nan, jnp.bfloat16)
            _, y, dx, db = jax.jit(step, donate_argnums=0)(poison, x)
            for out in (y, dx, db):
                assert bool(jnp.all(jnp.isfinite(out)))
    expected = bias_act_dropout_reference(x, b, activation="gelu", rate=0.2, key=key)
    assert_close(y, expected, 2e-2, "poisoned y")
