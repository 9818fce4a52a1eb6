"""A tiny random decoder satisfying the lsjax decoding contract (decode tests, `decode --smoke`).

State: a tanh recurrence ``h' = tanh(E[token] + W h + enc)``; the cache also holds
a preallocated ``kv`` buffer ``[N, max_len, d]`` written at ``cache_index`` (a
scalar leaf shared by all rows) whose running mean feeds the logits, so beam
reordering of every cache leaf matters; ``steps`` counts decoder calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def toy_decoder(rng: np.random.Generator, *, batch: int, vocab: int, max_len: int, d: int = 8,
                eos_bias: float = 0.0, eos_id: int = 3):
    """Returns ``(tokens_to_logits, init_cache, encoded)`` with fresh random weights."""
    f = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    emb, w, out = f(vocab, d), 0.5 * f(d, d), 2.0 * f(d, vocab)
    bias = jnp.zeros(vocab).at[eos_id % vocab].add(eos_bias).at[0].set(-1e4)  # never emit padding
    encoded = {"enc": f(batch, d)}
    init_cache = {"h": jnp.zeros((batch, d)), "kv": jnp.zeros((batch, max_len, d)),
                  "cache_index": jnp.array(0, jnp.int32), "steps": jnp.array(0, jnp.int32)}

    def tokens_to_logits(ids, cache, enc):
        h = jnp.tanh(emb[ids[:, 0]] + cache["h"] @ w + enc["enc"])
        i = cache["cache_index"]
        kv = jax.lax.dynamic_update_slice_in_dim(cache["kv"], h[:, None], i, axis=1)
        mean = jnp.sum(kv, axis=1) / (i + 1).astype(jnp.float32)
        logits = (h + mean) @ out + bias
        return logits, {"h": h, "kv": kv, "cache_index": i + 1, "steps": cache["steps"] + 1}

    return tokens_to_logits, init_cache, encoded
