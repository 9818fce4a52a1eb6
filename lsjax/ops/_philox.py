"""Philox4x32-10 dropout randomness in jnp, bit-identical to ``csrc/philox.h``.

An op that drops elements takes a JAX PRNG ``key`` and turns it into the
``uint32[4]`` operand ``{k0, k1, off_lo, off_hi}`` with :func:`rng_operand`.
Element ``e`` (flat row-major index into the op's output) draws the 16-bit
chunk ``i % 8`` of ``Philox(counter=(b_lo, b_hi, 0, 0), key=(k0, k1))``,
``i = e + off``, ``b = i // 8`` (chunk ``2 w + h`` is the low (h = 0) or high
(h = 1) half of word ``w``); it is kept iff that chunk is ``>= floor(rate *
2**16)``, and kept elements are scaled by ``1 / (1 - rate)``. One Philox call
serves 8 elements; the rate resolution is ``2**-16``. The backward passes
regenerate the mask from the same operand, so no mask tensor is stored.

The kernels index a ``[rows, cols]`` block as ``e = r * row_stride + c``: with
``row_stride`` the global last dim ``H`` and the offset advanced by the block's
first element ``r0 * H + c0`` (how sharded ops run, :mod:`lsjax.ops._rowwise`),
the block draws exactly ``philox_bits(rng, (R, H))[r0:r0 + rows, c0:c0 + cols]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_U32 = jnp.uint32
_M0, _M1 = np.uint32(0xD2511F53), np.uint32(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)


def no_rng() -> np.ndarray:
    """The ``uint32[4]`` rng operand of a call that draws no bits (its value is not read): a
    constant with no pattern XLA rewrites (it turns a splat into a broadcast and ``0, 1, 2, 3``
    into an iota, each a kernel launched at every use, e.g. every step of a decode loop), so
    it stays a literal. Not inside a ``custom_partitioning`` body, which takes no constants."""
    return np.array([1, 0, 0, 0], np.uint32)


def rng_operand(key: jax.Array, offset: int = 0) -> jax.Array:
    """``uint32[4]`` = (two words drawn from ``key``, 64-bit element ``offset``)."""
    words = jax.random.bits(key, (2,), _U32)
    off = jnp.array([offset & 0xFFFFFFFF, (offset >> 32) & 0xFFFFFFFF], _U32)
    return jnp.concatenate([words, off])


def dropout_threshold(rate: float) -> np.uint32:
    """``floor(float32(rate) * 2**16)`` clamped to 16 bits: keep iff bits >= threshold.

    The kernels receive the rate as a float32 attribute, so the rate is rounded
    to float32 first (as the kernels see it).
    """
    return np.uint32(min(int(float(np.float32(rate)) * 65536.0), 0xFFFF))


def _mulhilo(a: jax.Array, b: np.uint32) -> tuple[jax.Array, jax.Array]:
    """(high, low) 32-bit words of the 64-bit product, in uint32 arithmetic."""
    b = _U32(b)
    al, ah = a & 0xFFFF, a >> 16
    bl, bh = b & 0xFFFF, b >> 16
    t = al * bl
    m1 = ah * bl + (t >> 16)
    m2 = al * bh + (m1 & 0xFFFF)
    hi = ah * bh + (m1 >> 16) + (m2 >> 16)
    return hi, a * b


def philox4x32(c0: jax.Array, c1: jax.Array, k0: jax.Array, k1: jax.Array) -> tuple[jax.Array, ...]:
    """Philox4x32-10 of counters ``(c0, c1, 0, 0)`` (uint32 arrays) under key ``(k0, k1)``."""
    x0, x1 = c0, c1
    x2 = x3 = jnp.zeros_like(c0)
    for _ in range(10):
        hi0, lo0 = _mulhilo(x0, _M0)
        hi1, lo1 = _mulhilo(x2, _M1)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return x0, x1, x2, x3


def philox_bits(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``uint32[shape]``: the 16 random bits of every flat element (see module doc)."""
    n = int(np.prod(shape, dtype=np.int64))
    k0, k1, off_lo, off_hi = rng[0], rng[1], rng[2], rng[3]
    # 64-bit element index e + off, kept as (lo, hi) uint32 words.
    idx = jnp.arange(n, dtype=_U32) if n < 2**32 else None
    if idx is None:
        raise ValueError(f"dropout over {n} >= 2**32 elements in one op is not supported")
    lo = idx + off_lo
    hi = off_hi + (lo < idx).astype(_U32)
    b_lo = (lo >> 3) | (hi << 29)
    b_hi = hi >> 3
    words = philox4x32(b_lo, b_hi, k0, k1)
    w = (lo >> 1) & 3
    word = jnp.where(w == 0, words[0], jnp.where(w == 1, words[1], jnp.where(w == 2, words[2], words[3])))
    out = (word >> ((lo & 1) * 16)) & 0xFFFF
    return out.reshape(shape)


def dropout_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep-mask of ``shape`` for ``rate`` (all True when rate == 0)."""
    if rate == 0:
        return jnp.ones(shape, bool)
    return philox_bits(rng, shape) >= dropout_threshold(rate)


def check_rate(op: str, rate: float) -> None:
    """ValueError unless 0 <= rate < 1."""
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{op}: dropout rate must be in [0, 1), got {rate}")
