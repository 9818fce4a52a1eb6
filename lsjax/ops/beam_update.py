"""Beam-search step bookkeeping: from a step's top ``2k`` candidates to the next alive and finished beams.

Per row (a batch row, or a diverse-search group) with ``k`` beams, after :func:`beam_topk` ranked
its ``2k`` best continuations: the alive beams become the ``k`` best candidates that do not end in
``eos_id`` (so eos never starves them), each its parent's sequence plus its token at position
``step``; the eos candidates, scored by ``score * inv_penalty`` (``inv_penalty`` = 1 / the GNMT length
penalty of this step's length, one rounding shared by every backend), are merged into the ``k`` finished beams, best first. All rankings follow
:func:`jax.lax.top_k`'s order (descending, equal keys by index); the finished entries come before
the candidates.

Backends: ``"xla"`` runs :func:`beam_update_reference` (two ``lax.top_k``, gathers and
concatenations: about ten XLA kernels a step, some of them copies of the sequences);
``"cpu_ffi"``/``"cuda"`` call ``lsjax_beam_update_{cpu,cuda}``: one kernel, one block per row,
sequences updated in place. Beyond ``k > 32`` the ``"cuda"`` backend runs the reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_shape
from lsjax.ops._rowwise import PARAM, ROWS, rowwise

_OP = "beam_update"
_NEG_INF = -jnp.inf
_MAX_BEAM_CUDA = 32  # csrc/beam_update.h: kBeamUpdateMaxBeam


class BeamUpdate(NamedTuple):
    """The next step's beams of every row: ``alive_tokens``, ``alive_parents`` (int32 ``[rows, k]``,
    parents in ``[0, k)``), ``alive_scores`` (float32 ``[rows, k]``, sums of log-probs),
    ``alive_seqs`` / ``finished_seqs`` (int32 ``[rows, k, max_len]``), ``finished_scores``
    (float32 ``[rows, k]``, length-penalised, descending) and ``finished_flags`` (bool ``[rows, k]``)."""

    alive_tokens: jax.Array
    alive_parents: jax.Array
    alive_scores: jax.Array
    alive_seqs: jax.Array
    finished_seqs: jax.Array
    finished_scores: jax.Array
    finished_flags: jax.Array


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[r, idx[r, j], ...]`` for ``x [rows, n, ...]``, ``idx [rows, m]``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_update_reference(cand_scores: jax.Array, cand_idx: jax.Array, alive_seqs: jax.Array,
                          finished_seqs: jax.Array, finished_scores: jax.Array, finished_flags: jax.Array,
                          step: jax.Array, inv_penalty: jax.Array, *, vocab: int, eos_id: int,
                          cand_ranks: jax.Array | None = None) -> BeamUpdate:
    """Pure-JAX beam update; the contract of :func:`beam_update`. ``cand_ranks`` (float32 ``[rows,
    2k]``, default ``cand_scores``) orders the alive candidates instead of their scores (diverse
    beam search ranks by penalised scores)."""
    k = alive_seqs.shape[1]
    parent = jnp.clip(cand_idx // vocab, 0, k - 1)
    token = cand_idx % vocab
    is_eos = (token == eos_id) & (cand_scores > _NEG_INF)  # -inf: filler when beam * vocab is tiny
    ranks = cand_scores if cand_ranks is None else cand_ranks
    _, keep = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, ranks), k)
    cand_seqs = _take(alive_seqs, parent).at[:, :, step].set(token, mode="drop")
    if jnp.ndim(inv_penalty):  # a table over steps
        inv_penalty = inv_penalty[jnp.clip(step, 0, inv_penalty.shape[0] - 1)]
    new_scores = jnp.where(is_eos, cand_scores * inv_penalty, _NEG_INF)
    all_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    _, best = jax.lax.top_k(all_scores, k)
    return BeamUpdate(
        alive_tokens=_take(token, keep),
        alive_parents=_take(parent, keep),
        alive_scores=_take(cand_scores, keep),
        alive_seqs=_take(cand_seqs, keep),
        finished_seqs=_take(jnp.concatenate([finished_seqs, cand_seqs], axis=1), best),
        finished_scores=_take(all_scores, best),
        finished_flags=_take(jnp.concatenate([finished_flags, is_eos], axis=1), best),
    )


def beam_update(cand_scores: jax.Array, cand_idx: jax.Array, alive_seqs: jax.Array, finished_seqs: jax.Array,
                finished_scores: jax.Array, finished_flags: jax.Array, step: jax.Array, inv_penalty: jax.Array, *,
                vocab: int, eos_id: int) -> BeamUpdate:
    """The beams of every row after one step.

    Args:
      cand_scores: float32 ``[rows, 2k]``: the candidates' sums of log-probs, sorted descending
        (as :func:`beam_topk` returns them).
      cand_idx: int32 ``[rows, 2k]``: ``parent * vocab + token`` (parents are clamped to ``[0, k)``).
      alive_seqs, finished_seqs: int32 ``[rows, k, max_len]``.
      finished_scores: float32 ``[rows, k]``, descending; finished_flags: bool ``[rows, k]``.
      step: int32 scalar, the position this step's tokens take (none is written at or past ``max_len``).
      inv_penalty: float32 scalar, 1 / the length penalty of ``step + 1`` tokens; or float32 ``[n]``,
        that value for every step ``s`` at entry ``s`` (entry ``min(step, n - 1)`` is used), so that a
        search computes the penalties once instead of a ``pow`` per step.
      vocab: static vocabulary size; eos_id: static end-of-sequence id.

    Returns:
      :class:`BeamUpdate`. On the FFI backends the sequences, finished scores and flags are updated
      in place where XLA can (their operands' buffers are aliased to the results).
    """
    _check(cand_scores, cand_idx, alive_seqs, finished_seqs, finished_scores, finished_flags, step, inv_penalty, vocab)
    step, inv_penalty = jnp.asarray(step, jnp.int32), jnp.asarray(inv_penalty, jnp.float32)
    backend = _backend.get_backend()
    k = alive_seqs.shape[1]
    if backend == "xla" or (backend == "cuda" and k > _MAX_BEAM_CUDA):
        return beam_update_reference(cand_scores, cand_idx, alive_seqs, finished_seqs, finished_scores,
                                     finished_flags, step, inv_penalty, vocab=vocab, eos_id=eos_id)
    rows, _, max_len = alive_seqs.shape
    flat = (x.reshape(rows, k * max_len) for x in (alive_seqs, finished_seqs))
    out = _beam_update_ffi(backend, int(vocab), int(eos_id), cand_scores, cand_idx, *flat, finished_scores,
                           finished_flags, step, inv_penalty)
    tokens, parents, scores, alive, finished, fin_scores, flags = out
    return BeamUpdate(tokens, parents, scores, alive.reshape(alive_seqs.shape), finished.reshape(alive_seqs.shape),
                      fin_scores, flags)


def _check(cand_scores, cand_idx, alive_seqs, finished_seqs, finished_scores, finished_flags, step, inv_penalty,
           vocab) -> None:
    if alive_seqs.ndim != 3 or alive_seqs.shape[1] == 0 or alive_seqs.dtype != jnp.int32:
        raise ValueError(f"{_OP}: alive_seqs must be int32 [rows, k >= 1, max_len], got "
                         f"{alive_seqs.dtype}{list(alive_seqs.shape)}")
    rows, k, _ = alive_seqs.shape
    for name, x, shape, dtype in (("cand_scores", cand_scores, (rows, 2 * k), jnp.float32),
                                  ("cand_idx", cand_idx, (rows, 2 * k), jnp.int32),
                                  ("finished_seqs", finished_seqs, alive_seqs.shape, jnp.int32),
                                  ("finished_scores", finished_scores, (rows, k), jnp.float32),
                                  ("finished_flags", finished_flags, (rows, k), jnp.bool_)):
        check_shape(_OP, name, x, shape)
        if x.dtype != dtype:
            raise TypeError(f"{_OP}: {name} must be {jnp.dtype(dtype).name}, got {x.dtype}")
    if jnp.shape(step) != () or jnp.ndim(inv_penalty) > 1 or jnp.size(inv_penalty) == 0:
        raise ValueError(f"{_OP}: step must be a scalar and inv_penalty a scalar or a non-empty [n] table, got "
                         f"shapes {jnp.shape(step)} and {jnp.shape(inv_penalty)}")
    if vocab < 1:
        raise ValueError(f"{_OP}: vocab must be >= 1, got {vocab}")


@rowwise([ROWS, ROWS, ROWS, ROWS, ROWS, ROWS, PARAM, PARAM], [ROWS] * 7, n_static=3)
def _beam_update_ffi(backend, vocab, eos_id, cand_scores, cand_idx, alive, finished, fin_scores, fin_flags, step,
                     inv_penalty):
    """Local call: candidates ``[..., 2k]``, sequences ``[..., k * max_len]``, beams ``[..., k]``."""
    lead = cand_scores.shape[:-1]
    rows, k = math.prod(lead), fin_scores.shape[-1]
    seqs = jax.ShapeDtypeStruct((rows, k, alive.shape[-1] // k), jnp.int32)
    beams = lambda dtype: jax.ShapeDtypeStruct((rows, k), dtype)  # noqa: E731
    outs = jax.ffi.ffi_call(
        _backend.ffi_target(_OP, backend),
        (beams(jnp.int32), beams(jnp.int32), beams(jnp.float32), seqs, seqs, beams(jnp.float32), beams(jnp.bool_)),
        input_output_aliases={2: 3, 3: 4, 4: 5, 5: 6})(
            cand_scores.reshape(rows, 2 * k), cand_idx.reshape(rows, 2 * k), alive.reshape(seqs.shape),
            finished.reshape(seqs.shape), fin_scores.reshape(rows, k), fin_flags.reshape(rows, k), step, inv_penalty,
            vocab=np.int64(vocab), eos_id=np.int64(eos_id))
    return tuple(x.reshape(lead + (-1,)) for x in outs)
