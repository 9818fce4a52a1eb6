"""Decode dense (layer norm -> matmul -> bias -> activation -> residual): reference vs float64, CPU FFI and
CUDA; gradients, vmap, sharding, bad input, the handler's own checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lsjax import ops
from lsjax.ops import backend as _backend
from lsjax.ops.decode_dense import MAX_ROWS, decode_dense, decode_dense_reference
from lsjax.ops.layer_norm import layer_norm_reference
from tests.helpers import DTYPES, KERNEL_RTOL, assert_close, normal

# (rows, K, N): one row, odd rows / K / N (not multiples of 8 or 16), K over one CUDA chunk, N over a block.
SHAPES = [(1, 24, 8), (3, 40, 24), (8, 64, 40), (33, 520, 600), (5, 17, 13)]
# (layer norm, activation, residual)
CONFIGS = [(False, "none", False), (True, "relu", False), (False, "gelu", True), (True, "gelu_tanh", True),
           (True, "none", True)]


def _inputs(rng, shape, dtype, ln, residual):
    rows, k, n = shape
    x = normal(rng, (rows, k), dtype)
    kernel = normal(rng, (k, n), dtype, scale=k ** -0.5)
    bias = normal(rng, (n,))
    kw = {}
    if ln:
        kw["ln_scale"] = 1.0 + normal(rng, (k,), scale=0.2)
        kw["ln_bias"] = normal(rng, (k,), scale=0.2)
    if residual:
        kw["residual"] = normal(rng, (rows, n), dtype)
    return x, kernel, bias, kw


def _compare(backend, rng, shape, dtype, config, rtol):
    ln, act, res = config
    x, kernel, bias, kw = _inputs(rng, shape, dtype, ln, res)
    with ops.use_backend(backend):
        out = jax.jit(lambda *a: decode_dense(*a, activation=act, eps=1e-5, **kw))(x, kernel, bias)
    assert out.dtype == x.dtype and out.shape == (shape[0], shape[2])
    expected = decode_dense_reference(x, kernel, bias, activation=act, eps=1e-5, **kw)
    assert_close(out, expected, rtol, f"{backend} {shape} {jnp.dtype(dtype).name} ln={ln} {act} residual={res}")
    return out, expected


def test_reference_matches_float64(rng):
    x, kernel, bias, kw = _inputs(rng, (4, 12, 7), jnp.float32, True, True)
    x64, w64 = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    mu = x64.mean(-1, keepdims=True)
    a = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    a = a * np.asarray(kw["ln_scale"]) + np.asarray(kw["ln_bias"])
    expected = np.maximum(a @ w64 + np.asarray(bias), 0) + np.asarray(kw["residual"])
    assert_close(decode_dense_reference(x, kernel, bias, activation="relu", **kw), expected, 1e-5, "reference")
    ln = layer_norm_reference(x, kw["ln_scale"], kw["ln_bias"])
    assert_close(decode_dense_reference(x, kernel, bias, **kw), jnp.dot(ln, kernel) + bias + kw["residual"], 1e-5,
                 "reference = layer_norm_reference then dense")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"ln{int(c[0])}-{c[1]}-res{int(c[2])}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_matches_reference(rng, shape, dtype, config):
    # float32 math on both sides; 16-bit outputs (and layer-norm outputs) differ by at most a rounding.
    _compare("cpu_ffi", rng, shape, dtype, config, KERNEL_RTOL[jnp.dtype(dtype)])


@pytest.mark.parametrize("config", [(True, "gelu", True), (False, "relu", False)])
def test_gradients_match_reference(rng, config):
    ln, act, res = config
    x, kernel, bias, kw = _inputs(rng, (5, 12, 9), jnp.float32, ln, res)
    w = normal(rng, (5, 9))
    names = sorted(kw)

    def loss(fn):
        def f(x, kernel, bias, *opt):
            return jnp.sum(jnp.sin(fn(x, kernel, bias, activation=act, **dict(zip(names, opt))) * w))
        return f

    argnums = tuple(range(3 + len(names)))
    args = (x, kernel, bias, *(kw[k] for k in names))
    expected = jax.grad(loss(decode_dense_reference), argnums=argnums)(*args)
    with ops.use_backend("cpu_ffi"):
        grads = jax.jit(jax.grad(loss(decode_dense), argnums=argnums))(*args)
    for g, e, name in zip(grads, expected, ["x", "kernel", "bias", *names]):
        assert_close(g, e, 1e-5, f"d{name}")


def test_vmap(rng):
    x, kernel, bias, kw = _inputs(rng, (3, 16, 8), jnp.float32, True, True)
    stack = lambda a: jnp.stack([a, a[::-1]])  # noqa: E731
    fn = lambda x, r: decode_dense(x, kernel, bias, ln_scale=kw["ln_scale"], ln_bias=kw["ln_bias"],  # noqa: E731
                                   residual=r, activation="relu")
    with ops.use_backend("cpu_ffi"):
        out = jax.vmap(fn)(stack(x), stack(kw["residual"]))
    with ops.use_backend("xla"):
        expected = jax.vmap(fn)(stack(x), stack(kw["residual"]))
    assert_close(out, expected, 1e-5, "vmap")


def test_rows_sharded_has_no_all_gather(rng):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, kernel, bias, kw = _inputs(rng, (16, 32, 24), jnp.float32, True, True)
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    xs, rs = shard(x), shard(kw["residual"])
    fn = jax.jit(lambda x, r: decode_dense(x, kernel, bias, ln_scale=kw["ln_scale"], ln_bias=kw["ln_bias"],
                                           residual=r, activation="gelu"))
    with ops.use_backend("cpu_ffi"):
        hlo = fn.lower(xs, rs).compile().as_text()
        out = fn(xs, rs)
    assert "all-gather" not in hlo and "lsjax_decode_dense" in hlo
    assert "f32[2,32]" in hlo  # the local [rows / 8, K] block of x
    assert tuple(out.sharding.spec)[:1] == ("data",)
    assert_close(out, decode_dense_reference(x, kernel, bias, activation="gelu", **kw), 1e-5, "sharded")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    x, w, b, s = jnp.ones((4, 8)), jnp.ones((8, 6)), jnp.ones((6,)), jnp.ones((8,))
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"x must be a non-empty \[rows, in_features\]"):
            decode_dense(jnp.ones((2, 4, 8)), w, b)
        with pytest.raises(ValueError, match=r"x must be a non-empty"):
            decode_dense(jnp.ones((0, 8)), w, b)
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            decode_dense(x.astype(jnp.int32), w.astype(jnp.int32), b)
        with pytest.raises(ValueError, match=r"kernel must be \[in_features=8, out_features >= 1\]"):
            decode_dense(x, jnp.ones((7, 6)), b)
        with pytest.raises(ValueError, match="kernel must be"):
            decode_dense(x, jnp.ones((8,)), b)
        with pytest.raises(TypeError, match="kernel must have dtype float32"):
            decode_dense(x, w.astype(jnp.bfloat16), b)
        with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
            decode_dense(x, w, jnp.ones((8,)))
        with pytest.raises(ValueError, match="give both ln_scale and ln_bias"):
            decode_dense(x, w, b, ln_scale=s)
        with pytest.raises(ValueError, match="give both ln_scale and ln_bias"):
            decode_dense(x, w, b, ln_bias=s)
        with pytest.raises(ValueError, match=r"ln_scale must have shape \(8,\)"):
            decode_dense(x, w, b, ln_scale=jnp.ones((6,)), ln_bias=jnp.ones((6,)))
        with pytest.raises(ValueError, match="activation must be one of"):
            decode_dense(x, w, b, activation="swish")
        with pytest.raises(ValueError, match="eps must be >= 0"):
            decode_dense(x, w, b, ln_scale=s, ln_bias=s, eps=-1.0)
        with pytest.raises(ValueError, match=r"residual must have shape \(4, 6\)"):
            decode_dense(x, w, b, residual=jnp.ones((4, 8)))
        with pytest.raises(TypeError, match="residual must have dtype float32"):
            decode_dense(x, w, b, residual=jnp.ones((4, 6), jnp.float16))


def _raw_call(platform, x, kernel, bias, ln, residual, activation=0):
    """The FFI target called directly, past the Python checks."""
    target = _backend.ffi_target("decode_dense", "cuda" if platform == "cuda" else "cpu_ffi")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), x.dtype))
    return call(x, kernel, bias, ln, ln, residual, eps=np.float32(1e-5), activation=np.int32(activation))


def test_handler_rejects_bad_operands():
    x, w, b = jnp.ones((4, 8)), jnp.ones((8, 6)), jnp.ones((6,))
    none, res = jnp.zeros((0,)), jnp.zeros((4, 0))
    cases = [
        ((x, jnp.ones((7, 6)), b, none, res), {}, "x must be \\[rows, K\\] and kernel \\[K, N\\]"),
        ((x, w, jnp.ones((5,)), none, res), {}, "bias must be \\[N\\]"),
        ((x, w, b, jnp.ones((5,)), res), {}, "ln_scale and ln_bias both \\[K\\]"),
        ((x, w, b, none, jnp.ones((4, 5))), {}, "residual \\[rows, N\\] or empty"),
        ((x, w.astype(jnp.float16), b, none, res), {}, "must have x's dtype"),
        ((x, w, b, none, res), {"activation": 7}, "unknown activation code 7"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(Exception, match=msg):
            jax.block_until_ready(jax.jit(lambda *a, kw=kw: _raw_call("cpu", *a, **kw))(*args))


# ------------------------------------------------------------------- GPU --

GPU_DTYPES = [jnp.float16, jnp.bfloat16]
# The benchmark's (K, N, layer norm, activation, residual), at 1, 8, 32 and 64 rows.
BENCH = [(512, 1536, True, "none", False), (512, 512, True, "none", False), (512, 2048, True, "relu", False),
         (2048, 512, False, "none", True)]
# Two roundings of the output dtype at the largest output: the kernel's products are the reference's,
# only summed in another order (and its layer norm may round an element of x the other way).
GPU_RTOL = {jnp.dtype(jnp.float16): 2 * 2.0 ** -10, jnp.dtype(jnp.bfloat16): 2 * 2.0 ** -7}


def _rtol(dtype):
    return GPU_RTOL[jnp.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 32, 64])
@pytest.mark.parametrize("bench", BENCH, ids=lambda b: f"{b[0]}x{b[1]}")
def test_cuda_matches_reference_benchmark_shapes(rng, bench, rows, dtype):
    k, n, ln, act, res = bench
    _compare("cuda", rng, (rows, k, n), dtype, (ln, act, res), _rtol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"ln{int(c[0])}-{c[1]}-res{int(c[2])}")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(64, 1032, 24), (17, 4100, 40), (2, 8, 1030), (48, 64, 1024), (40, 2048, 64)])
def test_cuda_matches_reference(rng, shape, dtype, config):
    _compare("cuda", rng, shape, dtype, config, _rtol(dtype))


@pytest.mark.gpu
def test_cuda_routes_float32_and_many_rows_to_the_reference(rng):
    """The wrapper runs the reference there; the handler itself refuses them with a clear error."""
    for shape, dtype in (((4, 16, 8), jnp.float32), ((MAX_ROWS + 1, 16, 8), jnp.bfloat16)):
        x, kernel, bias, _ = _inputs(rng, shape, dtype, False, False)
        with ops.use_backend("cuda"):
            hlo = jax.jit(lambda *a: decode_dense(*a)).lower(x, kernel, bias).as_text()
        assert "lsjax_decode_dense" not in hlo
    none = jnp.zeros((0,))
    x, kernel, bias, _ = _inputs(rng, (4, 16, 8), jnp.float32, False, False)
    with pytest.raises(Exception, match="float32 runs the reference"):
        jax.block_until_ready(_raw_call("cuda", x, kernel, bias, none, jnp.zeros((4, 0))))
    x, kernel, bias, _ = _inputs(rng, (MAX_ROWS + 1, 16, 8), jnp.float16, False, False)
    with pytest.raises(Exception, match=f"at most {MAX_ROWS} rows"):
        jax.block_until_ready(_raw_call("cuda", x, kernel, bias, none, jnp.zeros((MAX_ROWS + 1, 0), jnp.float16)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 512, 1536), (13, 40, 600)])
def test_cuda_writes_every_output_and_is_deterministic(rng, shape):
    """Outputs poisoned with NaN (donated buffers) are fully overwritten, with the same bits every run."""
    x, kernel, bias, kw = _inputs(rng, shape, jnp.bfloat16, True, True)

    def step(poison, x):
        return poison, decode_dense(x, kernel, bias, activation="gelu", **kw)

    outs = []
    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the output
            _, out = jax.jit(step, donate_argnums=0)(jnp.full((shape[0], shape[2]), jnp.nan, x.dtype), x)
            outs.append(np.asarray(out.astype(jnp.float32)))
    assert np.all(np.isfinite(outs[0]))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    assert_close(outs[0], decode_dense_reference(x, kernel, bias, activation="gelu", **kw), _rtol(x.dtype), "poisoned")
