"""Fused softmax cross-entropy with label smoothing and an ignored (padding) label.

Backends: ``"xla"`` runs :func:`cross_entropy_reference`; ``"cpu_ffi"``/``"cuda"``
run the FFI targets ``lsjax_cross_entropy_{fwd,bwd}_{cpu,cuda}`` under a
``jax.custom_vjp`` that saves only the per-row log-sum-exp (float32 ``[...]``)
next to the logits and labels it already holds. The forward reads the 16-bit
logits once per row (streaming log-sum-exp, the label's logit, the sum of the
logits); the backward recomputes the softmax from the logits and writes
``dlogits`` in the logits' dtype. No float32 ``[tokens, vocab]`` tensor exists
on the FFI path.

Vocab-parallel (tensor parallelism): when the logits' last dim is sharded
over mesh axes, the FFI path never gathers them. Each shard takes the max, the
sum of exponentials, the sum of logits and (on the shard owning it) the
label's logit of its block, combined by ``pmax``/``psum`` over those axes:
the collectives move ``O(tokens)`` floats, not ``O(tokens * vocab)``. The
backward is local: ``(softmax - q) * dloss`` on each block. The ``"xla"``
reference partitions the same way by itself (XLA splits its reductions).

Label smoothing follows fairseq / LightSeq: the target distribution is
``q = (1 - eps) * onehot(label) + eps / V``, so
``loss = (1 - eps) * nll + eps * mean_c(-log p_c)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_rank, check_shape
from lsjax.ops._rowwise import ROWS, STATS, DimShard, rowwise

_F32 = jnp.float32
_INT32 = np.iinfo(np.int32)

try:
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover - should jax.core stop exporting it
    from jax._src.core import Tracer as _Tracer


def cross_entropy_reference(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                            ignore_id: int = -1) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX (optax-style ``log_softmax`` in float32) twin of :func:`cross_entropy`.

    Same contract, including NaN loss and gradients for labels outside
    ``[0, vocab)`` that are not ``ignore_id``. This is also the XLA baseline
    of the benchmarks: it materialises the float32 log-probabilities.
    """
    vocab = logits.shape[-1]
    eps = label_smoothing
    labels = labels.astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(_F32), axis=-1)
    target = (1.0 - eps) * jax.nn.one_hot(labels, vocab, dtype=_F32) + eps / vocab
    loss = -jnp.sum(target * logp, axis=-1)
    return _mask_rows(loss, labels, vocab, ignore_id), _count(labels, ignore_id)


def _mask_rows(per_row: jax.Array, labels: jax.Array, vocab: int, ignore_id: int) -> jax.Array:
    """0 where ``labels == ignore_id``, NaN where a label is outside ``[0, vocab)``."""
    valid = labels != ignore_id
    in_range = (labels >= 0) & (labels < vocab)
    # A product (not a select) so that the gradients of a bad row are NaN too.
    per_row = per_row * jnp.where(valid & ~in_range, jnp.nan, 1.0).astype(_F32)
    return jnp.where(valid, per_row, 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                  ignore_id: int = -1) -> tuple[jax.Array, jax.Array]:
    """Per-token softmax cross-entropy with label smoothing, ignoring padding.

    Args:
      logits: ``[..., vocab]`` float32, float16 or bfloat16 (any vocab size).
      labels: integer ``[...]`` (the leading dims of ``logits``), used as int32.
        Tokens whose label equals ``ignore_id`` are ignored.
      label_smoothing: ``eps`` in ``[0, 1]``; the target distribution is
        ``(1 - eps) * onehot(label) + eps / vocab`` (fairseq / LightSeq).
      ignore_id: the padding label (any int32; may lie inside ``[0, vocab)``).

    Returns:
      ``(loss, count)``: ``loss`` is float32 ``[...]``, the per-token loss
      ``-sum_c q_c log softmax(logits)_c``, 0 where ``labels == ignore_id``;
      ``count`` is an int32 scalar, the number of non-ignored tokens (so the
      mean loss is ``loss.sum() / jnp.maximum(count, 1)``). Only ``loss`` is
      differentiable (w.r.t. ``logits``; ``dlogits`` has the logits' dtype
      and is 0 on ignored tokens).

    Labels outside ``[0, vocab)`` that are not ``ignore_id`` raise
    ``ValueError`` when ``labels`` is concrete. Inside ``jit``/``vmap`` they
    cannot be checked: such a token's loss and its row of ``dlogits`` are NaN
    (on every backend), so the bad label surfaces instead of being skipped.
    """
    op = "cross_entropy"
    check_rank(op, "logits", logits, 1)
    check_float(op, "logits", logits)
    check_shape(op, "labels", labels, logits.shape[:-1])
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{op}: labels must be an integer array, got {labels.dtype}")
    if isinstance(label_smoothing, _Tracer) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be a Python float in [0, 1], got {label_smoothing}")
    if isinstance(ignore_id, _Tracer) or not _INT32.min <= int(ignore_id) <= _INT32.max:
        raise ValueError(f"{op}: ignore_id must be a Python int in the int32 range, got {ignore_id}")
    vocab = logits.shape[-1]
    if vocab > _INT32.max:
        raise ValueError(f"{op}: vocab {vocab} does not fit int32 labels")
    _check_labels(op, labels, vocab, int(ignore_id))
    eps, ignore_id = float(label_smoothing), int(ignore_id)
    backend = _backend.get_backend()
    if backend == "xla":
        return cross_entropy_reference(logits, labels, label_smoothing=eps, ignore_id=ignore_id)
    labels = labels.astype(jnp.int32)
    if logits.ndim == 1:  # one row: give the kernel a row axis
        loss = _cross_entropy_ffi(logits[None], labels[None], eps, ignore_id, backend)[0]
    else:
        loss = _cross_entropy_ffi(logits, labels, eps, ignore_id, backend)
    return loss, _count(labels, ignore_id)


