"""Cross-entropy: reference vs CPU FFI vs CUDA, gradients, transforms, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lsjax import ops
from lsjax.ops.cross_entropy import cross_entropy, cross_entropy_reference
from tests.helpers import (DTYPES, KERNEL_RTOL, assert_close,
                           assert_remat_scan_grad_matches_reference, compiled_hlo, normal)

# Vocab sizes: 1, odd, not a multiple of 8 (unaligned rows), multiples of 8, > 32k.
SHAPES = [(3, 1), (5, 7), (2, 3, 100), (4, 1001), (6, 512), (2, 4097), (3, 32003)]


def _inputs(rng, shape, dtype, ignore_id=-1, ignore_frac=0.25):
    vocab = shape[-1]
    logits = normal(rng, shape, dtype, scale=3.0)
    labels = rng.integers(0, vocab, shape[:-1])
    labels = np.where(rng.random(shape[:-1]) < ignore_frac, ignore_id, labels)
    labels.flat[0] = (ignore_id + 1) % vocab if ignore_id in range(vocab) else 0  # one valid row at least
    # Distinct cotangent per token, O(1) so that dlogits are O(1) too.
    weights = jnp.asarray(rng.uniform(0.5, 1.5, shape[:-1]).astype(np.float32))
    return logits, jnp.asarray(labels, jnp.int32), weights


def _grad_rtol(dtype, vocab: int) -> float:
    """float32: the softmax sum over the vocab is reduced in a different order on
    each side, so its relative error (and every dlogit's) grows like sqrt(vocab)."""
    if dtype != jnp.float32:
        return KERNEL_RTOL[jnp.dtype(dtype)]
    return max(2e-5, 4 * float(np.finfo(np.float32).eps) * float(np.sqrt(vocab)))


def _loss(fn, labels, weights, **kw):
    return lambda x: jnp.sum(fn(x, labels, **kw)[0] * weights)


def _compare(backend, rng, shape, dtype, eps, loss_rtol, grad_rtol, ignore_id=-1):
    x, y, w = _inputs(rng, shape, dtype, ignore_id)
    kw = {"label_smoothing": eps, "ignore_id": ignore_id}
    loss_ref, count_ref = cross_entropy_reference(x, y, **kw)
    grad_ref = jax.grad(_loss(cross_entropy_reference, y, w, **kw))(x)
    with ops.use_backend(backend):
        loss, count = jax.jit(lambda x, y: cross_entropy(x, y, **kw))(x, y)
        grad = jax.jit(jax.grad(_loss(cross_entropy, y, w, **kw)))(x)
    what = f"{backend} {shape} {jnp.dtype(dtype).name} eps={eps}"
    assert loss.dtype == jnp.float32 and loss.shape == shape[:-1]
    assert count.dtype == jnp.int32 and count.shape == () and int(count) == int(count_ref)
    assert int(count) == int(np.sum(np.asarray(y) != ignore_id))
    assert_close(loss, loss_ref, loss_rtol, f"{what} loss")
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(grad, grad_ref, grad_rtol, f"{what} dlogits")
    ignored = np.asarray(y) == ignore_id
    assert np.all(np.asarray(loss)[ignored] == 0), f"{what}: ignored tokens must have loss 0"
    assert np.all(np.asarray(grad.astype(jnp.float32))[ignored] == 0), f"{what}: ignored rows need zero dlogits"


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_ffi_matches_reference(rng, shape, dtype, eps):
    # Same float32 math on both sides from the same stored logits: the loss
    # differs by summation order only; dlogits also by one 16-bit rounding.
    _compare("cpu_ffi", rng, shape, dtype, eps, 2e-5, _grad_rtol(dtype, shape[-1]))


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_ignore_id_inside_vocab(rng, backend):
    """fairseq-style padding id 1: those tokens are ignored, not scored."""
    _compare(backend, rng, (4, 9, 50), jnp.bfloat16, 0.1, 2e-5, 2e-2, ignore_id=1)


def test_label_smoothing_definition(rng):
    """loss = -sum(q * log_softmax) with q = (1 - eps) onehot + eps / V, in float64."""
    x, y, _ = _inputs(rng, (6, 33), jnp.float32, ignore_frac=0.0)
    eps = 0.2
    x64 = np.asarray(x, np.float64)
    logp = x64 - np.log(np.sum(np.exp(x64 - x64.max(-1, keepdims=True)), -1, keepdims=True)) - x64.max(-1, keepdims=True)
    q = (1 - eps) * np.eye(33)[np.asarray(y)] + eps / 33
    expected = -np.sum(q * logp, -1)
    for backend in ("xla", "cpu_ffi"):
        with ops.use_backend(backend):
            loss, count = cross_entropy(x, y, label_smoothing=eps)
        assert_close(loss, expected, 1e-5, f"{backend} smoothed loss")
        assert int(count) == 6


def test_reference_gradients(rng):
    x, y, w = _inputs(rng, (3, 4, 9), jnp.float32)
    check_grads(_loss(cross_entropy_reference, y, w, label_smoothing=0.1), (x,), order=1, modes=["rev"], eps=1e-2,
                atol=1e-2, rtol=1e-2)


def test_cpu_ffi_custom_call_in_hlo_and_no_f32_logprobs(rng):
    x, y, w = _inputs(rng, (16, 40), jnp.bfloat16)
    with ops.use_backend("cpu_ffi"):
        hlo = compiled_hlo(jax.grad(_loss(cross_entropy, y, w, label_smoothing=0.1)), x)
    assert "lsjax_cross_entropy_fwd_cpu" in hlo and "lsjax_cross_entropy_bwd_cpu" in hlo
    # Never an fp32 [tokens, vocab] tensor: only the bf16 logits and dlogits.
    assert "f32[16,40]" not in hlo


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_out_of_range_label_inside_jit_gives_nan(rng, backend):
    x, y, w = _inputs(rng, (5, 11), jnp.float32, ignore_frac=0.0)
    y = y.at[2].set(11).at[4].set(-3)  # too large; negative and not ignore_id
    kw = {"label_smoothing": 0.1}
    with ops.use_backend(backend):
        loss, count = jax.jit(lambda x, y: cross_entropy(x, y, **kw))(x, y)
        # Labels passed as jit arguments: traced, so only the kernels can see them.
        grad = jax.jit(jax.grad(lambda x, y: _loss(cross_entropy, y, w, **kw)(x)))(x, y)
    loss, grad = np.asarray(loss), np.asarray(grad)
    bad = np.array([False, False, True, False, True])
    assert np.all(np.isnan(loss[bad])) and np.all(np.isfinite(loss[~bad]))
    assert np.all(np.isnan(grad[bad])) and np.all(np.isfinite(grad[~bad]))
    assert int(count) == 5  # out-of-range labels are not ignored: they count
    good_ref = cross_entropy_reference(x[~bad], y[~bad], **kw)[0]
    assert_close(loss[~bad], good_ref, 2e-5, f"{backend} good rows beside bad ones")


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_out_of_range_label_concrete_raises(backend):
    x = jnp.ones((2, 3, 10))
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"outside \[0, 10\).*first at index \(1, 2\): 10"):
            cross_entropy(x, jnp.array([[0, 1, 2], [3, -1, 10]]))
        with pytest.raises(ValueError, match="ignore_id=-100"):
            cross_entropy(x, jnp.array([[0, 1, 2], [3, -1, 4]]), ignore_id=-100)
        loss, count = cross_entropy(x, jnp.array([[0, 1, 2], [3, -100, 4]]), ignore_id=-100)
        assert int(count) == 5 and float(loss[1, 1]) == 0.0


