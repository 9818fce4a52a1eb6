"""Beam-search top-k: the best ``k`` continuations over all beams of a batch row.

For logits ``[batch, beam, vocab]`` and the beams' running scores
``[batch, beam]``, ranks ``scores[b, i] + log_softmax(logits[b, i])[t]`` over the
``beam * vocab`` candidates of each row and returns the ``k`` best as float32
values and flat int32 indices ``i * vocab + t``, sorted descending, ties broken
by the smaller index (the order of :func:`jax.lax.top_k`). One refinement on
the kernels: where float32 rounding maps two different logits of one beam onto
the same value, the larger logit comes first (the reference's own rounding may
order such a pair either way).

Backends: ``"xla"`` runs :func:`beam_topk_reference` (a full log-softmax and
``lax.top_k``); ``"cpu_ffi"``/``"cuda"`` call ``lsjax_beam_topk_{cpu,cuda}``.
The CUDA kernel takes two launches and no host synchronisation: one warp per
1024-token chunk of each (row, beam) computes the chunk's partial log-sum-exp
and its ``k`` best tokens by logit (within a beam, the ranking by logit is the
ranking by value); one block per row then combines the partials and takes the
exact top ``k`` of the few chunk-list entries that can still make it. Its
scratch is two extra outputs. Beyond its limits (``k > 64``, ``beam > 1024`` or
``beam * ceil(vocab / 1024) > 4096``) the ``"cuda"`` backend runs the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_shape
from lsjax.ops._rowwise import ROWS, rowwise

_F32 = jnp.float32

# CUDA kernel limits and chunk size (csrc/beam_topk.h: kBeamTopk*).
_CHUNK, _MAX_K, _MAX_BEAM, _MAX_LISTS = 1024, 64, 1024, 4096


def _cuda_supports(beam: int, vocab: int, k: int) -> bool:
    return k <= _MAX_K and beam <= _MAX_BEAM and beam * -(-vocab // _CHUNK) <= _MAX_LISTS


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
    if backend == "xla" or (backend == "cuda" and not _cuda_supports(beam, vocab, k)):
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
        out += _cuda_workspace(rows, beam, logits.shape[-1] // beam, k)
    values, indices, *_ = jax.ffi.ffi_call(_backend.ffi_target("beam_topk", backend), out)(
        logits.reshape(rows, beam, -1), scores.reshape(rows, beam))
    return values.reshape(lead + (k,)), indices.reshape(lead + (k,))


def _cuda_workspace(rows: int, beam: int, vocab: int, k: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Extra outputs the CUDA kernel uses as scratch (csrc/beam_topk.h: BeamTopkWorkspace)."""
    lists = beam * -(-vocab // _CHUNK)
    return (
        jax.ShapeDtypeStruct((rows, lists * k * 2), jnp.uint32),  # per chunk: k 64-bit token keys
        jax.ShapeDtypeStruct((rows, lists * 2), _F32),  # per chunk: (max, sum exp(x - max))
    )
