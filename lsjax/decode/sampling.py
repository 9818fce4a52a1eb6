"""Ancestral sampling (temperature, exact top-k / top-p) and greedy decoding in one while loop.

Unlike LightSeq's approximate sampler, the filtering is exact: top-k keeps the
``k`` largest logits (``lax.top_k``), top-p keeps the smallest prefix of the
tokens sorted by probability whose mass reaches ``top_p`` (the most likely
token always stays). Rows stop at eos (then emit padding 0); the loop ends when
every row has, or after ``max_len`` tokens, checked every ``steps_per_check``
steps as in :func:`lsjax.decode.beam_search`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lsjax.decode.beam_search import TokensToLogits
from lsjax.decode.loop import while_loop_in_blocks

_F32 = jnp.float32

# select(logits float32 [batch, vocab], key) -> tokens int32 [batch]
Select = Callable[[jax.Array, jax.Array], jax.Array]


def _decode(tokens_to_logits: TokensToLogits, init_cache: Any, encoded: Any, select: Select, key: jax.Array,
            max_len: int, eos_id: int, bos_id: int, steps_per_check: int) -> jax.Array:
    """Runs ``select`` on each step's logits until every row emitted eos; ``[batch, max_len]``."""
    if max_len < 1:
        raise ValueError(f"decode: max_len must be >= 1, got {max_len}")
    batch = jax.tree.leaves(encoded)[0].shape[0]

    def not_done(s):
        t, _, _, _, finished = s
        return (t < max_len) & ~jnp.all(finished)

    def step(s, cache):
        t, key, last, seqs, finished = s
        logits, cache = tokens_to_logits(last[:, None], cache, encoded)
        key, sub = jax.random.split(key)
        token = jnp.where(finished, 0, select(logits.astype(_F32), sub).astype(jnp.int32))
        return (t + 1, key, token, seqs.at[:, t].set(token), finished | (token == eos_id)), cache

    state = (jnp.array(0, jnp.int32), key, jnp.full((batch,), bos_id, jnp.int32),
             jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), bool))
    return while_loop_in_blocks(not_done, step, (state, init_cache), block=steps_per_check)[0][3]


def _filtered_sample(logits: jax.Array, key: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """One exact top-k / top-p draw per row of float32 ``logits`` [batch, vocab]."""
    vocab = logits.shape[-1]
    if top_k == 0 and top_p >= 1.0:
        return jax.random.categorical(key, logits, axis=-1)
    # Candidates sorted by probability (ties: smaller token first).
    values, tokens = jax.lax.top_k(logits, top_k if 0 < top_k < vocab else vocab)
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(tokens, choice[:, None], axis=-1)[:, 0]


def sample(tokens_to_logits: TokensToLogits, init_cache: Any, encoded: Any, *, key: jax.Array, max_len: int,
           eos_id: int, bos_id: int = 2, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           steps_per_check: int = 8) -> jax.Array:
    """Samples one continuation per row (jit-able; reproducible from ``key``).

    Args:
      tokens_to_logits, init_cache, encoded: the decoding contract with ``N = batch``.
      key: a JAX PRNG key.
      max_len: maximum number of generated tokens (eos included).
      eos_id, bos_id: end token (outside the vocab: never stop) and first input.
      temperature: logits are divided by it (> 0).
      top_k: keep the ``top_k`` most likely tokens (0: all).
      top_p: keep the smallest most-likely set with probability mass >= ``top_p`` (1: all).
      steps_per_check: steps between stop checks (see :func:`lsjax.decode.beam_search`).

    Returns:
      int32 ``[batch, max_len]``: tokens after bos, eos included, 0 after it.
    """
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature} (use greedy() for argmax decoding)")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sample: need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    select = lambda logits, k: _filtered_sample(logits / temperature, k, top_k, top_p)  # noqa: E731
    return _decode(tokens_to_logits, init_cache, encoded, select, key, max_len, eos_id, bos_id, steps_per_check)


def greedy(tokens_to_logits: TokensToLogits, init_cache: Any, encoded: Any, *, max_len: int, eos_id: int,
           bos_id: int = 2, steps_per_check: int = 8) -> jax.Array:
    """Greedy (argmax, ties to the smaller token) decoding; same contract and output as :func:`sample`."""
    select = lambda logits, _: jnp.argmax(logits, axis=-1)  # noqa: E731
    return _decode(tokens_to_logits, init_cache, encoded, select, jax.random.key(0), max_len, eos_id, bos_id,
                   steps_per_check)