def test_vmap_and_per_example_grads(rng):
    x, y, w = _inputs(rng, (4, 6, 33), jnp.float32)
    loss = lambda x, y: jnp.sum(jnp.sin(cross_entropy(x, y, label_smoothing=0.1)[0]))
    loss_ref = lambda x, y: jnp.sum(jnp.sin(cross_entropy_reference(x, y, label_smoothing=0.1)[0]))
    with ops.use_backend("cpu_ffi"):
        out, count = jax.vmap(lambda x, y: cross_entropy(x, y), in_axes=(1, 1), out_axes=(1, 0))(x, y)
        per_example = jax.jit(jax.vmap(jax.grad(loss)))(x, y)
        # Rank-1 logits per example. (Nested vmap of any rowwise op hits
        # "Batching rule for 'custom_partitioning' not implemented": _rowwise limit.)
        rank1 = jax.vmap(lambda x, y: cross_entropy(x, y)[0])(x.reshape(-1, 33), y.reshape(-1)).reshape(4, 6)
    assert_close(out, cross_entropy_reference(x, y)[0], 2e-5, "vmap forward")
    assert np.array_equal(count, np.sum(np.asarray(y) != -1, axis=0))
    assert_close(per_example, jax.vmap(jax.grad(loss_ref))(x, y), 2e-5, "per-example grads")
    assert_close(rank1, cross_entropy_reference(x, y)[0], 2e-5, "rank-1 logits under vmap")


