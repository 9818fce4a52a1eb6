"""Beam-search top-k: the best ``k`` continuations over all beams of a batch row.

For logits ``[batch, beam, vocab]`` and the beams' running scores
``[batch, beam]``, ranks ``scores[b, i] + log_softmax(logits[b, i])[t]`` over the
``beam * vocab`` candidates of each row and returns the ``k`` best as float32
values and flat int32 indices ``i * vocab + t``, sorted descending, ties broken
by the smaller index (the order of :func:`jax.lax.top_k`).

Backends: ``"xla"`` runs :func:`beam_topk_reference` (a full log-softmax and
``lax.top_k``); ``"cpu_ffi"``/``"cuda"`` call ``lsjax_beam_topk_{cpu,cuda}``.
The CUDA kernel is LightSeq's hierarchical "R-top-k": one pass per beam finds the
log-sum-exp and a lower bound ``R`` on the row's k-th best value (the minimum of
``k`` group maxima), a second pass keeps only candidates ``>= R``, and a small
exact selection over those gives the top ``k``. Its candidate workspace is a
fixed-size extra output (no host synchronisation); a row whose candidates
overflow it is finished by an exact full scan, so results are always exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_shape
from lsjax.ops._rowwise import ROWS, rowwise

_F32 = jnp.float32

# Candidates per batch row kept by the CUDA kernel's compaction pass
# (csrc/beam_topk.h: the workspace is [batch, _CANDIDATES] values + indices).
_CANDIDATES = 4096


def beam_topk_reference(logits: jax.Array, scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX beam top-k; same contract as :func:`beam_topk`."""
    batch, beam, vocab = logits.shape
    total = jax.nn.log_softmax(logits.astype(_F32), axis=-1) + scores.astype(_F32)[..., None]
    values, indices = jax.lax.top_k(total.reshape(batch, beam * vocab), k)
    return values, indices.astype(jnp.int32)


def beam_topk(logits: jax.Array, scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` of ``scores + log_softmax(logits)`` over each row's ``beam * vocab`` candidates.

    Args:
      logits: ``[batch, beam, vocab]`` float32, float16 or bfloat16.
      scores: ``[batch, beam]`` running log-probabilities (used in float32;
        ``-inf`` marks a beam that must not be continued).
      k: static, ``1 <= k <= beam * vocab``.

    Returns:
      ``(values, indices)``: float32 ``[batch, k]`` and int32 ``[batch, k]``
      (``beam_index * vocab + token``), sorted by value descending, equal values
      in increasing index order.
    """
    op = "beam_topk"
    if logits.ndim != 3 or logits.size == 0:
        raise ValueError(f"{op}: logits must be a non-empty [batch, beam, vocab] array, got shape {logits.shape}")
    check_float(op, "logits", logits)
    batch, beam, vocab = logits.shape
    check_shape(op, "scores", scores, (batch, beam))
    if not 1 <= k <= beam * vocab:
        raise ValueError(f"{op}: k must be in [1, beam * vocab = {beam * vocab}], got {k}")
    if beam * vocab >= 2**31:
        raise ValueError(f"{op}: beam * vocab = {beam * vocab} does not fit the int32 indices")
    backend = _backend.get_backend()
    if backend == "xla":
        return beam_topk_reference(logits, scores, k)
    # Row-wise over the batch (sharding / vmap through _rowwise): beam*vocab is one row.
    return _beam_topk_ffi(backend, beam, k, logits.reshape(batch, beam * vocab), scores.astype(_F32))


@rowwise([ROWS, ROWS], [ROWS, ROWS], n_static=3)
def _beam_topk_ffi(backend, beam, k, logits, scores):
    """Local call: logits ``[..., beam * vocab]``, scores ``[..., beam]`` -> ``[..., k]`` twice."""
    lead = logits.shape[:-1]
    rows = math.prod(lead)
    out = (jax.ShapeDtypeStruct((rows, k), _F32), jax.ShapeDtypeStruct((rows, k), jnp.int32))
    if backend == "cuda":
        out += _cuda_workspace(rows, beam)
    values, indices, *_ = jax.ffi.ffi_call(_backend.ffi_target("beam_topk", backend), out)(
        logits.reshape(rows, beam, -1), scores.reshape(rows, beam))
    return values.reshape(lead + (k,)), indices.reshape(lead + (k,))


def _cuda_workspace(batch: int, beam: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Extra outputs the CUDA kernel uses as scratch (csrc/beam_topk.h: BeamTopkWorkspace)."""
    return (
        jax.ShapeDtypeStruct((batch, _CANDIDATES), _F32),  # candidate values
        jax.ShapeDtypeStruct((batch, _CANDIDATES), jnp.int32),  # candidate flat indices
        jax.ShapeDtypeStruct((batch, beam, 3), _F32),  # per beam: threshold, max, log-sum-exp
        jax.ShapeDtypeStruct((batch,), jnp.int32),  # candidates found per row
    )