def _count(labels: jax.Array, ignore_id: int) -> jax.Array:
    # Plain jnp: XLA partitions the reduction itself (local sums + all-reduce).
    return jnp.sum(labels != ignore_id, dtype=jnp.int32)


def _check_labels(op: str, labels, vocab: int, ignore_id: int) -> None:
    """ValueError for out-of-range labels, when their values are known here."""
    if isinstance(labels, _Tracer):
        return  # inside jit/vmap/grad: the kernels return NaN for such tokens
    if isinstance(labels, jax.Array) and not labels.is_fully_addressable:
        return
    values = np.asarray(labels)
    bad = (values != ignore_id) & ((values < 0) | (values >= vocab))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{op}: {int(bad.sum())} label(s) outside [0, {vocab}) that are not ignore_id={ignore_id}; "
            f"first at index {where}: {int(values[where])}"
        )


# ------------------------------------------------------------- FFI path --

def _attrs(eps, ignore_id):
    return {"label_smoothing": np.float32(eps), "ignore_id": np.int32(ignore_id)}


def _vocab_parallel_fwd(shard: DimShard, eps, ignore_id, backend, logits, labels):
    """Forward on a ``[..., vocab / shard.count]`` block; (loss, lse) of the whole rows."""
    block = logits.shape[-1]
    vocab = block * shard.count
    x = logits.astype(_F32)
    row_max = jax.lax.pmax(jnp.max(x, axis=-1), shard.axes)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(x - row_max[..., None]), axis=-1), shard.axes)
    lse = row_max + jnp.log(sum_exp)
    local, owned = shard.local(labels, block)
    picked = jnp.take_along_axis(x, jnp.clip(local, 0, block - 1)[..., None], axis=-1)[..., 0]
    label_logit, sum_logits = jax.lax.psum((jnp.where(owned, picked, 0.0), jnp.sum(x, axis=-1)), shard.axes)
    loss = (1.0 - eps) * (lse - label_logit) + eps * (lse - sum_logits / vocab)
    return _mask_rows(loss, labels, vocab, ignore_id), lse


def _vocab_parallel_bwd(shard: DimShard, eps, ignore_id, backend, logits, labels, lse, dloss):
    """Backward on a vocab block: ``(softmax - q) * dloss``, no communication."""
    block = logits.shape[-1]
    vocab = block * shard.count
    local, owned = shard.local(labels, block)
    onehot = (jnp.arange(block, dtype=jnp.int32) == local[..., None]) & owned[..., None]
    target = (1.0 - eps) * onehot.astype(_F32) + eps / vocab
    probs = jnp.exp(logits.astype(_F32) - lse[..., None])
    return ((probs - target) * _mask_rows(dloss, labels, vocab, ignore_id)[..., None]).astype(logits.dtype)


@rowwise([ROWS, STATS], [STATS, STATS], n_static=3, split_last=_vocab_parallel_fwd)
def _fwd(eps, ignore_id, backend, logits, labels):
    stats = jax.ShapeDtypeStruct(labels.shape, _F32)
    return jax.ffi.ffi_call(_backend.ffi_target("cross_entropy_fwd", backend), (stats, stats))(
        logits, labels, **_attrs(eps, ignore_id))


@rowwise([ROWS, STATS, STATS, STATS], [ROWS], n_static=3, split_last=_vocab_parallel_bwd)
def _bwd(eps, ignore_id, backend, logits, labels, lse, dloss):
    out = jax.ShapeDtypeStruct(logits.shape, logits.dtype)
    return jax.ffi.ffi_call(_backend.ffi_target("cross_entropy_bwd", backend), out)(
        logits, labels, lse, dloss, **_attrs(eps, ignore_id))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cross_entropy_ffi(logits, labels, eps, ignore_id, backend):
    return _fwd(eps, ignore_id, backend, logits, labels)[0]


def _cross_entropy_ffi_fwd(logits, labels, eps, ignore_id, backend):
    loss, lse = _fwd(eps, ignore_id, backend, logits, labels)
    return loss, (logits, labels, lse)


def _cross_entropy_ffi_bwd(eps, ignore_id, backend, saved, dloss):
    logits, labels, lse = saved
    dlogits = _bwd(eps, ignore_id, backend, logits, labels, lse, dloss.astype(_F32))
    return dlogits, None


_cross_entropy_ffi.defvjp(_cross_entropy_ffi_fwd, _cross_entropy_ffi_bwd)