def test_rank1_logits(rng):
    x = normal(rng, (37,), jnp.bfloat16)
    with ops.use_backend("cpu_ffi"):
        loss, count = cross_entropy(x, jnp.int32(5), label_smoothing=0.1)
        g = jax.grad(lambda x: cross_entropy(x, jnp.int32(5))[0])(x)
    assert loss.shape == () and int(count) == 1
    assert_close(loss, cross_entropy_reference(x, jnp.int32(5), label_smoothing=0.1)[0], 2e-5, "rank-1")
    assert_close(g, jax.grad(lambda x: cross_entropy_reference(x, jnp.int32(5))[0])(x), 2e-2, "rank-1 grad")


def test_batch_sharded_has_no_all_gather(rng):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = jax.make_mesh((4, 2), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, y, w = _inputs(rng, (8, 6, 64), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("data", "seq")))

    def mean_loss(fn):
        def f(x, y):
            loss, count = fn(x, y, label_smoothing=0.1)
            return jnp.sum(loss * w) / jnp.maximum(count, 1)
        return f

    with ops.use_backend("cpu_ffi"):
        step = jax.jit(jax.value_and_grad(mean_loss(cross_entropy)))
        hlo = step.lower(xs, ys).compile().as_text()
        value, grad = step(xs, ys)
        fwd = jax.jit(lambda x, y: cross_entropy(x, y))
        fwd_hlo = fwd.lower(xs, ys).compile().as_text()
        loss, count = fwd(xs, ys)
    for text in (hlo, fwd_hlo):
        assert "all-gather" not in text
        assert "lsjax_cross_entropy_fwd_cpu" in text
    assert "lsjax_cross_entropy_bwd_cpu" in hlo
    # The kernels ran on local shards: [8/4, 6/2, 64].
    assert "f32[2,3,64]" in hlo
    assert loss.sharding.spec[:2] == ("data", "seq")
    assert grad.sharding.spec[:2] == ("data", "seq")
    v_ref, g_ref = jax.value_and_grad(mean_loss(cross_entropy_reference))(x, y)
    assert int(count) == int(cross_entropy_reference(x, y)[1])
    assert_close(loss, cross_entropy_reference(x, y)[0], 2e-5, "sharded loss")
    assert_close(value, v_ref, 2e-5, "sharded mean loss")
    assert_close(grad, g_ref, 2e-5, "sharded grads")


