"""Beam search vs the flax-wmt-style reference, scores vs re-scoring, early stop, diversity."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flax_beam_search
from lsjax.decode import beam_search, gnmt_length_penalty
from lsjax.decode.loop import while_loop_in_blocks
from lsjax.ops import available_backends, use_backend
from benchmarks.toy_decoder import toy_decoder

EOS = 3
ALPHA = 0.6


def _run(fn, dec, **kw):
    f, cache, enc = dec
    return jax.jit(lambda c, e: fn(f, c, e, eos_id=EOS, **kw))(cache, enc)


def rescore(dec, seqs, alpha=ALPHA, eos=EOS):
    """Sum of the decoder's log-probs of ``seqs`` [batch, beam, L] up to and
    including eos, divided by the length penalty: re-runs the decoder step by step."""
    f, cache, enc = dec
    batch, beam, max_len = seqs.shape
    rep = lambda x: jnp.repeat(x, beam, axis=0) if x.ndim else x  # noqa: E731
    cache, enc = jax.tree.map(rep, cache), jax.tree.map(rep, enc)
    tokens = np.asarray(seqs).reshape(batch * beam, max_len)
    inputs = np.concatenate([np.full((len(tokens), 1), 2), tokens[:, :-1]], axis=1)
    total, length = np.zeros(len(tokens)), np.zeros(len(tokens), int)
    done = np.zeros(len(tokens), bool)
    for t in range(max_len):
        logits, cache = f(jnp.asarray(inputs[:, t:t + 1], jnp.int32), cache, enc)
        lp = np.asarray(jax.nn.log_softmax(logits))[np.arange(len(tokens)), tokens[:, t]]
        total += np.where(done, 0.0, lp)
        length += ~done
        done |= tokens[:, t] == eos
    return (total / np.asarray(gnmt_length_penalty(length, alpha))).reshape(batch, beam)


@pytest.mark.parametrize("beam,eos_bias", [(1, 2.0), (3, 0.0), (4, 2.0), (5, 3.0)])
def test_equals_reference_and_rescoring(rng, beam, eos_bias):
    max_len = 9
    dec = toy_decoder(rng, batch=3, vocab=13, max_len=max_len, eos_bias=eos_bias)
    ours = _run(beam_search, dec, beam_size=beam, max_len=max_len)
    seqs, scores, steps = _run(flax_beam_search.beam_search, dec, beam_size=beam, max_len=max_len)
    np.testing.assert_array_equal(ours.sequences, seqs)
    np.testing.assert_allclose(ours.scores, scores, rtol=1e-6)
    assert int(ours.num_steps) == int(steps)
    assert np.all(np.diff(np.asarray(ours.scores), axis=1) <= 0), "scores not sorted descending"
    np.testing.assert_allclose(ours.scores, rescore(dec, ours.sequences), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps_per_check", [1, 3, 8])
def test_early_stop(rng, steps_per_check):
    max_len = 16  # blocks of 8 end at max_len: steps after the stop are kept, not selected away
    # eos_bias far above the toy decoder's other logits: at 30, 2 of 60 seeds never stopped; at 100, 0 of 300.
    dec = toy_decoder(rng, batch=2, vocab=11, max_len=max_len, eos_bias=100.0)
    out = _run(beam_search, dec, beam_size=4, max_len=max_len, steps_per_check=steps_per_check)
    steps = int(out.num_steps)
    assert steps < max_len, "a strongly eos-biased decoder must stop before max_len"
    # Stopped because every row's worst finished beat the best alive bound: all returned beams are finished.
    assert np.all(np.any(np.asarray(out.sequences) == EOS, axis=-1))
    ref_seqs, _, ref_steps = _run(flax_beam_search.beam_search, dec, beam_size=4, max_len=max_len)
    assert steps == int(ref_steps)
    np.testing.assert_array_equal(out.sequences, ref_seqs)


@pytest.mark.parametrize("block", [1, 2, 4, 7])
def test_while_loop_in_blocks_equals_while_loop(block):
    def cond(s):
        return s[0] < 5

    def body(s, calls):
        return (s[0] + 1, s[1] * 2.0 + s[0]), calls + 1

    init = ((jnp.int32(0), jnp.ones(3)), jnp.int32(0))
    want = jax.lax.while_loop(lambda c: cond(c[0]), lambda c: body(*c), init)
    (state, calls) = jax.jit(lambda i: while_loop_in_blocks(cond, body, i, block=block))(init)
    jax.tree.map(np.testing.assert_array_equal, state, want[0])
    assert int(calls) == -(-5 // block) * block  # whole blocks: the steps after the stop ran, discarded


def test_beam_search_checks_its_stop_once_per_block(rng):
    # The inner loop of steps_per_check steps has a static trip count (XLA:GPU runs such a
    # loop without copying its condition to the host); only the outer loop checks the stop.
    dec = toy_decoder(rng, batch=2, vocab=11, max_len=16)
    f, cache, enc = dec
    run = jax.jit(lambda c, e: beam_search(f, c, e, beam_size=4, max_len=16, eos_id=EOS, steps_per_check=8))
    hlo = run.lower(cache, enc).compile().as_text()
    whiles = [line for line in hlo.splitlines() if " while(" in line]
    assert len(whiles) == 2, whiles
    assert sum('"known_trip_count":{"n":"8"}' in line for line in whiles) == 1, whiles
    with pytest.raises(ValueError, match="block must be >= 1"):
        beam_search(f, cache, enc, beam_size=4, max_len=16, eos_id=EOS, steps_per_check=0)


def test_blocks_ending_at_max_len_skip_the_state_select(rng):
    """With steps_per_check dividing max_len, no per-step select keeps the stopped state."""
    dec = toy_decoder(rng, batch=2, vocab=11, max_len=16)
    f, cache, enc = dec

    def selects(max_len):  # jnp.where lowers to selects or calls of a shared @_where function
        run = jax.jit(lambda c, e: beam_search(f, c, e, beam_size=4, max_len=max_len, eos_id=EOS, steps_per_check=8))
        text = run.lower(cache, enc).as_text()
        return text.count("stablehlo.select") + text.count("call @_where")

    assert selects(12) - selects(16) >= 8  # a select per state leaf (12 % 8 != 0 keeps them)


def test_no_eos_runs_to_max_len(rng):
    dec = toy_decoder(rng, batch=2, vocab=7, max_len=5)
    f, cache, enc = dec
    out = jax.jit(lambda c, e: beam_search(f, c, e, beam_size=3, max_len=5, eos_id=-1))(cache, enc)
    assert out.sequences.shape == (2, 3, 5) and int(out.num_steps) == 5
    assert np.all(np.asarray(out.sequences) > 0)  # no padding: every step emitted a token
    np.testing.assert_allclose(out.scores, rescore(dec, out.sequences, eos=-1), rtol=1e-5, atol=1e-5)


def test_diverse_groups(rng):
    max_len = 6
    dec = toy_decoder(rng, batch=2, vocab=9, max_len=max_len)
    plain = _run(beam_search, dec, beam_size=4, max_len=max_len)
    one_group = _run(beam_search, dec, beam_size=4, max_len=max_len, diversity_groups=1, diversity_penalty=0.0)
    np.testing.assert_array_equal(plain.sequences, one_group.sequences)
    np.testing.assert_array_equal(plain.scores, one_group.scores)

    # Without a penalty, two groups search the same space and return duplicates.
    same = _run(beam_search, dec, beam_size=4, max_len=max_len, diversity_groups=2, diversity_penalty=0.0)
    s = np.asarray(same.sequences)
    assert all(len({tuple(x) for x in row}) == 2 for row in s)
    # A large penalty makes the second group avoid the first group's first token.
    div = _run(beam_search, dec, beam_size=4, max_len=max_len, diversity_groups=2, diversity_penalty=1e3)
    d = np.asarray(div.sequences)
    assert all(len({tuple(x) for x in row}) == 4 for row in d)
    assert all(len({x[0] for x in row}) >= 2 for row in d)
    # Reported scores stay the true log-probabilities.
    np.testing.assert_allclose(div.scores, rescore(dec, div.sequences), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cpu_ffi" not in available_backends(), reason="lsjax._ffi not built")
def test_ffi_topk_backend_matches_xla():
    # Fixed seed: the backends' log-sum-exp may differ in the last ulp, which can
    # flip a near-tie between candidates on some random draws.
    max_len = 7
    dec = toy_decoder(np.random.default_rng(0), batch=3, vocab=17, max_len=max_len, eos_bias=1.0)
    run = functools.partial(_run, beam_search, dec, beam_size=4, max_len=max_len)
    with use_backend("xla"):
        ref = run()
    with use_backend("cpu_ffi"):
        ours = run()
    np.testing.assert_array_equal(ours.sequences, ref.sequences)
    np.testing.assert_allclose(ours.scores, ref.scores, rtol=1e-5)


def _assert_backend_matches_reference(backend, beam, vocab, max_len, eos_bias):
    """beam_topk and beam_update on ``backend``: the flax-style reference's tokens, steps and scores."""
    dec = toy_decoder(np.random.default_rng(beam), batch=4, vocab=vocab, max_len=max_len, eos_bias=eos_bias)
    with use_backend(backend):
        ours = _run(beam_search, dec, beam_size=beam, max_len=max_len)
    seqs, scores, steps = _run(flax_beam_search.beam_search, dec, beam_size=beam, max_len=max_len)
    np.testing.assert_array_equal(ours.sequences, seqs)
    np.testing.assert_allclose(ours.scores, scores, rtol=1e-5)
    assert int(ours.num_steps) == int(steps)


