"""Decode attention (and the appending self-attention step): reference vs float64, CPU FFI and CUDA; masks,
unread keys, cache writes, grads, vmap, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lsjax import ops
from lsjax.ops.decode_attention import (MAX_KEYS, decode_attention, decode_attention_reference, decode_self_attention,
                                        decode_self_attention_reference, reorder_row_offsets, source_rows)
from tests.helpers import DTYPES, KERNEL_RTOL, assert_close, normal

# (batch, k_len, heads, head_dim): one key, odd sizes, head_dim not a multiple of 8, transformer-base-like.
SHAPES = [(1, 1, 1, 1), (3, 7, 2, 8), (2, 33, 3, 12), (5, 64, 8, 64), (2, 130, 4, 40)]


def _offsets(rng, batch, k_len):
    """Random valid row offsets (every key read from some row of the batch), as a beam search leaves them."""
    return jnp.asarray(rng.integers(0, batch, (batch, k_len)) - np.arange(batch)[:, None], jnp.int32)


def _inputs(rng, shape, dtype, mask_kind="random"):
    """q, k, v, mask; mask_kind "beam" = a "prefix" mask read through random row offsets (see _compare)."""
    batch, k_len, heads, head_dim = shape
    q = normal(rng, (batch, heads, head_dim), dtype)
    k = normal(rng, shape, dtype)
    v = normal(rng, shape, dtype)
    if mask_kind is None:
        return q, k, v, None
    if mask_kind in ("prefix", "beam"):  # a self-attention cache filled up to a step per row
        mask = np.arange(k_len)[None] <= rng.integers(0, k_len, (batch, 1))
    else:
        mask = rng.random((batch, k_len)) < 0.7
        mask[0] = False  # a row with nothing to attend
        if batch > 1:
            mask[1] = True
    return q, k, v, jnp.asarray(mask)


def _compare(backend, rng, shape, dtype, mask_kind, rtol):
    q, k, v, mask = _inputs(rng, shape, dtype, mask_kind)
    offsets = _offsets(rng, *shape[:2]) if mask_kind == "beam" else None
    scale = shape[-1] ** -0.5
    with ops.use_backend(backend):
        out = jax.jit(lambda *a: decode_attention(*a, scale=scale, row_offsets=offsets))(q, k, v, mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, decode_attention_reference(q, k, v, mask, scale=scale, row_offsets=offsets), rtol,
                 f"{backend} {shape} {jnp.dtype(dtype).name} mask={mask_kind}")
    if mask is not None:
        empty = ~np.asarray(mask).any(-1)
        assert np.all(np.asarray(out.astype(jnp.float32))[empty] == 0), "rows with no attended key must be zeros"


def _compare_self(backend, rng, shape, dtype, mask_kind, rtol, index=None):
    """decode_self_attention on ``backend`` vs its reference: the output within rtol, the caches exactly.
    "prefix": keys up to the written index attended; "beam": that, read through random row offsets
    (nonzero at the written key too: the kernel must read its own row there); "causal" / "causal_beam":
    the same keys left out by ``causal=True`` with no mask (the reference then takes the explicit mask,
    so the two forms are checked against each other too)."""
    batch, k_len, heads, head_dim = shape
    qkv = normal(rng, (batch, 3, heads, head_dim), dtype)
    k, v = normal(rng, shape, dtype), normal(rng, shape, dtype)
    index = int(rng.integers(0, k_len)) if index is None else index
    mask = jnp.asarray(np.broadcast_to(np.arange(k_len) <= min(max(index, 0), k_len - 1), (batch, k_len)))
    offsets = _offsets(rng, batch, k_len) if mask_kind.endswith("beam") else None
    causal = mask_kind.startswith("causal")
    fn = lambda *a: decode_self_attention(*a, scale=head_dim ** -0.5, row_offsets=offsets,  # noqa: E731
                                          causal=causal)
    with ops.use_backend(backend):
        out, k_out, v_out = jax.jit(fn)(qkv, k, v, jnp.int32(index), None if causal else mask)
    ref_out, ref_k, ref_v = decode_self_attention_reference(qkv, k, v, jnp.int32(index), mask,
                                                            scale=head_dim ** -0.5, row_offsets=offsets)
    what = f"{backend} {shape} {jnp.dtype(dtype).name} mask={mask_kind} index={index}"
    assert out.dtype == qkv.dtype and out.shape == (batch, heads, head_dim)
    assert_close(out, ref_out, rtol, what)
    np.testing.assert_array_equal(np.asarray(k_out), np.asarray(ref_k), what)
    np.testing.assert_array_equal(np.asarray(v_out), np.asarray(ref_v), what)


def test_reference_matches_float64(rng):
    q, k, v, mask = _inputs(rng, (4, 9, 3, 5), jnp.float32)
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    m = np.asarray(mask)
    s = np.einsum("bhd,bkhd->bhk", q64, k64) * 0.7
    s = np.where(m[:, None], s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))
    expected = np.einsum("bhk,bkhd->bhd", p, v64)
    assert_close(decode_attention_reference(q, k, v, mask, scale=0.7), expected, 1e-6, "reference")


@pytest.mark.parametrize("mask_kind", ["random", "prefix", "beam", None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_matches_reference(rng, shape, dtype, mask_kind):
    # float32 on both sides; 16-bit outputs differ by at most one rounding.
    _compare("cpu_ffi", rng, shape, dtype, mask_kind, 1e-5 if dtype == jnp.float32 else KERNEL_RTOL[jnp.dtype(dtype)])


@pytest.mark.parametrize("mask_kind", ["prefix", "beam", "causal", "causal_beam"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_self_attention_cpu_ffi_matches_reference(rng, shape, dtype, mask_kind):
    _compare_self("cpu_ffi", rng, shape, dtype, mask_kind, 1e-5 if dtype == jnp.float32 else KERNEL_RTOL[jnp.dtype(dtype)])


@pytest.mark.parametrize("index", [-2, 0, 6, 9])
def test_self_attention_writes_the_step_and_clamps_the_index(rng, index):
    """The reference is dynamic_update_slice (which clamps) + decode_attention; the CPU FFI agrees."""
    qkv, k, v = normal(rng, (3, 3, 2, 4)), normal(rng, (3, 7, 2, 4)), normal(rng, (3, 7, 2, 4))
    at = min(max(index, 0), 6)
    out, k_out, v_out = decode_self_attention_reference(qkv, k, v, jnp.int32(index), scale=0.5)
    np.testing.assert_array_equal(k_out, k.at[:, at].set(qkv[:, 1]))
    np.testing.assert_array_equal(v_out, v.at[:, at].set(qkv[:, 2]))
    assert_close(out, decode_attention_reference(qkv[:, 0], k_out, v_out, scale=0.5), 1e-6, "reference")
    _compare_self("cpu_ffi", rng, (3, 7, 2, 4), jnp.float32, "beam", 1e-5, index=index)
    _compare_self("cpu_ffi", rng, (3, 7, 2, 4), jnp.float32, "causal_beam", 1e-5, index=index)
    _compare_self("xla", rng, (3, 7, 2, 4), jnp.float32, "causal_beam", 1e-6, index=index)


def test_self_attention_updates_the_caches_in_place(rng):
    """The caches are aliased to the results: with donated caches the compiled call copies nothing."""
    qkv, k = normal(rng, (4, 3, 2, 8)), normal(rng, (4, 16, 2, 8))
    with ops.use_backend("cpu_ffi"):
        fn = jax.jit(lambda qkv, k, v, i: decode_self_attention(qkv, k, v, i, scale=0.5), donate_argnums=(1, 2))
        hlo = fn.lower(qkv, k, k, jnp.int32(3)).compile().as_text()
    assert "lsjax_decode_self_attention" in hlo and "output_to_operand_aliasing" in hlo
    assert " copy(" not in hlo and "copy-start" not in hlo


def test_self_attention_gradients_match_reference(rng):
    qkv, k, v = normal(rng, (3, 3, 2, 4)), normal(rng, (3, 6, 2, 4)), normal(rng, (3, 6, 2, 4))
    mask, offsets = jnp.asarray(np.arange(6) <= 3)[None].repeat(3, 0), _offsets(rng, 3, 6)
    w = [normal(rng, s) for s in ((3, 2, 4), k.shape, v.shape)]

    def loss(fn):
        def f(qkv, k, v):
            outs = fn(qkv, k, v, jnp.int32(3), mask, scale=0.5, row_offsets=offsets)
            return sum(jnp.sum(jnp.sin(o * wi)) for o, wi in zip(outs, w))
        return f

    expected = jax.grad(loss(decode_self_attention_reference), argnums=(0, 1, 2))(qkv, k, v)
    with ops.use_backend("cpu_ffi"):
        grads = jax.jit(jax.grad(loss(decode_self_attention), argnums=(0, 1, 2)))(qkv, k, v)
    for g, e, name in zip(grads, expected, ("qkv", "k_cache", "v_cache")):
        assert_close(g, e, 1e-5, f"d{name}")


def test_self_attention_batch_sharded_has_no_all_gather(rng):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    qkv, k, v = normal(rng, (16, 3, 2, 8)), normal(rng, (16, 12, 2, 8)), normal(rng, (16, 12, 2, 8))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    args = [shard(a) for a in (qkv, k, v)]
    with ops.use_backend("cpu_ffi"):
        fn = jax.jit(lambda qkv, k, v: decode_self_attention(qkv, k, v, jnp.int32(5), scale=0.5))
        hlo = fn.lower(*args).compile().as_text()
        out, k_out, _ = fn(*args)
    assert "all-gather" not in hlo and "lsjax_decode_self_attention" in hlo
    assert tuple(out.sharding.spec)[:1] == ("data",) and tuple(k_out.sharding.spec)[:1] == ("data",)
    ref_out, ref_k, _ = decode_self_attention_reference(qkv, k, v, jnp.int32(5), scale=0.5)
    assert_close(out, ref_out, 1e-5, "sharded")
    np.testing.assert_array_equal(np.asarray(k_out), np.asarray(ref_k))


def test_row_offsets_replace_a_beam_searchs_cache_gathers(rng):
    """Reordering the offsets table (reorder_row_offsets, entries not yet written kept 0) and writing
    each step's key in place reads exactly the keys of a cache that is gathered by parent rows every
    step, as a beam search does."""
    rows, k_len = 6, 5
    gathered = jnp.zeros((rows, k_len, 1, 2))
    in_place, offsets = gathered, jnp.zeros((rows, k_len), jnp.int32)
    for t in range(k_len):
        key = normal(rng, (rows, 1, 1, 2), jnp.float32)
        gathered = gathered.at[:, t:t + 1].set(key)
        in_place = in_place.at[:, t:t + 1].set(key)
        assert not np.any(np.asarray(offsets)[:, t:]), "entries not yet written must stay 0"
        np.testing.assert_array_equal(source_rows(in_place, offsets)[:, :t + 1], gathered[:, :t + 1])
        parents = jnp.asarray(rng.integers(0, rows, rows), jnp.int32)
        gathered = gathered[parents]
        offsets = reorder_row_offsets(offsets, parents, jnp.int32(t + 1))


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_masked_keys_are_not_read(rng, backend):
    """Unfilled cache slots may hold anything (NaN here): masked keys must not touch the result."""
    q, k, v, mask = _inputs(rng, (3, 16, 2, 8), jnp.float32, "prefix")
    expected = decode_attention_reference(q, k, v, mask, scale=0.5)
    poison = ~np.asarray(mask)[:, :, None, None]
    k_bad, v_bad = (jnp.where(poison, jnp.nan, a) for a in (k, v))
    with ops.use_backend(backend):
        out = jax.jit(lambda *a: decode_attention(*a, scale=0.5))(q, k_bad, v_bad, mask)
    if backend == "xla":  # the reference multiplies NaN values by p = 0: it needs clean inputs
        assert not np.all(np.isfinite(np.asarray(out)))
    else:
        assert_close(out, expected, 1e-5, "poisoned unfilled slots")


def test_equals_training_attention_path(rng):
    """The decode layer path (lsjax.nn.attention.dot_product_attention, q_len 1) gives the same result."""
    from lsjax.nn.attention import dot_product_attention

    q, k, v, mask = _inputs(rng, (3, 10, 2, 8), jnp.float32, "prefix")
    expected = dot_product_attention(q[:, None], k, v, key_mask=mask, causal=False)[:, 0]
    for backend in ("xla", "cpu_ffi"):
        with ops.use_backend(backend):
            assert_close(decode_attention(q, k, v, mask, scale=8 ** -0.5), expected, 1e-5, backend)


@pytest.mark.parametrize("indirect", [False, True])
def test_gradients_match_reference(rng, indirect):
    q, k, v, mask = _inputs(rng, (3, 6, 2, 4), jnp.float32)
    offsets = _offsets(rng, 3, 6) if indirect else None
    w = normal(rng, q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask, scale=0.5, row_offsets=offsets) * w))

    expected = jax.grad(loss(decode_attention_reference), argnums=(0, 1, 2))(q, k, v)
    with ops.use_backend("cpu_ffi"):
        grads = jax.jit(jax.grad(loss(decode_attention), argnums=(0, 1, 2)))(q, k, v)
    for g, e, name in zip(grads, expected, "qkv"):
        assert_close(g, e, 1e-5, f"d{name}")


def test_vmap(rng):
    q, k, v, mask = _inputs(rng, (2, 5, 2, 4), jnp.float32)
    stack = lambda a: jnp.stack([a, a[::-1]])  # noqa: E731
    with ops.use_backend("cpu_ffi"):
        out = jax.vmap(lambda *a: decode_attention(*a, scale=0.5))(stack(q), stack(k), stack(v), stack(mask))
    expected = jnp.stack([decode_attention_reference(q, k, v, mask, scale=0.5),
                          decode_attention_reference(q[::-1], k[::-1], v[::-1], mask[::-1], scale=0.5)])
    assert_close(out, expected, 1e-5, "vmap")


def test_batch_sharded_has_no_all_gather(rng):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, mask = _inputs(rng, (16, 12, 2, 8), jnp.float32)
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    args = [shard(a) for a in (q, k, v, mask)]
    with ops.use_backend("cpu_ffi"):
        fn = jax.jit(lambda *a: decode_attention(*a, scale=0.5))
        hlo = fn.lower(*args).compile().as_text()
        out = fn(*args)
    assert "all-gather" not in hlo and "lsjax_decode_attention" in hlo
    assert "f32[2,2,8]" in hlo  # the local [batch / 8, heads, head_dim] block
    assert tuple(out.sharding.spec)[:1] == ("data",)
    assert_close(out, decode_attention_reference(q, k, v, mask, scale=0.5), 1e-5, "sharded")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    q, k = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 3, 4))
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"q must be a non-empty \[batch, heads, head_dim\]"):
            decode_attention(jnp.ones((2, 1, 3, 4)), k, k)
        with pytest.raises(ValueError, match=r"k must be \[batch=2, k_len >= 1, heads=3, head_dim=4\]"):
            decode_attention(q, jnp.ones((2, 5, 4, 3)), k)
        with pytest.raises(ValueError, match="k must be"):
            decode_attention(q, jnp.ones((2, 0, 3, 4)), jnp.ones((2, 0, 3, 4)))
        with pytest.raises(ValueError, match=r"v must have shape \(2, 5, 3, 4\)"):
            decode_attention(q, k, jnp.ones((2, 6, 3, 4)))
        with pytest.raises(TypeError, match="k must have dtype float32"):
            decode_attention(q, k.astype(jnp.bfloat16), k)
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            decode_attention(q.astype(jnp.int32), k.astype(jnp.int32), k.astype(jnp.int32))
        with pytest.raises(ValueError, match=r"key_mask must have shape \(2, 5\)"):
            decode_attention(q, k, k, jnp.ones((2, 4), bool))
        with pytest.raises(ValueError, match="scale must be finite"):
            decode_attention(q, k, k, scale=float("inf"))
        with pytest.raises(TypeError, match="key_mask must be bool"):
            decode_attention(q, k, k, jnp.ones((2, 5), jnp.int32))
        with pytest.raises(TypeError, match="row_offsets must be int32"):
            decode_attention(q, k, k, row_offsets=jnp.zeros((2, 5), jnp.int16))
        with pytest.raises(ValueError, match=r"row_offsets must have shape \(2, 5\)"):
            decode_attention(q, k, k, row_offsets=jnp.zeros((2, 4), jnp.int32))
        with pytest.raises(TypeError, match="scale must be a Python float"):
            jax.jit(lambda q, s: decode_attention(q, k, k, scale=s))(q, 0.5)
        qkv = jnp.ones((2, 3, 3, 4))
        with pytest.raises(ValueError, match=r"qkv must be \[batch, 3, heads, head_dim\]"):
            decode_self_attention(jnp.ones((2, 2, 3, 4)), k, k, 0)
        with pytest.raises(ValueError, match=r"decode_self_attention: k must be \[batch=2"):
            decode_self_attention(qkv, jnp.ones((2, 5, 4, 3)), k, 0)
        with pytest.raises(TypeError, match="index must be an integer scalar"):
            decode_self_attention(qkv, k, k, jnp.zeros(2, jnp.int32))
        with pytest.raises(TypeError, match="index must be an integer scalar"):
            decode_self_attention(qkv, k, k, 1.0)


# ------------------------------------------------------------------- GPU --

# Head sizes of 4, 8, 16 and 32 16-byte vectors take the kernel whose lanes share a key (16, 32:
# four lanes in float32 / half types), the others the one-key-per-thread kernel.
GPU_SHAPES = SHAPES + [(32, 65, 8, 64), (32, 256, 16, 64), (4, 1000, 2, 128), (2, MAX_KEYS, 2, 64), (3, 17, 2, 512),
                       (2, 9, 3, 16), (3, 50, 4, 32), (2, 300, 2, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("mask_kind", ["random", "prefix", "beam", None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_cuda_matches_reference(rng, shape, dtype, mask_kind):
    _compare("cuda", rng, shape, dtype, mask_kind, 1e-5 if dtype == jnp.float32 else KERNEL_RTOL[jnp.dtype(dtype)])


@pytest.mark.gpu
@pytest.mark.parametrize("mask_kind", ["prefix", "beam", "causal", "causal_beam"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_self_attention_cuda_matches_reference(rng, shape, dtype, mask_kind):
    _compare_self("cuda", rng, shape, dtype, mask_kind, 1e-5 if dtype == jnp.float32 else KERNEL_RTOL[jnp.dtype(dtype)])


@pytest.mark.gpu
def test_cuda_masked_keys_are_not_read_and_limits(rng):
    q, k, v, mask = _inputs(rng, (8, 64, 8, 64), jnp.bfloat16, "prefix")
    poison = ~np.asarray(mask)[:, :, None, None]
    with ops.use_backend("cuda"):
        out = jax.jit(lambda *a: decode_attention(*a, scale=0.125))(
            q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), mask)
        long = jnp.ones((1, MAX_KEYS + 1, 1, 8), jnp.float32)
        with pytest.raises(ValueError, match=f"k_len <= {MAX_KEYS}"):
            decode_attention(jnp.ones((1, 1, 8)), long, long)
    assert_close(out, decode_attention_reference(q, k, v, mask, scale=0.125), 1e-2, "poisoned unfilled slots")


@pytest.mark.gpu
def test_cuda_writes_every_output(rng):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten."""
    q, k, v, mask = _inputs(rng, (32, 64, 8, 64), jnp.bfloat16)

    def step(poison, q):
        return poison, decode_attention(q, k, v, mask, scale=0.125)

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the output
            _, out = jax.jit(step, donate_argnums=0)(jnp.full(q.shape, jnp.nan, q.dtype), q)
            assert bool(jnp.all(jnp.isfinite(out)))
    assert_close(out, decode_attention_reference(q, k, v, mask, scale=0.125), 1e-2, "poisoned output")


