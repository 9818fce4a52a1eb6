"""split_heads: reference vs CPU FFI vs CUDA (bit-identical outputs and dx), dbias, transforms, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lsjax import ops
from lsjax.ops._bias_dropout import ffi
from lsjax.ops.split_heads import split_heads, split_heads_reference
from tests.helpers import DTYPES, assert_close, assert_remat_scan_grad_matches_reference, compiled_hlo, normal

BIASES = [None, "float32", "x"]  # no bias, a float32 bias, a bias in x's dtype


def _inputs(rng, shape, dtype, bias_kind):
    x = normal(rng, shape, dtype)
    if bias_kind is None:
        return x, None
    return x, normal(rng, shape[2:], jnp.float32 if bias_kind == "float32" else dtype)


def _dbias_rtol(bias):
    return 1e-5 if bias.dtype == jnp.float32 else 1e-2


def _assert_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    np.testing.assert_array_equal(np.asarray(actual.astype(jnp.float32)), np.asarray(expected.astype(jnp.float32)),
                                  err_msg=what)


def _compare(backend, rng, shape, dtype, bias_kind):
    """Outputs and dx bit-identical to the reference's, dbias close, for fresh random cotangents."""
    x, bias = _inputs(rng, shape, dtype, bias_kind)
    args = (x,) if bias is None else (x, bias)
    outs_ref, vjp_ref = jax.vjp(split_heads_reference, *args)
    cots = tuple(normal(rng, o.shape, o.dtype) for o in outs_ref)
    with ops.use_backend(backend):
        outs, vjp = jax.vjp(jax.jit(split_heads), *args)
        grads = jax.jit(vjp)(cots)
    what = f"{backend} {shape} {jnp.dtype(dtype).name} bias={bias_kind}"
    assert len(outs) == shape[2]
    for j, (o, e) in enumerate(zip(outs, outs_ref)):
        _assert_equal(o, e, f"output {j} {what}")
    grads_ref = vjp_ref(cots)
    _assert_equal(grads[0], grads_ref[0], f"dx {what}")
    if bias is not None:
        assert grads[1].dtype == bias.dtype and grads[1].shape == bias.shape
        assert_close(grads[1], grads_ref[1], _dbias_rtol(bias), f"dbias {what}")


@pytest.mark.parametrize("bias_kind", BIASES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_ffi_matches_reference(rng, dtype, n, bias_kind):
    _compare("cpu_ffi", rng, (2, 5, n, 3, 16), dtype, bias_kind)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 7, 2, 5, 13), (2, 3, 3, 2, 36), (5, 2, 3, 4, 8)])
def test_cpu_ffi_shapes(rng, shape):
    _compare("cpu_ffi", rng, shape, jnp.bfloat16, "x")


def test_reference_matches_definition(rng):
    x, bias = _inputs(rng, (2, 3, 3, 4, 5), jnp.bfloat16, "float32")
    outs = split_heads_reference(x, bias)
    v = (x.astype(jnp.float32) + bias).astype(jnp.bfloat16)
    for j, o in enumerate(outs):
        _assert_equal(o, jnp.transpose(v[:, :, j], (0, 2, 1, 3)), f"output {j}")