@pytest.mark.skipif("cpu_ffi" not in available_backends(), reason="lsjax._ffi not built")
@pytest.mark.parametrize("beam", [1, 3, 4, 5])
def test_cpu_ffi_backend_matches_reference(beam):
    _assert_backend_matches_reference("cpu_ffi", beam, vocab=13, max_len=9, eos_bias=2.0)


def test_rejects_bad_groups(rng):
    dec = toy_decoder(rng, batch=1, vocab=5, max_len=3)
    with pytest.raises(ValueError, match="multiple of diversity_groups"):
        _run(beam_search, dec, beam_size=3, max_len=3, diversity_groups=2)


def test_tiny_vocab_fewer_candidates_than_beams(rng):
    # beam * vocab candidates < 2 * beam at the first step: -inf fillers must never count as finished.
    max_len = 4
    dec = toy_decoder(rng, batch=2, vocab=4, max_len=max_len, eos_bias=1.0)
    ours = _run(beam_search, dec, beam_size=5, max_len=max_len)
    seqs, scores, _ = _run(flax_beam_search.beam_search, dec, beam_size=5, max_len=max_len)
    np.testing.assert_array_equal(ours.sequences, seqs)
    np.testing.assert_allclose(ours.scores, scores, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(ours.scores)))


@pytest.mark.gpu
@pytest.mark.parametrize("beam", [1, 4, 5])
def test_cuda_backend_matches_reference(beam):
    _assert_backend_matches_reference("cuda", beam, vocab=3001, max_len=12, eos_bias=4.0)
