"""Philox4x32-10 in jnp against the Random123 known-answer vector and its own rules."""

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import _philox


def test_known_answer():
    zero = jnp.zeros((1,), jnp.uint32)
    words = _philox.philox4x32(zero, zero, jnp.uint32(0), jnp.uint32(0))
    assert [int(w[0]) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_offset_shifts_the_stream():
    rng = _philox.rng_operand(jax.random.key(3))
    full = _philox.philox_bits(rng, (64,))
    shifted = _philox.philox_bits(rng.at[2].add(10), (54,))
    np.testing.assert_array_equal(full[10:], shifted)


def test_offset_carries_into_high_word():
    rng = _philox.rng_operand(jax.random.key(3), offset=2**32 - 3)
    bits = _philox.philox_bits(rng, (8,))
    after = _philox.philox_bits(_philox.rng_operand(jax.random.key(3), offset=2**32 + 1), (4,))
    np.testing.assert_array_equal(bits[4:], after)


def test_mask_rate():
    rng = _philox.rng_operand(jax.random.key(0))
    mask = _philox.dropout_mask(rng, (1 << 16,), 0.3)
    assert abs(float(mask.mean()) - 0.7) < 0.01
