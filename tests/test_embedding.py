"""Embedding: reference vs CPU FFI vs CUDA, gradients, dropout masks, positions, sharding, bad input."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lsjax import ops
from lsjax.ops.embedding import embedding, embedding_reference, sinusoidal_positions, token_positions
from tests.helpers import DTYPES, KERNEL_RTOL, assert_close, assert_sum_close, compiled_hlo, normal

PAD = 1
# (batch, seq, vocab, hidden): length 1, odd hidden, hidden/2 not a multiple of
# the vector width, one vector per row, several vectors per row.
SHAPES = [(1, 1, 3, 1), (3, 7, 11, 10), (2, 5, 13, 33), (4, 9, 50, 64), (2, 16, 20, 136)]


def _ids(rng, b, l, v):
    """Random ids with left- and right-padded rows (and a fully padded row when b > 2)."""
    ids = rng.integers(0, v, (b, l)).astype(np.int32)
    for r in range(b):
        n_pad = int(rng.integers(0, l))  # < l: at least one real token
        if r % 2:
            ids[r, :n_pad] = PAD
        else:
            ids[r, l - n_pad:] = PAD
    if b > 2:
        ids[2] = PAD
    return jnp.asarray(ids)


def _inputs(rng, shape, dtype):
    b, l, v, h = shape
    return _ids(rng, b, l, v), normal(rng, (v, h), dtype), normal(rng, (l + 3, h), dtype)


def _kwargs(learned, pos_table, dropout, offset=0):
    return dict(positions=pos_table if learned else "sinusoidal", padding_id=PAD, offset=offset,
                rate=0.25 if dropout else 0.0, key=jax.random.key(7) if dropout else None)


def _loss(fn, ids, learned, dropout, offset):
    def f(table, pos_table):
        y = fn(ids, table, **_kwargs(learned, pos_table, dropout, offset)).astype(jnp.float32)
        # Distinct cotangent per output element, independent of y: a nonlinear loss would turn
        # 1-ulp differences of 16-bit outputs into cotangent differences far above the bound.
        w = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) % 7 + 1
        return jnp.sum(y * w * 0.1)
    return f


def _compare(backend, rng, shape, dtype, learned, dropout, fwd_rtol, grad_rtol, offset=2):
    ids, table, pos_table = _inputs(rng, shape, dtype)
    kw = _kwargs(learned, pos_table, dropout, offset)
    expected = embedding_reference(ids, table, **kw)
    grads_ref = jax.grad(_loss(embedding_reference, ids, learned, dropout, offset), argnums=(0, 1))(table, pos_table)
    with ops.use_backend(backend):
        actual = jax.jit(lambda i, t, p: embedding(i, t, **_kwargs(learned, p, dropout, offset)))(ids, table, pos_table)
        grads = jax.jit(jax.grad(_loss(embedding, ids, learned, dropout, offset), argnums=(0, 1)))(table, pos_table)
    what = f"{backend} {shape} {jnp.dtype(dtype).name} learned={learned} dropout={dropout}"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape == shape[:2] + shape[3:]
    assert_close(actual, expected, fwd_rtol, f"forward {what}")
    if dropout:  # the same elements are dropped, bit for bit
        np.testing.assert_array_equal(np.asarray(actual == 0), np.asarray(expected == 0), f"mask {what}")
    pad = np.asarray(ids == PAD)
    assert not np.any(np.asarray(actual)[pad]), f"pad rows not zero {what}"
    for name, a, e in zip(["dtable", "dpos"], grads, grads_ref):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, grad_rtol, f"{name} {what}")
    # Padding row and unused rows get exactly zero gradient.
    used = set(np.asarray(ids).ravel().tolist()) - {PAD}
    unused = [r for r in range(shape[2]) if r not in used]
    assert not np.any(np.asarray(grads[0], np.float32)[unused])
    return actual, grads


MODES = ["sinusoidal", "learned", "sinusoidal_dropout", "learned_dropout"]
# Every mode in float32; two complementary ones per 16-bit dtype (keeps CPU time down).
CASES = [(jnp.float32, m) for m in MODES] + [(d, m) for d in (jnp.float16, jnp.bfloat16)
                                             for m in ("sinusoidal_dropout", "learned")]


@pytest.mark.parametrize("dtype,mode", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_matches_reference(rng, shape, dtype, mode):
    rtol = 1e-5 if dtype == jnp.float32 else KERNEL_RTOL[jnp.dtype(dtype)]
    _compare("cpu_ffi", rng, shape, dtype, mode.startswith("learned"), mode.endswith("dropout"), rtol,
             1e-5 if dtype == jnp.float32 else 3e-2)


def test_dropout_statistics_and_key(rng):
    ids, table, _ = _inputs(rng, (8, 32, 40, 64), jnp.float32)
    ids = jnp.where(ids == PAD, 0, ids)
    with ops.use_backend("cpu_ffi"):
        y1 = embedding(ids, table, rate=0.3, key=jax.random.key(1), padding_id=PAD)
        y1b = embedding(ids, table, rate=0.3, key=jax.random.key(1), padding_id=PAD)
        y2 = embedding(ids, table, rate=0.3, key=jax.random.key(2), padding_id=PAD)
        y0 = embedding(ids, table, rate=0.3, key=None, padding_id=PAD)  # no key: no dropout
    frac = float(jnp.mean(y1 == 0))
    assert 0.27 < frac < 0.33
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y1b))
    assert not np.array_equal(np.asarray(y1 == 0), np.asarray(y2 == 0))
    kept = np.asarray(y1 != 0)
    np.testing.assert_allclose(np.asarray(y1)[kept], np.asarray(y0)[kept] / 0.7, rtol=1e-6)


def test_backward_is_deterministic(rng):
    ids, table, pos_table = _inputs(rng, (4, 16, 5, 48), jnp.bfloat16)  # many repeats per row
    f = _loss(embedding, ids, True, True, 0)
    with ops.use_backend("cpu_ffi"):
        g = jax.jit(jax.grad(f, argnums=(0, 1)))
        a, b = g(table, pos_table), g(table, pos_table)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_positions_left_right_padding_and_offset(rng, backend):
    table = normal(rng, (20, 12))
    pos_table = normal(rng, (10, 12))
    toks = jnp.array([5, 6, 7], jnp.int32)
    right = jnp.array([[5, 6, 7, PAD, PAD]], jnp.int32)
    left = jnp.array([[PAD, PAD, 5, 6, 7]], jnp.int32)
    mid = jnp.array([[5, PAD, 6, PAD, 7]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(token_positions(mid, PAD, 3))[0, [0, 2, 4]], [3, 4, 5])
    with ops.use_backend(backend):
        for positions in ("sinusoidal", pos_table):
            kw = dict(positions=positions, padding_id=PAD)
            yr = embedding(right, table, **kw)[0, :3]
            yl = embedding(left, table, **kw)[0, 2:]
            ym = embedding(mid, table, **kw)[0, ::2]
            assert_close(yr, yl, 1e-6, "left vs right padding")
            assert_close(yr, ym, 1e-6, "pads inside")
            full = embedding(toks[None], table, offset=2, **kw)[0]
            # Incremental decoding: step t embeds one token with offset = t (+ the base offset).
            steps = jax.jit(lambda i, t: embedding(i, table, offset=t, **kw))
            for t in range(3):
                assert_close(steps(toks[None, t:t + 1], jnp.int32(t + 2))[0, 0], full[t], 1e-6, f"step {t}")


def test_sinusoid_layout_matches_fairseq():
    # fairseq SinusoidalPositionalEmbedding.get_embedding, positions from padding_idx + 1.
    dim, padding_idx, n = 10, 1, 6
    half = dim // 2
    freq = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
    arg = np.arange(n)[:, None] * freq[None]
    fairseq = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)[padding_idx + 1:]
    ours = sinusoidal_positions(jnp.arange(n - padding_idx - 1) + padding_idx + 1, dim)
    np.testing.assert_allclose(np.asarray(ours), fairseq, atol=2e-6)
    odd = sinusoidal_positions(jnp.arange(3), 7)
    assert odd.shape == (3, 7) and not np.any(np.asarray(odd[:, 6]))


@pytest.mark.parametrize("rows", [1000, 70000])  # uint16 keys (2 radix passes) / int32 keys
def test_stable_sort_by_key(rng, rows):
    from lsjax.ops.embedding import _stable_sort_by_key

    keys = rng.integers(0, rows, 4096).astype(np.int32)
    keys[rng.random(4096) < 0.1] = rows  # tokens without a gradient row sort last
    sorted_keys, order = jax.jit(_stable_sort_by_key, static_argnums=1)(jnp.asarray(keys), rows)
    expected = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(np.asarray(order), expected)
    np.testing.assert_array_equal(np.asarray(sorted_keys), keys[expected])


BACKENDS = ["cpu_ffi", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [50, 70000])  # CUB sorts 6 / 17 key bits on CUDA
def test_forward_sorts_tokens_for_the_backward(rng, backend, vocab):
    """The forward's sort outputs: the stable argsort of the tokens by row (pads last, as row vocab)."""
    from lsjax.ops.embedding import _forward_call

    ids = _ids(rng, 7, 300, vocab)
    table = normal(rng, (vocab, 8), jnp.bfloat16)
    with ops.use_backend(backend):
        _, keys, order = jax.jit(lambda i: _forward_call(table, None, i, np.zeros(1, np.int32), np.zeros(4, np.uint32),
                                                         (1.0, 0.0, PAD, backend), sort=True))(ids)
    row = np.where(np.asarray(ids) != PAD, np.asarray(ids), vocab).ravel()
    expected = np.argsort(row, kind="stable")
    np.testing.assert_array_equal(np.asarray(order).ravel(), expected)
    np.testing.assert_array_equal(np.asarray(keys).ravel(), row[expected])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_skips_keys_outside_the_rows(rng, backend):
    """Sorted keys with -1s before and ``rows`` after the valid ones (a vocab-parallel block's view):
    only the valid ones are summed, every other row is zero."""
    from lsjax.ops.embedding import _segment_sum_local

    rows, tokens, hidden = 40, 3000, 64
    used = np.concatenate([[-1, rows], rng.choice(rows, rows // 2, replace=False)])  # half the rows get no token
    keys = np.sort(rng.choice(used, tokens)).astype(np.int32)
    order = rng.permutation(tokens).astype(np.int32)
    dy = normal(rng, (tokens, hidden))
    like = jnp.zeros((rows, hidden))
    grad = jax.jit(lambda k, o, d: _segment_sum_local(2.0, 0.0, backend, k, o, d, np.zeros(4, np.uint32), like))(
        keys, order, dy)
    expected = np.zeros((rows, hidden), np.float32)
    valid = (keys >= 0) & (keys < rows)
    np.add.at(expected, keys[valid], 2.0 * np.asarray(dy)[order[valid]])
    assert (keys == -1).any() and (keys == rows).any()
    assert_close(grad, expected, 1e-5, "segment sum with excluded keys")


# (chunk, slice) plans of the CUDA backward: the default's and ones where chunks hold 1, 4 or 8 slices
# of 1 to 64 tokens (short segments reach chunk / 4 past a chunk's end).
PLANS = [(64, 16), (64, 8), (64, 64), (16, 4), (8, 1)]


@pytest.fixture(params=PLANS, ids=lambda p: f"chunk{p[0]}-slice{p[1]}")
def segment_plan(request, monkeypatch):
    module = importlib.import_module("lsjax.ops.embedding")  # the package's `embedding` is the function
    monkeypatch.setattr(module, "_SEGMENT_PLAN", request.param)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segment_plan,message", [((65, 13), "chunk must be in"), ((64, 24), "slice must divide chunk"),
                                                  ((64, 0), "slice must divide chunk")], indirect=["segment_plan"])
def test_backward_rejects_bad_plans(segment_plan, backend, message):
    from lsjax.ops.embedding import _segment_sum_local

    keys, order = jnp.arange(100, dtype=jnp.int32) % 7, jnp.arange(100, dtype=jnp.int32)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(jax.jit(lambda d: _segment_sum_local(
            1.0, 0.0, backend, keys, order, d, np.zeros(4, np.uint32), jnp.zeros((7, 8))))(jnp.ones((100, 8))))


def test_reference_gradients(rng):
    ids, table, pos_table = _inputs(rng, (2, 5, 7, 6), jnp.float32)
    f = lambda t, p: embedding_reference(ids, t, positions=p, padding_id=PAD)
    check_grads(f, (table, pos_table), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    g = lambda t: embedding_reference(ids, t, padding_id=PAD, rate=0.2, key=jax.random.key(0))
    check_grads(g, (table,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_cpu_ffi_custom_call_in_hlo(rng):
    ids, table, pos_table = _inputs(rng, (2, 4, 9, 8), jnp.float32)
    with ops.use_backend("cpu_ffi"):
        hlo = compiled_hlo(jax.grad(lambda t, p: jnp.sin(embedding(ids, t, positions=p)).sum(), argnums=(0, 1)), table, pos_table)
        fwd_hlo = compiled_hlo(lambda t, p: embedding(ids, t, positions=p), table, pos_table)
    # Under autodiff the forward also sorts the tokens for the backward; without, it does not.
    assert "lsjax_embedding_sort_fwd_cpu" in hlo and "lsjax_embedding_bwd_cpu" in hlo
    assert "lsjax_embedding_fwd_cpu" in fwd_hlo and "sort" not in fwd_hlo


def test_vmap_and_per_example_grads(rng):
    ids = jnp.stack([_ids(rng, 3, 6, 15) for _ in range(4)])
    table = normal(rng, (15, 16))
    kw = dict(padding_id=PAD, rate=0.2, key=jax.random.key(3))
    loss = lambda t, i: jnp.sum(jnp.sin(embedding(i, t, **kw)))
    loss_ref = lambda t, i: jnp.sum(jnp.sin(embedding_reference(i, t, **kw)))
    with ops.use_backend("cpu_ffi"):
        y = jax.vmap(lambda i: embedding(i, table, **kw))(ids)
        per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(table, ids)
    # Every vmapped instance sees the unbatched call's mask for the same key.
    assert_close(y, jax.vmap(lambda i: embedding_reference(i, table, **kw))(ids), 1e-5, "vmap forward")
    assert_close(per_example, jax.vmap(jax.grad(loss_ref), in_axes=(None, 0))(table, ids), 1e-5, "per-example grads")


def test_batch_sharded_has_no_all_gather(rng):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    ids, table, pos_table = _inputs(rng, (16, 6, 30, 64), jnp.float32)
    ids_s = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    kw = dict(padding_id=PAD, rate=0.1, key=jax.random.key(5))
    loss = lambda t, p, i, fn: jnp.sum(jnp.sin(fn(i, t, positions=p, **kw)))
    with ops.use_backend("cpu_ffi"):
        step = jax.jit(jax.value_and_grad(lambda t, p, i: loss(t, p, i, embedding), argnums=(0, 1)))
        hlo = step.lower(table, pos_table, ids_s).compile().as_text()
        value, grads = step(table, pos_table, ids_s)
        fwd = jax.jit(lambda i: embedding(i, table, **kw))
        fwd_hlo = fwd.lower(ids_s).compile().as_text()
        y = fwd(ids_s)
    for text in (hlo, fwd_hlo):
        assert "all-gather" not in text
        assert "lsjax_embedding" in text
    assert "f32[2,6,64]" in fwd_hlo  # the kernel ran on the local [16/8, 6] ids
    assert y.sharding.spec[0] == "data"
    assert "all-reduce" in hlo  # dtable/dpos summed over the batch shards
    assert_close(y, embedding_reference(ids, table, **kw), 1e-5, "sharded forward (same mask)")
    v_ref, g_ref = jax.value_and_grad(lambda t, p: loss(t, p, ids, embedding_reference), argnums=(0, 1))(table, pos_table)
    assert_sum_close(value, v_ref, y.size, what="sharded loss")
    for a, e in zip(grads, g_ref):
        assert_close(a, e, 1e-5, "sharded grads")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    ids = jnp.ones((2, 3), jnp.int32)
    table = jnp.ones((5, 8))
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"ids must be \[batch, seq\]"):
            embedding(jnp.ones((6,), jnp.int32), table)
        with pytest.raises(TypeError, match="integer"):
            embedding(jnp.ones((2, 3)), table)
        with pytest.raises(ValueError, match="empty"):
            embedding(jnp.ones((0, 3), jnp.int32), table)
        with pytest.raises(ValueError, match=r"table must be \[vocab, hidden\]"):
            embedding(ids, jnp.ones((5,)))
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            embedding(ids, jnp.ones((5, 8), jnp.int32))
        with pytest.raises(ValueError, match="empty"):
            embedding(ids, jnp.ones((5, 0)))
        with pytest.raises(ValueError, match="positions must be 'sinusoidal'"):
            embedding(ids, table, positions="learned")
        with pytest.raises(ValueError, match=r"shape \[max_positions, 8\]"):
            embedding(ids, table, positions=jnp.ones((4, 7)))
        with pytest.raises(ValueError, match="max_positions"):
            embedding(ids, table, positions=jnp.ones((4, 8)), offset=2)
        with pytest.raises(ValueError, match="offset must be >= 0"):
            embedding(ids, table, offset=-1)
        with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
            embedding(ids, table, rate=1.0, key=jax.random.key(0))
        with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
            embedding(jnp.array([[0, 5]], jnp.int32), table)
        with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
            embedding(jnp.array([[0, -2]], jnp.int32), table, padding_id=-1)
        embedding(jnp.array([[0, -1]], jnp.int32), table, padding_id=-1)  # pad outside the vocab is fine
        with pytest.raises(TypeError, match="padding_id must be a Python int"):
            embedding(ids, table, padding_id=1.5)


# ------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(8, 64, 32000, 512), (3, 37, 1000, 1000), (4, 128, 500, 1024)])
def test_cuda_matches_reference(rng, shape, dtype, mode):
    rtol = KERNEL_RTOL[jnp.dtype(dtype)]
    # fp32 gradients sum thousands of tokens per row: summation order differs.
    _compare("cuda", rng, shape, dtype, mode.startswith("learned"), mode.endswith("dropout"), rtol,
             1e-4 if dtype == jnp.float32 else 3e-2)


@pytest.mark.gpu
def test_cuda_backward_is_deterministic_with_hot_rows(rng):
    ids = jnp.asarray(rng.integers(0, 3, (64, 128)), jnp.int32)  # thousands of tokens per row
    table = normal(rng, (100, 1024), jnp.bfloat16)
    # A linear loss: the cotangent does not depend on (1-ulp different) outputs.
    w = normal(rng, (64, 128, 1024))
    f = lambda t: jnp.sum(embedding(ids, t, rate=0.1, key=jax.random.key(0)).astype(jnp.float32) * w)
    with ops.use_backend("cuda"):
        g = jax.jit(jax.grad(f))
        a, b = g(table), g(table)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with ops.use_backend("xla"):
        c = jax.jit(jax.grad(f))(table)
    assert_close(a, c, 2e-2, "cuda vs reference (float32 scatter-add)")


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq,vocab,hidden", [(256, 256, 5000, 64), (64, 256, 3000, 136), (16, 64, 400, 1024)])
def test_cuda_zipf_ids_across_chunks(rng, segment_plan, batch, seq, vocab, hidden):
    """Zipf-distributed ids (a few rows own long segments cut by many chunks, most rows few tokens
    or none) under every plan: float32 gradients match the reference's."""
    ids = jnp.asarray((rng.zipf(1.2, (batch, seq)) - 1) % vocab, jnp.int32)  # id 0 (the pad) is the hottest
    table = normal(rng, (vocab, hidden), jnp.float32)
    w = normal(rng, (batch, seq, hidden))
    f = lambda emb: lambda t: jnp.sum(emb(ids, t, rate=0.1, key=jax.random.key(3)) * w)
    with ops.use_backend("cuda"):
        g = jax.jit(jax.grad(f(embedding)))(table)
    expected = jax.jit(jax.grad(f(embedding_reference)))(table)
    assert_close(g, expected, 1e-4, f"zipf ids {batch}x{seq} vocab {vocab} hidden {hidden}")
    counts = np.bincount(np.asarray(ids).ravel(), minlength=vocab)
    assert counts[1:].max() > 16 and (counts == 0).any()  # segments cut by chunks and unused rows both occur


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq,longest", [(64, 1024, 150), (16, 1024, 40), (8, 1024, 20)])
def test_cuda_segments_of_every_length_cross_chunk_boundaries(rng, segment_plan, batch, seq, longest):
    """Rows own 1..longest tokens each, so segments of every length start at every offset of the
    backward's chunks and slices under every plan: those summed whole by the slice where they start
    and those left as partials both occur."""
    tokens = batch * seq
    counts = np.resize(np.arange(1, longest + 1), tokens)
    counts = counts[:np.searchsorted(np.cumsum(counts), tokens, side="right")]
    ids = np.full(tokens, PAD, np.int32)
    ids[:counts.sum()] = np.repeat(np.arange(PAD + 1, PAD + 1 + counts.size), counts)
    ids = jnp.asarray(rng.permutation(ids).reshape(batch, seq))
    vocab = PAD + counts.size + 4  # the first and the last rows have no tokens
    table = normal(rng, (vocab, 64), jnp.float32)
    w = normal(rng, (batch, seq, 64))
    f = lambda emb: lambda t: jnp.sum(emb(ids, t, padding_id=PAD, rate=0.1, key=jax.random.key(4)) * w)
    with ops.use_backend("cuda"):
        g = jax.jit(jax.grad(f(embedding)))(table)
    expected = jax.jit(jax.grad(f(embedding_reference)))(table)
    assert_close(g, expected, 1e-4, f"segments of 1..{longest} tokens, {tokens} tokens")


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq,graph", [(128, 64, True), (256, 256, False)])
def test_cuda_sort_in_command_buffers_below_a_token_count(rng, batch, seq, graph):
    """Small token counts take the command-buffer-compatible sorting forward; large ones the other."""
    ids = jnp.asarray(rng.integers(0, 100, (batch, seq)), jnp.int32)
    table = normal(rng, (100, 64), jnp.bfloat16)
    with ops.use_backend("cuda"):
        hlo = jax.jit(jax.grad(lambda t: jnp.sum(embedding(ids, t).astype(jnp.float32)))).lower(table).as_text()
    assert ("lsjax_embedding_sort_fwd_graph_cuda" in hlo) == graph
    assert "lsjax_embedding_sort_fwd_cuda" in hlo or graph


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 33, 300, 1024), (3, 7, 257, 99)])
def test_cuda_writes_every_output(rng, shape):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten."""
    ids, table, pos_table = _inputs(rng, shape, jnp.bfloat16)
    b, l, v, h = shape

    def step(poison_y, poison_g, table, pos_table):
        y, vjp = jax.vjp(lambda t, p: embedding(ids, t, positions=p, padding_id=PAD), table, pos_table)
        return poison_y, poison_g, y, vjp(jnp.ones_like(y))

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the outputs
            py = jnp.full((b, l, h), jnp.nan, jnp.bfloat16)
            pg = jnp.full((v, h), jnp.nan, jnp.bfloat16)
            _, _, y, (dt, dp) = jax.jit(step, donate_argnums=(0, 1))(py, pg, table, pos_table)
            for arr in (y, dt, dp):
                assert bool(jnp.all(jnp.isfinite(arr)))
    assert_close(y, embedding_reference(ids, table, positions=pos_table, padding_id=PAD), 2e-2, "poisoned y")
