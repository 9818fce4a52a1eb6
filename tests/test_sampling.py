"""Sampling and greedy decoding: greedy equivalences, reproducibility, exact distributions, eos."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax.decode import greedy, sample
from benchmarks.toy_decoder import toy_decoder

EOS = 3


def _sample(dec, **kw):
    f, cache, enc = dec
    key = kw.pop("key")
    return jax.jit(lambda c, e, k: sample(f, c, e, key=k, eos_id=EOS, **kw))(cache, enc, key)


def _greedy(dec, **kw):
    f, cache, enc = dec
    return jax.jit(lambda c, e: greedy(f, c, e, eos_id=EOS, **kw))(cache, enc)


def test_greedy_equivalences_and_reproducibility(rng):
    dec = toy_decoder(rng, batch=6, vocab=13, max_len=8, eos_bias=1.0)
    want = np.asarray(_greedy(dec, max_len=8))
    key = jax.random.key(int(rng.integers(1 << 30)))
    np.testing.assert_array_equal(_sample(dec, key=key, max_len=8, top_k=1), want)
    np.testing.assert_array_equal(_sample(dec, key=key, max_len=8, top_p=1e-6), want)
    np.testing.assert_array_equal(_sample(dec, key=key, max_len=8, temperature=1e-4), want)
    a = np.asarray(_sample(dec, key=key, max_len=8, temperature=2.0))
    np.testing.assert_array_equal(_sample(dec, key=key, max_len=8, temperature=2.0), a)
    b = np.asarray(_sample(dec, key=jax.random.fold_in(key, 1), max_len=8, temperature=2.0))
    assert not np.array_equal(a, b), "another key must give other samples"


def test_stops_at_eos_and_pads(rng):
    dec = toy_decoder(rng, batch=5, vocab=9, max_len=12, eos_bias=3.0)
    out = np.asarray(_sample(dec, key=jax.random.key(0), max_len=12))
    for row in out:
        hits = np.flatnonzero(row == EOS)
        if hits.size:
            assert np.all(row[hits[0] + 1:] == 0), "tokens after eos must be padding"
            assert np.all(row[:hits[0]] != 0)


def _fixed_logits_model(logits):
    """tokens_to_logits that ignores its input and returns ``logits`` [batch, vocab]."""
    def tokens_to_logits(ids, cache, enc):
        return enc["logits"], cache
    return tokens_to_logits, {}, {"logits": logits}


def _nucleus(p, top_p):
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    return keep


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (0, 1.0, 0.7), (3, 1.0, 1.0), (0, 0.6, 1.0),
                                                      (4, 0.8, 1.3)])
def test_empirical_distribution(rng, top_k, top_p, temperature):
    vocab, n = 8, 40000
    logits = rng.standard_normal(vocab).astype(np.float32)
    p = np.exp(logits / temperature)
    p /= p.sum()
    keep = np.ones(vocab, bool)
    if top_k:
        keep &= np.isin(np.arange(vocab), np.argsort(-p, kind="stable")[:top_k])
    if top_p < 1:
        q = np.where(keep, p, 0)
        keep &= _nucleus(q / q.sum(), top_p)
    want = np.where(keep, p, 0)
    want /= want.sum()
    dec = _fixed_logits_model(jnp.tile(jnp.asarray(logits), (n, 1)))
    out = np.asarray(_sample(dec, key=jax.random.key(int(rng.integers(1 << 30))), max_len=1, top_k=top_k,
                             top_p=top_p, temperature=temperature))
    freq = np.bincount(out[:, 0], minlength=vocab) / n
    assert np.all(freq[~keep] == 0), f"mass outside the kept set: {freq[~keep]}"
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-4), (freq, want)


def test_rejects_bad_arguments(rng):
    dec = toy_decoder(rng, batch=1, vocab=5, max_len=2)
    with pytest.raises(ValueError, match="temperature"):
        _sample(dec, key=jax.random.key(0), max_len=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        _sample(dec, key=jax.random.key(0), max_len=2, top_p=0.0)
