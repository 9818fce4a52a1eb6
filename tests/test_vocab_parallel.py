"""Tensor-parallel ops on 8 fake CPU devices: vocab-sharded cross-entropy never gathers the logits,
the vocab-sharded embedding never gathers its table.

(Head-sharded attention softmax: tests/test_attention_softmax.py::test_sharded_has_no_all_gather.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lsjax import ops
from tests.helpers import KERNEL_RTOL, assert_close, normal

MESH_SHAPE = (2, 4)  # (data, tensor)


def _mesh():
    cpus = jax.devices("cpu")  # conftest's 8 fake devices (the cpu_ffi backend runs there)
    return jax.make_mesh(MESH_SHAPE, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2, devices=cpus)


def _loss_and_grad(ce, logits, labels, weights, **kw):
    def total(x):
        loss, count = ce(x, labels, **kw)
        return jnp.sum(loss * weights), count

    (value, count), grad = jax.value_and_grad(total, has_aux=True)(logits)
    return value, count, grad


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
@pytest.mark.parametrize("spec", [P(None, None, "tensor"), P("data", None, "tensor")])
def test_vocab_sharded_cross_entropy(rng, backend, spec):
    batch, length, vocab = 4, 5, 44  # vocab / 4 = 11 per shard
    logits = normal(rng, (batch, length, vocab), scale=3.0)
    labels = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32).at[0, :2].set(0)
    weights = normal(rng, (batch, length))
    kw = dict(label_smoothing=0.1, ignore_id=0)
    want = jax.jit(lambda x: _loss_and_grad(ops.cross_entropy_reference, x, labels, weights, **kw))(logits)

    mesh = _mesh()
    xs = jax.device_put(logits, NamedSharding(mesh, spec))
    ys = jax.device_put(labels, NamedSharding(mesh, P(spec[0])))
    step = jax.jit(lambda x, y: _loss_and_grad(ops.cross_entropy, x, y, weights, **kw))
    with ops.use_backend(backend):
        hlo = step.lower(xs, ys).compile().as_text()
        value, count, grad = step(xs, ys)

    assert_close(value, want[0], 1e-5, "loss")
    assert int(count) == int(want[1])
    assert_close(grad, want[2], 1e-5, "dlogits")
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert grad.sharding.is_equivalent_to(xs.sharding, 3)
    block = f"f32[{batch // (2 if spec[0] else 1)},{length},{vocab // 4}]"
    assert block in hlo  # the logits stay one vocab block per device
    if backend == "cpu_ffi":  # the vocab-parallel path, not a gathered kernel call
        assert "lsjax_cross_entropy" not in hlo


def test_vocab_sharded_bad_label_is_nan(rng):
    vocab = 16
    logits = normal(rng, (8, vocab))
    labels = jnp.asarray(rng.integers(0, vocab, (8,)), jnp.int32).at[3].set(vocab + 2)
    xs = jax.device_put(logits, NamedSharding(_mesh(), P(None, "tensor")))
    with ops.use_backend("cpu_ffi"):
        # labels as a jit argument: traced, so they cannot be checked up front
        loss, grad = jax.jit(jax.value_and_grad(lambda x, y: ops.cross_entropy(x, y)[0][3]))(xs, labels)
        losses = jax.jit(lambda x, y: ops.cross_entropy(x, y)[0])(xs, labels)
    assert np.isnan(loss) and np.isnan(grad[3]).all()
    want = ops.cross_entropy_reference(logits, jnp.clip(labels, 0, vocab - 1))[0]
    assert_close(jnp.delete(losses, 3), jnp.delete(want, 3), 1e-5, "other rows")


def test_unsharded_vocab_still_uses_the_kernel(rng):
    logits = normal(rng, (8, 4, 12))
    labels = jnp.asarray(rng.integers(0, 12, (8, 4)), jnp.int32)
    xs = jax.device_put(logits, NamedSharding(_mesh(), P("data", "tensor", None)))
    with ops.use_backend("cpu_ffi"):
        hlo = jax.jit(lambda x: ops.cross_entropy(x, labels)[0]).lower(xs).compile().as_text()
    assert "lsjax_cross_entropy" in hlo and "all-gather" not in hlo


def _embedding_loss(embed, ids, learned, key):
    """``(sum(sin(y * w)), y)`` of ``embed(ids, table, ...)`` with dropout on; a function of the tables."""
    def f(table, pos_table):
        y = embed(ids, table, positions=pos_table if learned else "sinusoidal", padding_id=1, rate=0.25, key=key,
                  offset=2)
        w = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) % 7 + 1  # distinct cotangents
        return jnp.sum(jnp.sin(y.astype(jnp.float32) * w * 0.1)), y
    return f


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vocab_sharded_embedding(rng, backend, learned, dtype):
    batch, length, vocab, hidden = 4, 7, 44, 24  # vocab / 4 = 11 table rows per shard
    ids = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32).at[0, 5:].set(1).at[1, :3].set(1)
    table, pos_table = normal(rng, (vocab, hidden), dtype), normal(rng, (length + 2, hidden), dtype)
    key = jax.random.key(int(rng.integers(1 << 20)))
    grad = lambda embed: jax.value_and_grad(_embedding_loss(embed, ids, learned, key), (0, 1), has_aux=True)
    (_, want), want_grads = jax.jit(grad(ops.embedding_reference))(table, pos_table)
    with ops.use_backend("cpu_ffi"):
        unsharded = jax.jit(lambda t, p: grad(ops.embedding)(t, p)[0][1])(table, pos_table)

    mesh = _mesh()
    ts = jax.device_put(table, NamedSharding(mesh, P("tensor", None)))
    step = jax.jit(lambda t, p, i: jax.value_and_grad(_embedding_loss(ops.embedding, i, learned, key), (0, 1),
                                                      has_aux=True)(t, p))
    ids_s = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    with ops.use_backend(backend):
        hlo = step.lower(ts, pos_table, ids_s).compile().as_text()
        (_, y), grads = step(ts, pos_table, ids_s)

    rtol = KERNEL_RTOL[jnp.dtype(dtype)]
    assert_close(y, want, rtol, "forward")
    np.testing.assert_array_equal(np.asarray(y == 0), np.asarray(want == 0), "dropout mask and pad rows")
    for name, a, e in zip(["dtable", "dpos"], grads, want_grads):
        assert a.dtype == e.dtype
        assert_close(a, e, rtol, name)
    if backend == "cpu_ffi":  # the vocab-parallel path
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(unsharded, np.float32), "vs unsharded")
        assert "all-gather" not in hlo and "lsjax_embedding" in hlo
        name = jnp.dtype(dtype).name.replace("float", "f")  # f32, bf16
        assert f"{name}[{vocab},{hidden}]" not in hlo  # no device ever holds the whole table
        assert grads[0].sharding.is_equivalent_to(ts.sharding, 2)  # the table gradient stays vocab-split
        assert y.sharding.spec[0] == "data"
