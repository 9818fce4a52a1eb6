"""beam_update: reference vs CPU FFI vs CUDA (bit for bit), in place, sharded rows, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax.ops import available_backends, beam_update, beam_update_reference, use_backend

EOS = 3
needs_cpu_ffi = pytest.mark.skipif("cpu_ffi" not in available_backends(), reason="lsjax._ffi not built")


def _inputs(rng, rows, k, max_len, vocab, step, table=False):
    """Sorted candidate scores with ties, -inf fillers, eos floods and dead parents mixed in; ``table``:
    ``inv_penalty`` as a table over steps (shorter than ``max_len``, so late steps take its last entry)."""
    scores = -np.sort(np.round(rng.exponential(size=(rows, 2 * k)), 1), axis=1).astype(np.float32)
    idx = rng.integers(0, k * vocab, (rows, 2 * k))
    eos = rng.random((rows, 2 * k)) < 0.3
    idx = np.where(eos, idx // vocab * vocab + EOS, idx)
    scores[0, k:] = -np.inf  # fewer candidates than 2k (tiny beam * vocab)
    if rows > 1:
        idx[1] = idx[1] // vocab * vocab + EOS  # every candidate ends
    fin = -np.sort(np.round(rng.exponential(size=(rows, k)), 1), axis=1).astype(np.float32)
    fin[-1, k // 2:] = -np.inf  # empty finished slots
    seq = lambda: jnp.asarray(rng.integers(0, vocab, (rows, k, max_len)), jnp.int32)  # noqa: E731
    inv = jnp.asarray(1 / (1.5 + 0.1 * np.arange(max(max_len - 2, 1))), jnp.float32) if table else jnp.float32(1 / 1.7)
    return (jnp.asarray(scores), jnp.asarray(idx, jnp.int32), seq(), seq(), jnp.asarray(fin),
            jnp.asarray(rng.random((rows, k)) < 0.5), jnp.int32(step), inv)


def _run(backend, args, vocab):
    with use_backend(backend):
        return jax.jit(lambda *a: beam_update(*a, vocab=vocab, eos_id=EOS))(*args)


def _assert_equal(got, want):
    for name, a, b in zip(want._fields, got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@needs_cpu_ffi
@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("k, step", [(1, 0), (3, 5), (4, 11), (5, 12), (8, 40)])
def test_cpu_ffi_equals_reference(rng, k, step, table):
    args = _inputs(rng, 6, k, 12, 11, step, table)  # step 12 (= max_len) and 40 write no token
    want = jax.jit(lambda *a: beam_update_reference(*a, vocab=11, eos_id=EOS))(*args)
    _assert_equal(_run("cpu_ffi", args, 11), want)


def test_reference_semantics(rng):
    """Alive = best candidates with eos ranked last, continuing their parents; finished = best of old + eos."""
    args = _inputs(rng, 4, 3, 6, 7, 2)
    out = beam_update_reference(*args, vocab=7, eos_id=EOS)
    scores, idx, alive, _, fin, _, step, inv = (np.asarray(x) for x in args)
    for r in range(4):
        parent, token = idx[r] // 7, idx[r] % 7
        eos = (token == EOS) & (scores[r] > -np.inf)
        keys = np.where(eos, -np.inf, scores[r])
        order = sorted(range(6), key=lambda c: (-keys[c], c))  # lax.top_k's order
        for j, c in enumerate(order[:3]):
            assert out.alive_tokens[r, j] == token[c] and out.alive_parents[r, j] == parent[c]
            want = alive[r, parent[c]].copy()
            want[step] = token[c]
            np.testing.assert_array_equal(out.alive_seqs[r, j], want)
        merged = np.concatenate([fin[r], np.where(eos, scores[r] * inv, -np.inf)])
        np.testing.assert_array_equal(out.finished_scores[r], -np.sort(-merged, kind="stable")[:3])
    # A table over steps gives the same as its entry at `step` (clamped past its end).
    table = jnp.asarray([0.9, 0.8, 1 / 1.7, 0.6], jnp.float32)
    for step, entry in ((2, 2), (7, 3)):
        at = [*args[:6], jnp.int32(step)]
        _assert_equal(beam_update_reference(*at, table, vocab=7, eos_id=EOS),
                      beam_update_reference(*at, table[entry], vocab=7, eos_id=EOS))


@needs_cpu_ffi
def test_updates_in_place_and_rows_stay_sharded(rng):
    from jax.sharding import NamedSharding, PartitionSpec as P

    args = _inputs(rng, 16, 4, 9, 13, 3)
    want = beam_update_reference(*args, vocab=13, eos_id=EOS)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) if x.ndim else x for x in args]
    with use_backend("cpu_ffi"):
        fn = jax.jit(lambda *a: beam_update(*a, vocab=13, eos_id=EOS), donate_argnums=(2, 3, 4, 5))
        compiled = fn.lower(*sharded).compile()
        hlo = compiled.as_text()
        got = compiled(*sharded)
    assert "lsjax_beam_update_cpu" in hlo and "all-gather" not in hlo
    assert "output_to_operand_aliasing" in hlo
    _assert_equal(got, want)


def test_rejects_bad_input(rng):
    args = list(_inputs(rng, 2, 3, 5, 7, 1))
    with pytest.raises(ValueError, match="cand_scores must have shape"):
        beam_update(args[0][:, :5], *args[1:], vocab=7, eos_id=EOS)
    with pytest.raises(TypeError, match="finished_flags must be bool"):
        beam_update(*args[:5], args[5].astype(jnp.int32), *args[6:], vocab=7, eos_id=EOS)
    with pytest.raises(ValueError, match="alive_seqs must be int32"):
        beam_update(args[0], args[1], args[2][:, :, 0], *args[3:], vocab=7, eos_id=EOS)
    with pytest.raises(ValueError, match="step must be a scalar"):
        beam_update(*args[:6], jnp.zeros(2, jnp.int32), args[7], vocab=7, eos_id=EOS)
    with pytest.raises(ValueError, match="non-empty"):
        beam_update(*args[:7], jnp.zeros((2, 2), jnp.float32), vocab=7, eos_id=EOS)


@pytest.mark.gpu
@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("k, max_len, step", [(1, 7, 3), (4, 64, 10), (5, 300, 299), (32, 130, 129), (4, 64, 64)])
def test_cuda_equals_reference(rng, k, max_len, step, table):
    args = _inputs(rng, 24, k, max_len, 3001, step, table)
    want = jax.jit(lambda *a: beam_update_reference(*a, vocab=3001, eos_id=EOS))(*args)
    _assert_equal(_run("cuda", args, 3001), want)