def test_reference_gradients(rng):
    """The reference's VJP: dx is the cotangents merged back to [b, l, n, h, d], dbias their sum over b and l.

    (Exact, unlike a float32 finite-difference check, which fails on some unseeded draws.)"""
    x, bias = _inputs(rng, (2, 3, 3, 2, 5), jnp.float32, "float32")
    outs, vjp = jax.vjp(split_heads_reference, x, bias)
    cots = tuple(normal(rng, o.shape, o.dtype) for o in outs)
    dx, dbias = vjp(cots)
    merged = jnp.stack([c.transpose(0, 2, 1, 3) for c in cots], axis=2)
    np.testing.assert_array_equal(dx, merged)
    np.testing.assert_allclose(dbias, merged.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_unused_outputs_get_zero_gradient(rng):
    """A loss that reads only K: the other cotangents are symbolic zeros, dx there is 0."""
    x, bias = _inputs(rng, (2, 4, 3, 2, 8), jnp.float16, "float32")
    loss = lambda fn: lambda x, b: jnp.sum(jnp.sin(fn(x, b)[1].astype(jnp.float32)))
    with ops.use_backend("cpu_ffi"):
        dx, db = jax.jit(jax.grad(loss(split_heads), argnums=(0, 1)))(x, bias)
    dx_ref, db_ref = jax.grad(loss(split_heads_reference), argnums=(0, 1))(x, bias)
    _assert_equal(dx, dx_ref, "dx")
    assert not np.any(np.asarray(dx[:, :, 0::2], np.float32))
    assert_close(db, db_ref, 1e-5, "dbias")


def test_backward_saves_nothing(rng):
    """The vjp closure holds no array of x's size (and no bias): dx and dbias come from the cotangents alone."""
    x, bias = _inputs(rng, (2, 4, 3, 2, 8), jnp.float32, "float32")
    with ops.use_backend("cpu_ffi"):
        _, vjp = jax.vjp(split_heads, x, bias)
    held = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape") and leaf.size > 1]
    assert not held, [leaf.shape for leaf in held]


def test_cpu_ffi_custom_call_in_hlo(rng):
    x, bias = _inputs(rng, (2, 4, 3, 2, 8), jnp.float32, "x")
    with ops.use_backend("cpu_ffi"):
        hlo = compiled_hlo(jax.grad(lambda x, b: sum(jnp.sum(o**2) for o in split_heads(x, b)), argnums=(0, 1)),
                           x, bias)
    assert "lsjax_split_heads_fwd_cpu" in hlo and "lsjax_split_heads_bwd_cpu" in hlo


def test_vmap(rng):
    """A mapped x becomes one more batch dim; per-example dbias runs the op per example."""
    x, bias = _inputs(rng, (3, 2, 4, 3, 2, 8), jnp.float32, None)[0], normal(rng, (3, 2, 8))
    loss = lambda fn: lambda x, b: sum(jnp.sum(jnp.sin(o)) for o in fn(x, b))
    with ops.use_backend("cpu_ffi"):
        outs = jax.jit(jax.vmap(split_heads, in_axes=(0, None)))(x, bias)
        grads = jax.jit(jax.vmap(jax.grad(loss(split_heads), argnums=(0, 1)), in_axes=(0, None)))(x, bias)
    outs_ref = jax.vmap(split_heads_reference, in_axes=(0, None))(x, bias)
    grads_ref = jax.vmap(jax.grad(loss(split_heads_reference), argnums=(0, 1)), in_axes=(0, None))(x, bias)
    for o, e in zip(outs, outs_ref):
        _assert_equal(o, e, "vmap forward")
    _assert_equal(grads[0], grads_ref[0], "per-example dx")
    assert_close(grads[1], grads_ref[1], 1e-5, "per-example dbias")


def test_remat_and_scan(rng):
    x, bias = _inputs(rng, (2, 4, 3, 4, 8), jnp.float32, "float32")

    def body(c, _):  # the head-major outputs stacked back into x's layout
        return jnp.transpose(jnp.stack(split_heads(c, bias), axis=2), (0, 3, 2, 1, 4)) * 0.5, None

    f = lambda x: jnp.sum(jnp.sin(jax.lax.scan(jax.checkpoint(body), x, None, length=3)[0]))
    assert_remat_scan_grad_matches_reference(f, x, 1e-5)


def _mesh():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


# x spec, the local x block in the HLO, the outputs' expected spec [batch, heads, length, head_dim].
SHARDINGS = [
    (P("data", None, None, None, None), "f32[2,8,3,4,16]", P("data", None, None, None)),
    (P(None, None, None, "model", None), "f32[8,8,3,2,16]", P(None, "model", None, None)),
    (P("data", None, None, "model", None), "f32[2,8,3,2,16]", P("data", "model", None, None)),
    (P(None, "data", None, "model", None), "f32[8,2,3,2,16]", P(None, "model", "data", None)),  # sequence parallel
]


@pytest.mark.parametrize("spec, local, out_spec", SHARDINGS)
def test_sharded_stays_sharded(rng, spec, local, out_spec):
    """Batch (data parallel), length and/or heads (tensor parallel) sharded: the kernels
    run on the local blocks (no all-gather), the outputs stay sharded on their batch /
    heads / length dims, dbias is all-reduced over the batch and length shards and split
    over heads like the bias."""
    mesh = _mesh()
    x, bias = _inputs(rng, (8, 8, 3, 4, 16), jnp.float32, "float32")
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    bs = jax.device_put(bias, NamedSharding(mesh, P(None, spec[3], None)))
    cots = tuple(jax.device_put(normal(rng, (8, 4, 8, 16)), NamedSharding(mesh, out_spec)) for _ in range(3))

    def run(fn):
        def f(x, b, cots):
            outs, vjp = jax.vjp(fn, x, b)
            return outs, vjp(cots)
        return f

    loss = lambda x, b: sum(jnp.sum(jnp.sin(o)) for o in split_heads(x, b))
    with ops.use_backend("cpu_ffi"):
        step = jax.jit(run(split_heads))
        hlo = step.lower(xs, bs, cots).compile().as_text()
        outs, (dx, db) = step(xs, bs, cots)
        train_hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(xs, bs).compile().as_text()
    assert "all-gather" not in hlo and "all-gather" not in train_hlo
    assert local in train_hlo
    assert "lsjax_split_heads_fwd_cpu" in hlo and "lsjax_split_heads_bwd_cpu" in hlo
    assert local in hlo
    assert ("all-reduce" in hlo) == (spec[0] is not None or spec[1] is not None)  # dbias summed over the rows
    for o in outs:
        assert o.sharding.is_equivalent_to(NamedSharding(mesh, out_spec), 4)
    assert dx.sharding.is_equivalent_to(NamedSharding(mesh, spec), 5)
    outs_ref, (dx_ref, db_ref) = run(split_heads_reference)(x, bias, cots)
    for o, e in zip(outs, outs_ref):
        _assert_equal(o, e, f"sharded output {spec}")
    _assert_equal(dx, dx_ref, f"sharded dx {spec}")
    assert_close(db, db_ref, 1e-5, f"sharded dbias {spec}")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    x, bias = jnp.ones((2, 3, 3, 4, 8)), jnp.ones((3, 4, 8))
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"x must have rank 5 \[batch, length, n, heads, head_dim\]"):
            split_heads(jnp.ones((2, 3, 12, 8)))
        with pytest.raises(ValueError, match=r"bias must have shape \(3, 4, 8\), got \(3, 4, 7\)"):
            split_heads(x, jnp.ones((3, 4, 7)))
        with pytest.raises(TypeError, match="bias must be float32 or x's dtype float32, got float16"):
            split_heads(x, bias.astype(jnp.float16))
        with pytest.raises(TypeError, match="bias must be float32 or x's dtype bfloat16, got float16"):
            split_heads(x.astype(jnp.bfloat16), bias.astype(jnp.float16))
        with pytest.raises(ValueError, match="n .* must be 1 to 3"):
            split_heads(jnp.ones((2, 3, 4, 4, 8)))
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            split_heads(x.astype(jnp.int32))
        with pytest.raises(ValueError, match="empty"):
            split_heads(jnp.ones((0, 3, 3, 4, 8)))


