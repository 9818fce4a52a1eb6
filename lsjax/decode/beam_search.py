"""Beam search inside one ``jax.jit``: a while loop over decoder steps.

Follows the decoding contract of :mod:`lsjax.decode`: ``tokens_to_logits(ids
int32[N, 1], cache, encoded) -> (logits [N, vocab], cache)`` with
``N = batch * beam`` (row ``b * beam + j``). Each step ranks ``2 * beam``
continuations per group with :func:`lsjax.ops.beam_topk` (so eos candidates never
starve the alive beams), keeps the best non-eos ones alive, and merges the eos
ones into a fixed-size finished set scored with the GNMT length penalty
``((5 + length) / 6) ** alpha`` (:func:`lsjax.ops.beam_update`: one kernel on the
FFI backends). The loop stops early once, in every row, no
alive beam can still beat the worst finished one; it checks that every
``steps_per_check`` steps (:func:`lsjax.decode.loop.while_loop_in_blocks`: one
host round trip per block of steps, not per step).

Diverse beam search (Vijayakumar et al., 2018) splits the beams into
``diversity_groups`` groups decoded in turn; a group's candidates are ranked
with ``diversity_penalty`` times the number of times the same token is among the
earlier groups' ``2 * group_beam`` candidates at this step subtracted (Hamming
diversity, counted as in fairseq). Reported scores stay the
sequences' true (length-penalised) log-probabilities.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lsjax.decode.loop import while_loop_in_blocks
from lsjax.ops.beam_topk import beam_topk
from lsjax.ops.beam_update import BeamUpdate, beam_update, beam_update_reference

_F32 = jnp.float32
_NEG_INF = -jnp.inf

TokensToLogits = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]


class BeamSearchOutput(NamedTuple):
    """``sequences`` int32 ``[batch, beam, max_len]`` (tokens after bos, eos included,
    0-padded), ``scores`` float32 ``[batch, beam]`` sorted descending, and
    ``num_steps`` int32: decoder steps run before the loop stopped."""

    sequences: jax.Array
    scores: jax.Array
    num_steps: jax.Array


def gnmt_length_penalty(length, alpha: float):
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (float32)."""
    return ((5.0 + jnp.asarray(length, _F32)) / 6.0) ** alpha


def expand_to_beams(tree, beam_size: int):
    """Repeats every leaf of ndim >= 1 ``beam_size`` times along axis 0 (row ``b*beam + j``)."""
    return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0) if jnp.ndim(x) else x, tree)