def test_remat_and_scan(rng):
    x, y, w = _inputs(rng, (5, 16), jnp.float32)
    body = lambda c, _: (c * 1.1, cross_entropy(c, y, label_smoothing=0.1)[0])
    f = lambda x: jnp.sum(jax.lax.scan(jax.checkpoint(body), x, None, length=3)[1])
    assert_remat_scan_grad_matches_reference(f, x, 2e-5)


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_bad_input(backend):
    x = jnp.ones((4, 8))
    y = jnp.zeros((4,), jnp.int32)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="rank >= 1"):
            cross_entropy(jnp.float32(1.0), jnp.int32(0))
        with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
            cross_entropy(x, jnp.zeros((4, 1), jnp.int32))
        with pytest.raises(TypeError, match="labels must be an integer array"):
            cross_entropy(x, jnp.zeros((4,)))
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            cross_entropy(jnp.ones((4, 8), jnp.int32), y)
        with pytest.raises(ValueError, match="label_smoothing"):
            cross_entropy(x, y, label_smoothing=1.5)
        with pytest.raises(ValueError, match="label_smoothing"):
            cross_entropy(x, y, label_smoothing=-0.1)
        with pytest.raises(ValueError, match="ignore_id"):
            cross_entropy(x, y, ignore_id=2**40)
        with pytest.raises(ValueError, match="empty"):
            cross_entropy(jnp.ones((0, 8)), jnp.zeros((0,), jnp.int32))
        with pytest.raises(ValueError, match="empty"):
            cross_entropy(jnp.ones((4, 0)), y)


# ------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(64, 32000), (7, 128000 + 3), (4, 256000), (300, 50257)])
def test_cuda_matches_reference(rng, shape, dtype, eps):
    # exp2-based exponentials and another summation order: loss within 2e-5 relative.
    _compare("cuda", rng, shape, dtype, eps, 2e-5, _grad_rtol(dtype, shape[-1]))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(257, 1024), (33, 4097), (9, 32003)])
def test_cuda_writes_every_output(rng, shape):
    """Outputs poisoned with NaN (donated buffers) must be fully overwritten, ignored rows included."""
    x, y, w = _inputs(rng, shape, jnp.bfloat16, ignore_frac=0.5)

    def step(poison, poison_rows, x, y):
        loss, grad = jax.value_and_grad(lambda x: jnp.sum(cross_entropy(x, y, label_smoothing=0.1)[0] * w))(x)
        per_token = cross_entropy(x, y, label_smoothing=0.1)[0]
        return poison, poison_rows, per_token, grad

    with ops.use_backend("cuda"):
        for _ in range(3):  # reuse freed NaN-filled buffers for the outputs
            poison = jnp.full(shape, jnp.nan, jnp.bfloat16)
            poison_rows = jnp.full(shape[:-1], jnp.nan, jnp.float32)
            _, _, loss, grad = jax.jit(step, donate_argnums=(0, 1))(poison, poison_rows, x, y)
            assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(grad)))
    ignored = np.asarray(y) == -1
    assert np.all(np.asarray(loss)[ignored] == 0)
    assert np.all(np.asarray(grad.astype(jnp.float32))[ignored] == 0)
    assert_close(loss, cross_entropy_reference(x, y, label_smoothing=0.1)[0], 2e-5, "poisoned loss")


@pytest.mark.gpu
def test_cuda_out_of_range_label_gives_nan(rng):
    x, y, w = _inputs(rng, (5, 1001), jnp.bfloat16, ignore_frac=0.0)
    y = y.at[2].set(1001).at[4].set(-3)
    with ops.use_backend("cuda"):
        loss, _ = jax.jit(lambda x, y: cross_entropy(x, y, label_smoothing=0.1))(x, y)
        grad = jax.jit(jax.grad(lambda x, y: _loss(cross_entropy, y, w, label_smoothing=0.1)(x)))(x, y)
    bad = np.array([False, False, True, False, True])
    loss, grad = np.asarray(loss), np.asarray(grad.astype(jnp.float32))
    assert np.all(np.isnan(loss[bad])) and np.all(np.isfinite(loss[~bad]))
    assert np.all(np.isnan(grad[bad])) and np.all(np.isfinite(grad[~bad]))


@pytest.mark.gpu
def test_cuda_no_f32_logprobs(rng):
    x, y, w = _inputs(rng, (512, 32000), jnp.bfloat16)
    with ops.use_backend("cuda"):
        hlo = compiled_hlo(jax.grad(_loss(cross_entropy, y, w, label_smoothing=0.1)), x)
    assert "lsjax_cross_entropy_fwd_cuda" in hlo and "lsjax_cross_entropy_bwd_cuda" in hlo
    assert "f32[512,32000]" not in hlo
