"""Straightforward beam search in the style of flax's examples/wmt ``decode.py``.

The reference lsjax's beam search is tested against token for token, and its
peer in ``benchmarks/decode.py``: ``lax.top_k`` over the full ``beam * vocab``
log-softmax, ``2 * beam`` candidates, every cache leaf gathered each step. Same
decoding contract, length penalty, stopping rule and return values as
:func:`lsjax.decode.beam_search` (without diversity groups).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def brevity_penalty(alpha, length):
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def flatten(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def gather_beams(x, beam_indices):
    """x [batch, beams, ...] -> x[b, beam_indices[b, j], ...]."""
    batch = jnp.arange(x.shape[0])[:, None]
    return x[batch, beam_indices]


def beam_search(tokens_to_logits, init_cache, encoded, *, beam_size, max_len, eos_id, bos_id=2, alpha=0.6):
    """Returns (sequences [batch, beam, max_len], scores [batch, beam], num_steps)."""
    batch = jax.tree.leaves(encoded)[0].shape[0]
    repeat = lambda x: jnp.repeat(x, beam_size, axis=0) if x.ndim else x  # noqa: E731
    encoded = jax.tree.map(repeat, encoded)
    cache = jax.tree.map(repeat, init_cache)
    live_scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beam_size - 1), jnp.float32), (batch, 1))
    init = dict(
        i=jnp.array(0, jnp.int32),
        last=jnp.full((batch, beam_size), bos_id, jnp.int32),
        live_seqs=jnp.zeros((batch, beam_size, max_len), jnp.int32),
        live_scores=live_scores,
        fin_seqs=jnp.zeros((batch, beam_size, max_len), jnp.int32),
        fin_scores=jnp.full((batch, beam_size), NEG_INF, jnp.float32),
        fin_flags=jnp.zeros((batch, beam_size), bool),
        cache=cache,
    )

    def cond(s):
        best_live = s["live_scores"][:, 0] / brevity_penalty(alpha, max_len)
        worst_fin = jnp.where(jnp.all(s["fin_flags"], 1), jnp.min(s["fin_scores"], 1), NEG_INF)
        return (s["i"] < max_len) & ~jnp.all(worst_fin > best_live)

    def body(s):
        i = s["i"]
        logits, cache = tokens_to_logits(s["last"].reshape(-1, 1), s["cache"], encoded)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32).reshape(batch, beam_size, vocab), axis=-1)
        log_probs = log_probs + s["live_scores"][..., None]
        topk_scores, topk_idx = jax.lax.top_k(log_probs.reshape(batch, beam_size * vocab), 2 * beam_size)
        topk_beams, topk_ids = topk_idx // vocab, topk_idx % vocab
        topk_seqs = gather_beams(s["live_seqs"], topk_beams).at[:, :, i].set(topk_ids)
        eos = (topk_ids == eos_id) & (topk_scores > NEG_INF)

        live_scores, live_pos = jax.lax.top_k(jnp.where(eos, NEG_INF, topk_scores), beam_size)
        parents = gather_beams(topk_beams, live_pos)
        rows = (jnp.arange(batch)[:, None] * beam_size + parents).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows] if x.ndim else x, cache)

        new_fin = jnp.where(eos, topk_scores / brevity_penalty(alpha, i + 1), NEG_INF)
        fin_scores = jnp.concatenate([s["fin_scores"], new_fin], 1)
        fin_scores, fin_pos = jax.lax.top_k(fin_scores, beam_size)
        return dict(
            i=i + 1,
            last=gather_beams(topk_ids, live_pos),
            live_seqs=gather_beams(topk_seqs, live_pos),
            live_scores=gather_beams(topk_scores, live_pos),
            fin_seqs=gather_beams(jnp.concatenate([s["fin_seqs"], topk_seqs], 1), fin_pos),
            fin_scores=fin_scores,
            fin_flags=gather_beams(jnp.concatenate([s["fin_flags"], eos], 1), fin_pos),
            cache=cache,
        )

    s = jax.lax.while_loop(cond, body, init)
    # Empty finished slots take the best alive beams (penalty of their length).
    live_scores = s["live_scores"] / brevity_penalty(alpha, s["i"])
    n_fin = jnp.sum(s["fin_flags"], 1, keepdims=True)
    slot = jnp.arange(beam_size)[None]
    pick = jnp.where(slot < n_fin, slot, beam_size + slot - n_fin)
    seqs = gather_beams(jnp.concatenate([s["fin_seqs"], s["live_seqs"]], 1), pick)
    scores = gather_beams(jnp.concatenate([s["fin_scores"], live_scores], 1), pick)
    scores, order = jax.lax.top_k(scores, beam_size)
    return gather_beams(seqs, order), scores, s["i"]