def gather_rows(tree, rows: jax.Array):
    """Gathers rows ``rows`` of every leaf of ndim >= 1; scalar leaves pass through."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if jnp.ndim(x) else x, tree)


class _State(NamedTuple):
    step: jax.Array  # int32 scalar: tokens generated so far
    num_steps: jax.Array  # int32 scalar: steps taken while the search was not done
    last_tokens: jax.Array  # [batch, groups, group_beam]
    alive_seqs: jax.Array  # [batch, groups, group_beam, max_len]
    alive_scores: jax.Array  # [batch, groups, group_beam] sum of log-probs
    finished_seqs: jax.Array  # [batch, groups, group_beam, max_len]
    finished_scores: jax.Array  # [batch, groups, group_beam] length-penalised
    finished_flags: jax.Array  # [batch, groups, group_beam] bool


def _group_candidates(logits, scores, counts, k, penalty):
    """Top-``k`` continuations of one group: (rank score, true score, flat index).

    logits [batch, group_beam, vocab], scores [batch, group_beam], counts
    float32 [batch, vocab] (earlier groups' picks at this step, or None).
    """
    if counts is None:
        values, idx = beam_topk(logits, scores, k)
        return values, values, idx
    batch, group_beam, vocab = logits.shape
    true = jax.nn.log_softmax(logits.astype(_F32), axis=-1) + scores[..., None]
    ranked = (true - penalty * counts[:, None, :]).reshape(batch, group_beam * vocab)
    rank, idx = jax.lax.top_k(ranked, k)
    return rank, jnp.take_along_axis(true.reshape(batch, -1), idx, axis=1), idx


def beam_search(
    tokens_to_logits: TokensToLogits,
    init_cache: Any,
    encoded: Any,
    *,
    beam_size: int,
    max_len: int,
    eos_id: int,
    bos_id: int = 2,
    length_penalty: float = 0.6,
    diversity_groups: int = 1,
    diversity_penalty: float = 0.0,
    reorder_cache: Callable[[Any, jax.Array], Any] = gather_rows,
    steps_per_check: int = 8,
) -> BeamSearchOutput:
    """Beam search for ``batch`` rows (jit-able; one while loop).

    Args:
      tokens_to_logits: the decoder step of the decoding contract.
      init_cache, encoded: pytrees with leading dim ``batch`` (scalar cache
        leaves allowed); expanded here to ``batch * beam_size`` rows.
      beam_size: beams per row, any value >= 1 (divisible by ``diversity_groups``).
      max_len: maximum number of generated tokens (eos included).
      eos_id: end-of-sequence token (an id outside the vocab disables stopping).
      bos_id: first input token.
      length_penalty: GNMT ``alpha``; 0 ranks by plain log-probability.
      diversity_groups, diversity_penalty: diverse beam search; ``1``/``0.0``
        is ordinary beam search.
      reorder_cache: ``(cache, rows int32 [N]) -> cache`` where new row ``r``
        continues row ``rows[r]``; the default gathers every leaf,
        ``lsjax.models.reorder_decode_cache`` only reorders the lsjax decoder's
        row-offset table (cache indirection, no cache copies).
      steps_per_check: decoder steps between early-stop checks (one device-to-host
        copy of the loop condition each). Up to ``steps_per_check - 1`` steps after
        the stop (also past ``max_len``) are computed and discarded: the results do
        not depend on it, but ``tokens_to_logits``'s cache must tolerate steps past
        its length (clamped indices, as XLA's and lsjax's decoders do). 1: check
        every step. Fastest when it divides ``max_len``: the state then needs no
        per-step select to discard those steps.

    Returns:
      :class:`BeamSearchOutput`. A row (group) with fewer than ``beam_size``
      finished beams fills the rest with its best alive beams, scored with the
      penalty of their length.
    """
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_search: beam_size and max_len must be >= 1, got {beam_size}, {max_len}")
    if diversity_groups < 1 or beam_size % diversity_groups:
        raise ValueError(
            f"beam_search: beam_size ({beam_size}) must be a multiple of diversity_groups ({diversity_groups})")
    groups, group_beam = diversity_groups, beam_size // diversity_groups
    diverse = groups > 1 and diversity_penalty != 0.0
    batch = jax.tree.leaves(encoded)[0].shape[0]
    encoded = expand_to_beams(encoded, beam_size)
    shape = (batch, groups, group_beam)
    first = jnp.zeros(shape, _F32).at[:, :, 1:].set(_NEG_INF)  # one live beam per group at start
    state = _State(
        step=jnp.array(0, jnp.int32),
        num_steps=jnp.array(0, jnp.int32),
        last_tokens=jnp.full(shape, bos_id, jnp.int32),
        alive_seqs=jnp.zeros(shape + (max_len,), jnp.int32),
        alive_scores=first,
        finished_seqs=jnp.zeros(shape + (max_len,), jnp.int32),
        finished_scores=jnp.full(shape, _NEG_INF, _F32),
        finished_flags=jnp.zeros(shape, bool),
    )
    best_penalty = gnmt_length_penalty(max_len, length_penalty)
    # 1 / the penalty of s + 1 tokens at step s, computed once (beam_update reads entry s).
    inv_penalties = 1.0 / gnmt_length_penalty(jnp.arange(1, max_len + 1), length_penalty)

    def not_done(s: _State):
        # Log-probs only fall, so an alive beam's best reachable score is its
        # current sum under the largest penalty (that of max_len).
        best_alive = jnp.max(s.alive_scores, axis=2) / best_penalty
        worst_finished = jnp.where(jnp.all(s.finished_flags, axis=2), jnp.min(s.finished_scores, axis=2), _NEG_INF)
        return (s.step < max_len) & ~jnp.all(worst_finished > best_alive)

    def step(s: _State, cache: Any) -> tuple[_State, Any]:
        logits, cache = tokens_to_logits(s.last_tokens.reshape(-1, 1), cache, encoded)
        vocab = logits.shape[-1]
        logits = logits.reshape(batch, groups, group_beam, vocab)
        counts = jnp.zeros((batch, vocab), _F32) if diverse else None
        cands = []
        for g in range(groups):
            rank, true, idx = _group_candidates(
                logits[:, g], s.alive_scores[:, g], counts, 2 * group_beam, diversity_penalty)
            if diverse:  # as fairseq: every ranked candidate token counts
                counts = counts + jax.nn.one_hot(idx % vocab, vocab, dtype=_F32).sum(axis=1)
            cands.append((rank, true, idx))
        # Every (row, group) is one row of beam_update: [batch * groups, ...].
        rank, true, idx = (jnp.stack(x, axis=1).reshape(batch * groups, -1) for x in zip(*cands))
        flat = lambda x: x.reshape((batch * groups,) + x.shape[2:])  # noqa: E731
        update = functools.partial(beam_update_reference, cand_ranks=rank) if diverse else beam_update
        new = update(true, idx, flat(s.alive_seqs), flat(s.finished_seqs), flat(s.finished_scores),
                     flat(s.finished_flags), s.step, inv_penalties, vocab=vocab, eos_id=eos_id)
        new = BeamUpdate(*(x.reshape((batch, groups) + x.shape[1:]) for x in new))
        row_base = (jnp.arange(batch)[:, None, None] * beam_size
                    + jnp.arange(groups)[None, :, None] * group_beam)
        return _State(
            step=s.step + 1,
            num_steps=jnp.where(not_done(s), s.step + 1, s.num_steps),
            last_tokens=new.alive_tokens,
            alive_seqs=new.alive_seqs,
            alive_scores=new.alive_scores,
            finished_seqs=new.finished_seqs,
            finished_scores=new.finished_scores,
            finished_flags=new.finished_flags,
        ), reorder_cache(cache, (row_base + new.alive_parents).reshape(-1).astype(jnp.int32))

    # When the blocks end at max_len, a step after the stop can only follow an early stop: every
    # (row, group) then holds k finished beams that no alive beam can beat (alive scores only fall,
    # and a later eos candidate's score s <= 0 over a penalty <= that of max_len stays below
    # best_alive), so further steps leave the finished beams as they are, and the alive ones are
    # not read. No per-step select of the state is needed then.
    blocks_end_at_max_len = steps_per_check >= 1 and max_len % steps_per_check == 0
    s, _ = while_loop_in_blocks(not_done, step, (state, expand_to_beams(init_cache, beam_size)),
                                block=steps_per_check, keep_stopped_state=not blocks_end_at_max_len)
    alive_scores = s.alive_scores / gnmt_length_penalty(s.num_steps, length_penalty)
    seqs, scores = fill_with_alive(s.finished_seqs, s.finished_scores, s.finished_flags, s.alive_seqs, alive_scores)
    scores, order = jax.lax.top_k(scores.reshape(batch, beam_size), beam_size)
    seqs = jnp.take_along_axis(seqs.reshape(batch, beam_size, max_len), order[..., None], axis=1)
    return BeamSearchOutput(seqs, scores, s.num_steps)


def fill_with_alive(finished_seqs, finished_scores, finished_flags, alive_seqs, alive_scores):
    """Fills the empty finished slots with the best alive beams (all sorted on the last beam axis).

    Shapes ``[..., beams, max_len]`` / ``[..., beams]``; returns the merged
    ``(seqs, scores)``, the finished beams first.
    """
    beams = finished_scores.shape[-1]
    n_finished = jnp.sum(finished_flags, axis=-1, keepdims=True)
    slot = jnp.arange(beams)
    pick = jnp.where(slot < n_finished, slot, beams + slot - n_finished)
    scores = jnp.take_along_axis(jnp.concatenate([finished_scores, alive_scores], -1), pick, axis=-1)
    seqs = jnp.take_along_axis(jnp.concatenate([finished_seqs, alive_seqs], -2), pick[..., None], axis=-2)
    return seqs, scores