@pytest.mark.parametrize("backend", ["cpu_ffi", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("shape", [(64, 12, 8, 64), (6, 9, 3, 8)])  # the lanes kernel; the one-key-per-thread one
def test_self_attention_step_after_step(rng, shape, layers, backend):
    """Decode steps as a model runs them: one jitted step per token, each taking the caches the last
    call returned (new buffers every call), over ``layers`` layers of a lax.scan with elementwise work
    around the op (each layer's query adds the last one's output). Outputs and caches follow the reference.
    (On the GPU, XLA handed the op a cache result other than its aliased operand here: the handler copies.)"""
    batch, k_len, heads, head_dim = shape
    dtype, scale = jnp.float16, head_dim ** -0.5
    qkvs = normal(rng, (k_len, layers, batch, 3, heads, head_dim), dtype)

    def step(qkv, k, v, t):  # qkv [layers, batch, 3, heads, head_dim], caches [layers, batch, k_len, ...]
        mask = jnp.broadcast_to(jnp.arange(k_len) <= t, (batch, k_len))

        def layer(carry, xs):
            qkv, k, v = xs
            out, k, v = decode_self_attention(qkv.at[:, 0].add(carry), k, v, t, mask, scale=scale)
            return jnp.tanh(out), (k, v)

        out, (k, v) = jax.lax.scan(layer, jnp.zeros((batch, heads, head_dim), dtype), (qkv, k, v))
        return out, k, v

    results = {}
    for name in ("xla", backend):
        k = v = jnp.zeros((layers, batch, k_len, heads, head_dim), dtype)
        with ops.use_backend(name):
            fn = jax.jit(step)
            results[name] = []
            for t in range(k_len):
                out, k, v = fn(qkvs[t], k, v, jnp.int32(t))
                results[name].append((out, k, v))
    for t, ((want, want_k, want_v), (got, got_k, got_v)) in enumerate(zip(results["xla"], results[backend])):
        np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k), f"k cache after step {t}")
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v), f"v cache after step {t}")
        assert_close(got, want, KERNEL_RTOL[jnp.dtype(dtype)], f"output of step {t}")
