"""Beam top-k: reference vs CPU FFI and vs CUDA (exact indices), ties, -inf masks, odd sizes, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax.ops import available_backends, use_backend
from lsjax.ops.beam_topk import beam_topk, beam_topk_reference
from tests.helpers import DTYPES, normal

needs_cpu_ffi = pytest.mark.skipif("cpu_ffi" not in available_backends(), reason="lsjax._ffi not built")


def _inputs(rng, batch, beam, vocab, dtype=jnp.float32, ties=False):
    logits = normal(rng, (batch, beam, vocab), dtype, scale=3.0)
    if ties:  # few distinct values, beams alike: exact ties inside and across beams
        # (identical beams, so every backend's log-sum-exp rounds them alike).
        logits = jnp.asarray(np.repeat(rng.integers(-2, 3, (batch, 1, vocab)), beam, axis=1), dtype)
    scores = jnp.asarray(-np.abs(rng.standard_normal((batch, beam), dtype=np.float32)))
    if ties:
        scores = jnp.zeros((batch, beam))
    return logits, scores.at[:, -1].set(-jnp.inf) if beam > 2 else scores


def _masked_inputs(rng, batch, beam, vocab, dtype=jnp.float32):
    """~90% of logits masked to -inf; row 0 keeps one finite logit per beam (fewer
    than 2 * beam finite candidates), row 1 has only beam 0 alive, row 2 has beam 0 dead."""
    x = rng.standard_normal((batch, beam, vocab), dtype=np.float32) * 3
    x[rng.random(x.shape) < 0.9] = -np.inf
    x[0] = -np.inf
    x[0, np.arange(beam), rng.integers(0, vocab, beam)] = 1.5
    x[1:, :, -1] = np.where(np.isfinite(x[1:, :, -1]), x[1:, :, -1], 0.5)  # no all -inf beam (NaN)
    scores = -np.abs(rng.standard_normal((batch, beam), dtype=np.float32))
    scores[1, 1:] = -np.inf
    scores[2, 0] = -np.inf
    return jnp.asarray(x).astype(dtype), jnp.asarray(scores)


def _run(backend, logits, scores, k):
    with use_backend(backend):
        return jax.jit(beam_topk, static_argnums=2)(logits, scores, k)


def _check_sorted(values, indices, vocab=None):
    """Values descending, equal values by index; with ``vocab``, equal values of one beam may
    also come in logit order (different logits that round to one value)."""
    v, i = np.asarray(values), np.asarray(indices)
    same_beam = (i[:, :-1] // vocab == i[:, 1:] // vocab) if vocab else False
    assert np.all((v[:, :-1] > v[:, 1:]) | ((v[:, :-1] == v[:, 1:]) & ((i[:, :-1] < i[:, 1:]) | same_beam)))


def test_reference_matches_numpy(rng):
    logits, scores = _inputs(rng, 3, 4, 50)
    values, indices = beam_topk_reference(logits, scores, 6)
    x = np.asarray(logits, np.float64)
    lp = x - x.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True)) + np.asarray(scores)[..., None]
    flat = lp.reshape(3, -1)
    want = np.argsort(-flat, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(indices, want)
    np.testing.assert_allclose(values, np.take_along_axis(flat, want, 1), rtol=1e-5)
    _check_sorted(values, indices)


@needs_cpu_ffi
@pytest.mark.parametrize("beam,vocab", [(1, 1), (4, 1), (3, 7), (4, 32003), (5, 64)])
@pytest.mark.parametrize("ties", [False, True])
def test_cpu_ffi_matches_reference(rng, beam, vocab, ties):
    batch = 3
    logits, scores = _inputs(rng, batch, beam, vocab, ties=ties)
    for k in sorted({1, min(beam, beam * vocab), min(2 * beam, beam * vocab)}):
        want = beam_topk_reference(logits, scores, k)
        got = _run("cpu_ffi", logits, scores, k)
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"k={k}")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
        _check_sorted(*got, vocab)


@needs_cpu_ffi
@pytest.mark.parametrize("beam", [1, 3, 4])
def test_cpu_ffi_masked(rng, beam):
    logits, scores = _masked_inputs(rng, 3, beam, 500)
    for k in (beam, 2 * beam):
        got = _run("cpu_ffi", logits, scores, k)
        want = beam_topk_reference(logits, scores, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)


@needs_cpu_ffi
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_cpu_ffi_half_dtypes(rng, dtype):
    logits, scores = _inputs(rng, 2, 4, 333, dtype)
    want = beam_topk_reference(logits, scores, 8)
    got = _run("cpu_ffi", logits, scores, 8)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


@needs_cpu_ffi
def test_batch_sharded_has_no_all_gather_and_vmap(rng):
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    logits, scores = _inputs(rng, 16, 4, 97)
    ls = jax.device_put(logits, NamedSharding(mesh, P("data", None, None)))
    ss = jax.device_put(scores, NamedSharding(mesh, P("data", None)))
    want = beam_topk_reference(logits, scores, 8)
    with use_backend("cpu_ffi"):
        fn = jax.jit(lambda x, s: beam_topk(x, s, 8))
        hlo = fn.lower(ls, ss).compile().as_text()
        got = fn(ls, ss)
        mapped = jax.vmap(lambda x, s: beam_topk(x, s, 8))(logits.reshape(2, 8, 4, 97), scores.reshape(2, 8, 4))
    assert "all-gather" not in hlo and "lsjax_beam_topk_cpu" in hlo
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(mapped[1].reshape(16, 8), want[1])
    np.testing.assert_allclose(mapped[0].reshape(16, 8), want[0], rtol=1e-6, atol=1e-6)


def test_rejects_bad_input():
    logits, scores = jnp.zeros((2, 3, 5)), jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="k must be in"):
        beam_topk(logits, scores, 16)
    with pytest.raises(ValueError, match="scores must have shape"):
        beam_topk(logits, jnp.zeros((2, 4)), 2)
    with pytest.raises(ValueError, match="batch, beam, vocab"):
        beam_topk(jnp.zeros((6, 5)), scores, 2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        beam_topk(logits.astype(jnp.int32), scores, 2)


def _assert_matches_reference(got, logits, scores, k, exact=False):
    """Same answer as lax.top_k: equal values (to rounding), sorted, distinct indices; an index
    may differ only where the reference's own values at the two indices tie to rounding (the
    kernel's log-sum-exp rounds differently), unless ``exact``."""
    want = beam_topk_reference(logits, scores, k)
    gv, gi, wv, wi = (np.asarray(a) for a in (*got, *want))
    np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-5)
    _check_sorted(gv, gi, None if exact else logits.shape[-1])
    assert all(len(set(row)) == k for row in gi.tolist())
    if exact:
        np.testing.assert_array_equal(gi, wi)
        return
    diff = gi != wi
    if diff.any():
        full = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) + scores[..., None]
        ref_at_got = np.take_along_axis(np.asarray(full).reshape(gi.shape[0], -1), gi, axis=1)
        np.testing.assert_allclose(ref_at_got[diff], wv[diff], rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 128000, 256000])