def test_cpu_ffi_rejects_bad_buffers():
    """The handlers' own checks, for callers that skip the Python ones."""
    x = jnp.ones((2, 3, 3, 4, 8))
    out = jax.ShapeDtypeStruct((2, 4, 3, 8), jnp.float32)

    def fwd(*args, outs=(out,) * 3):
        return jax.block_until_ready(ffi("split_heads_fwd", "cpu_ffi", outs, *args))

    with pytest.raises(Exception, match="bias must be \\[n, heads, head_dim\\] in float32 or x's dtype"):
        fwd(x, jnp.ones((3, 4, 8), jnp.float16))
    with pytest.raises(Exception, match="bias must be"):
        fwd(x, jnp.ones((3, 4, 7)))
    with pytest.raises(Exception, match="expected n = 3 results, got 2"):
        fwd(x, outs=(out,) * 2)
    with pytest.raises(Exception, match="output 1 must be \\[\\*batch, heads, length, head_dim\\]"):
        fwd(x, outs=(out, jax.ShapeDtypeStruct((2, 3, 4, 8), jnp.float32), out))
    with pytest.raises(Exception, match="rank >= 4"):
        fwd(jnp.ones((3, 4, 8)), outs=(out,))
    with pytest.raises(Exception, match="expected n = 3 cotangents, got 1"):
        jax.block_until_ready(ffi("split_heads_bwd", "cpu_ffi", (jax.ShapeDtypeStruct(x.shape, x.dtype),),
                                  jnp.ones((2, 4, 3, 8))))


# ------------------------------------------------------------------- GPU --

GPU_SHAPES = [(2, 5, 3, 4, 64), (3, 7, 2, 5, 36), (2, 3, 1, 3, 13), (64, 1, 3, 8, 64), (3, 2, 3, 4, 16),
              (128, 64, 3, 16, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("bias_kind", BIASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_cuda_matches_reference(rng, shape, dtype, bias_kind):
    """16-byte, 8-byte (head_dim 36) and 2-byte (13) vectors; runs along length and,
    for length 1 or 2, along batch."""
    _compare("cuda", rng, shape, dtype, bias_kind)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2])
def test_cuda_n(rng, n):
    _compare("cuda", rng, (16, 33, n, 8, 64), jnp.bfloat16, "x")


@pytest.mark.gpu
def test_cuda_dbias_deterministic(rng):
    x, bias = _inputs(rng, (128, 64, 3, 16, 64), jnp.bfloat16, "float32")
    with ops.use_backend("cuda"):
        g = jax.jit(jax.grad(lambda x, b: sum(jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in split_heads(x, b)),
                             argnums=1))
        first = np.asarray(g(x, bias))
        for _ in range(3):
            np.testing.assert_array_equal(np.asarray(g(x, bias)), first)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(33, 17, 3, 8, 64), (5, 9, 3, 3, 13)])
def test_cuda_writes_every_output(rng, shape):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten."""
    x, bias = _inputs(rng, shape, jnp.bfloat16, "x")
    cots = tuple(normal(rng, (shape[0], shape[3], shape[1], shape[4]), jnp.bfloat16) for _ in range(shape[2]))

    def step(poison, x, b):
        outs, vjp = jax.vjp(split_heads, x, b)
        return poison, outs, vjp(cots)

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the outputs
            poison = jnp.full(shape, jnp.nan, jnp.bfloat16)
            _, outs, grads = jax.jit(step, donate_argnums=0)(poison, x, bias)
            for out in (*outs, *grads):
                assert bool(jnp.all(jnp.isfinite(out)))