@pytest.mark.parametrize("beam", [1, 3, 4, 5])
def test_cuda_matches_reference(rng, dtype, vocab, beam):
    logits, scores = _inputs(rng, 8 if vocab == 32000 else 3, beam, vocab, dtype)
    for k in sorted({beam, 2 * beam}):
        got = _run("cuda", logits, scores, k)
        _assert_matches_reference(got, logits, scores, k)
        again = _run("cuda", logits, scores, k)  # deterministic
        np.testing.assert_array_equal(again[0], got[0])
        np.testing.assert_array_equal(again[1], got[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,beam,vocab,k", [
    (3, 5, 7, 10), (2, 4, 1, 3), (2, 1, 50, 1), (64, 4, 128003, 8), (4, 16, 256000, 32),
    (5, 3, 32003, 6),  # vocab not a multiple of 8: unvectorised loads, partial last chunk
    (2, 3, 1025, 6),  # a one-token chunk
    (2, 2, 3000, 64),  # the largest k of the kernel
    (2, 4, 1000, 100),  # beyond it: the reference
])
def test_cuda_odd_shapes(rng, dtype, batch, beam, vocab, k):
    logits, scores = _inputs(rng, batch, beam, vocab, dtype)
    _assert_matches_reference(_run("cuda", logits, scores, k), logits, scores, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beam", [1, 3, 4, 5])
def test_cuda_ties(rng, dtype, beam):
    # Few distinct logits, identical beams: exact ties inside and across beams and chunks.
    logits, scores = _inputs(rng, 4, beam, 32000, dtype, ties=True)
    for k in sorted({beam, 2 * beam}):
        _assert_matches_reference(_run("cuda", logits, scores, k), logits, scores, k, exact=True)
    zeros = jnp.zeros((3, beam, 50000), dtype)
    _assert_matches_reference(_run("cuda", zeros, jnp.zeros((3, beam)), 2 * beam), zeros, jnp.zeros((3, beam)),
                              2 * beam, exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 128003])
@pytest.mark.parametrize("beam", [1, 3, 4, 5])
def test_cuda_masked(rng, dtype, vocab, beam):
    # -inf logits and dead beams, with rows of fewer than k finite candidates (-inf ties by index).
    logits, scores = _masked_inputs(rng, 4, beam, vocab, dtype)
    for k in sorted({beam, 2 * beam}):
        _assert_matches_reference(_run("cuda", logits, scores, k), logits, scores, k, exact=True)
