"""Decode attention: one query per row against a key/value cache, in one kernel.

A beam-search step attends one new token per row to the cache of keys and
values, ``[batch, k_len, heads, head_dim]``. Done as the training path does it
(score GEMM, a head transpose of the cache, softmax, value GEMM, another
transpose), that is five or more kernel launches per attention for a few
microseconds of work each; here it is one (FasterTransformer's
``masked_multihead_attention`` idea). Keys the mask excludes (the unfilled
cache, source padding) are not read.

:func:`decode_self_attention` is a self-attention decode step in the same kernel:
it also writes the step's key and value into the caches (in place, aliased to
its results), which saves the separate cache writes and query slice.

Cache indirection (FasterTransformer's ``cache_indirection``): with
``row_offsets``, key ``j`` of row ``b`` is read from row ``b + row_offsets[b, j]``
of the cache, so a beam search reorders a small int32 table instead of
gathering every cache leaf each step (see :func:`reorder_row_offsets`).

Backends: ``"xla"`` runs the ``*_reference`` functions; ``"cpu_ffi"`` /
``"cuda"`` call ``lsjax_decode_{,self_}attention_{cpu,cuda}``. The op is meant for
inference: its gradient (a ``custom_vjp``) recomputes through the reference.

Sharding: row-wise over the batch (:mod:`lsjax.ops._rowwise`); a batch-sharded
cache stays sharded.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_same_dtype, check_shape, static_scale
from lsjax.ops._rowwise import PARAM, ROWS, rowwise

_F32 = jnp.float32
_OP, _SELF_OP = "decode_attention", "decode_self_attention"

# CUDA kernel limits (csrc/decode_attention.h: kDecodeAttention*).
MAX_KEYS, MAX_HEAD_DIM = 8192, 512
_MASKED = np.iinfo(np.int32).min  # key_src of a key left out (kDecodeAttentionMasked)


def source_rows(x: jax.Array, row_offsets: jax.Array) -> jax.Array:
    """``x[b + row_offsets[b, j], j]`` for ``x [batch, k_len, ...]`` (rows clamped to ``[0, batch)``)."""
    batch, k_len = row_offsets.shape
    rows = jnp.clip(jnp.arange(batch, dtype=jnp.int32)[:, None] + row_offsets, 0, batch - 1)
    return x[rows, jnp.arange(k_len)[None, :]]


def reorder_row_offsets(row_offsets: jax.Array, parents: jax.Array, written: jax.Array | int) -> jax.Array:
    """The offsets table after a beam reorder: new row ``r`` continues row ``parents[r]``.

    ``row_offsets`` int32 ``[rows, k_len]``, ``parents`` int ``[rows]``, ``written`` int32 scalar:
    the number of keys written so far. Row ``r`` then reads every written key where row
    ``parents[r]`` read it; the entries from ``written`` on stay 0. A decode step reads its own
    key ``t`` from its own row (whatever the table says there), and later steps need
    ``row_offsets[:, t] == 0`` before the first reorder after step ``t``: a table that starts
    at zeros has that without a per-step write.
    """
    rows = jnp.arange(row_offsets.shape[0], dtype=jnp.int32)
    reordered = row_offsets[parents] + (parents.astype(jnp.int32) - rows)[:, None]
    return jnp.where(jnp.arange(row_offsets.shape[1]) < written, reordered, 0)


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
                               scale: float = 1.0, row_offsets: jax.Array | None = None) -> jax.Array:
    """Pure-JAX decode attention; same contract as :func:`decode_attention`."""
    if row_offsets is not None:
        k, v = source_rows(k, row_offsets), source_rows(v, row_offsets)
    s = jnp.einsum("bhd,bkhd->bhk", q.astype(_F32), k.astype(_F32)) * scale
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhk,bkhd->bhd", p, v.astype(_F32)).astype(q.dtype)


def decode_self_attention_reference(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, index: jax.Array,
                                    key_mask: jax.Array | None = None, *, scale: float = 1.0,
                                    row_offsets: jax.Array | None = None,
                                    causal: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pure-JAX decode self-attention step; same contract as :func:`decode_self_attention`."""
    batch, k_len = k_cache.shape[:2]
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, k_len - 1)
    if causal:
        written = jnp.broadcast_to(jnp.arange(k_len) <= index, (batch, k_len))
        key_mask = written if key_mask is None else key_mask & written
    k_cache = jax.lax.dynamic_update_slice(k_cache, qkv[:, None, 1], (0, index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, qkv[:, None, 2], (0, index, 0, 0))
    if row_offsets is not None:
        row_offsets = row_offsets.at[:, index].set(0)
    out = decode_attention_reference(qkv[:, 0], k_cache, v_cache, key_mask, scale=scale, row_offsets=row_offsets)
    return out, k_cache, v_cache


def _check_args(op: str, q: jax.ShapeDtypeStruct, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
                row_offsets: jax.Array | None) -> None:
    """The argument checks both ops share (``q``: the query's shape and dtype)."""
    if len(q.shape) != 3 or math.prod(q.shape) == 0:
        raise ValueError(f"{op}: q must be a non-empty [batch, heads, head_dim] array, got shape {q.shape}")
    check_float(op, "q", q)
    batch, heads, head_dim = q.shape
    if k.ndim != 4 or k.shape[0] != batch or k.shape[2:] != (heads, head_dim) or k.shape[1] == 0:
        raise ValueError(f"{op}: k must be [batch={batch}, k_len >= 1, heads={heads}, head_dim={head_dim}], "
                         f"got shape {k.shape}")
    check_shape(op, "v", v, k.shape)
    check_same_dtype(op, "k", k, q)
    check_same_dtype(op, "v", v, q)
    k_len = k.shape[1]
    if key_mask is not None:
        check_shape(op, "key_mask", key_mask, (batch, k_len))
        if key_mask.dtype != jnp.bool_:
            raise TypeError(f"{op}: key_mask must be bool (True = attend), got {key_mask.dtype}")
    if row_offsets is not None:
        check_shape(op, "row_offsets", row_offsets, (batch, k_len))
        if row_offsets.dtype != jnp.int32:
            raise TypeError(f"{op}: row_offsets must be int32, got {row_offsets.dtype}")
    if _backend.get_backend() == "cuda" and (k_len > MAX_KEYS or head_dim > MAX_HEAD_DIM):
        raise ValueError(f"{op}: the CUDA kernel takes k_len <= {MAX_KEYS} and head_dim <= {MAX_HEAD_DIM}, got "
                         f"k_len={k_len}, head_dim={head_dim}; use lsjax.nn.attention.dot_product_attention")


def _key_src(batch: int, k_len: int, key_mask: jax.Array | None, row_offsets: jax.Array | None) -> jax.Array:
    """The kernels' one int32 operand: each key's row offset, or ``_MASKED`` when left out."""
    key_src = jnp.zeros((batch, k_len), jnp.int32) if row_offsets is None else row_offsets
    return key_src if key_mask is None else jnp.where(key_mask, key_src, _MASKED)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
                     scale: float = 1.0, row_offsets: jax.Array | None = None) -> jax.Array:
    """``softmax(scale * q . k) @ v`` for one query per row, over the attended keys.

    Args:
      q: ``[batch, heads, head_dim]`` float32, float16 or bfloat16.
      k, v: ``[batch, k_len, heads, head_dim]``, ``q``'s dtype (a KV cache, or the
        projected encoder output for cross-attention).
      key_mask: optional bool ``[batch, k_len]``, True = attend (e.g. ``arange(k_len)
        <= step`` for a self-attention cache, source padding for cross-attention).
      scale: score scale, usually ``head_dim ** -0.5``.
      row_offsets: optional int32 ``[batch, k_len]``: key ``j`` of row ``b`` is read
        from row ``b + row_offsets[b, j]`` of ``k`` and ``v`` (clamped to
        ``[0, batch)``; under a batch-sharded mesh, offsets must stay within the
        local rows, as a beam search's do). None = every row reads its own.

    Returns:
      ``[batch, heads, head_dim]`` in ``q``'s dtype; scores, softmax and the
      weighted sum in float32; a row with no attended key gives zeros.

    Raises:
      ValueError / TypeError on bad shapes or dtypes; ValueError on the ``"cuda"``
      backend beyond ``k_len <= 8192`` or ``head_dim <= 512`` (use
      :func:`lsjax.nn.attention.dot_product_attention` there).
    """
    _check_args(_OP, q, k, v, key_mask, row_offsets)
    scale = static_scale(_OP, scale)
    backend = _backend.get_backend()
    if backend == "xla":
        return decode_attention_reference(q, k, v, key_mask, scale=scale, row_offsets=row_offsets)
    return _decode_attention(backend, scale, q, k, v, _key_src(*k.shape[:2], key_mask, row_offsets))


def decode_self_attention(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, index: jax.Array,
                          key_mask: jax.Array | None = None, *, scale: float = 1.0,
                          row_offsets: jax.Array | None = None,
                          causal: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One self-attention decode step: appends the step's key and value to the caches, then attends.

    Writes ``qkv[:, 1]`` / ``qkv[:, 2]`` into ``k_cache`` / ``v_cache`` at key position
    ``index``, then returns :func:`decode_attention` of the query ``qkv[:, 0]`` over the
    updated caches, where key ``index`` is always the row's own (its ``row_offsets``
    entry is taken as 0). One kernel: on the ``"cpu_ffi"``/``"cuda"`` backends the
    caches are aliased to the results (updated in place when the caller donates them or
    XLA can, as inside a decode loop).

    Args:
      qkv: ``[batch, 3, heads, head_dim]`` float32, float16 or bfloat16: the step's
        query, key and value (a packed QKV projection).
      k_cache, v_cache: ``[batch, k_len, heads, head_dim]`` in ``qkv``'s dtype.
      index: int32 scalar, the key position to write (clamped to ``[0, k_len)``, as
        ``lax.dynamic_update_slice`` clamps).
      key_mask, scale, row_offsets: as :func:`decode_attention` (the mask applies to the
        updated caches: attend key ``index`` by leaving it True).
      causal: also leave out the keys after ``index`` (the cache not yet written), as the
        mask ``arange(k_len) <= index`` would, without one: a decode loop then builds no
        mask per step, and the kernels do not visit those keys.

    Returns:
      ``(out [batch, heads, head_dim], k_cache, v_cache)``.
    """
    if qkv.ndim != 4 or qkv.shape[1] != 3:
        raise ValueError(f"{_SELF_OP}: qkv must be [batch, 3, heads, head_dim], got shape {qkv.shape}")
    batch, _, heads, head_dim = qkv.shape
    _check_args(_SELF_OP, jax.ShapeDtypeStruct((batch, heads, head_dim), qkv.dtype), k_cache, v_cache, key_mask,
                row_offsets)
    if jnp.shape(index) != () or not jnp.issubdtype(jnp.result_type(index), jnp.integer):
        raise TypeError(f"{_SELF_OP}: index must be an integer scalar, got {jnp.result_type(index)}{jnp.shape(index)}")
    scale = static_scale(_SELF_OP, scale)
    index = jnp.asarray(index, jnp.int32)  # clamped by the reference and the kernels alike
    backend = _backend.get_backend()
    if backend == "xla":
        return decode_self_attention_reference(qkv, k_cache, v_cache, index, key_mask, scale=scale,
                                               row_offsets=row_offsets, causal=causal)
    key_src = _key_src(*k_cache.shape[:2], key_mask, row_offsets)
    return _decode_self_attention(backend, scale, bool(causal), qkv, k_cache, v_cache, key_src, index)


def _mask_and_offsets(key_src: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``key_src`` back to the references' ``(key_mask, row_offsets)``."""
    return key_src != _MASKED, jnp.where(key_src == _MASKED, 0, key_src)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _decode_attention(backend: str, scale: float, q, k, v, key_src):
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731  rows = batch (see _decode_attention_ffi)
    return _decode_attention_ffi(backend, scale, q.shape[1], flat(q), flat(k), flat(v), key_src).reshape(q.shape)


def _fwd(backend, scale, q, k, v, key_src):
    return _decode_attention(backend, scale, q, k, v, key_src), (q, k, v, key_src)


def _bwd(backend, scale, residuals, g):
    q, k, v, key_src = residuals
    mask, offsets = _mask_and_offsets(key_src)
    _, vjp = jax.vjp(lambda q, k, v: decode_attention_reference(q, k, v, mask, scale=scale, row_offsets=offsets),
                     q, k, v)
    return (*vjp(g), None)


_decode_attention.defvjp(_fwd, _bwd)


@rowwise([ROWS, ROWS, ROWS, ROWS], [ROWS], n_static=3)
def _decode_attention_ffi(backend, scale, heads, q, k, v, key_src):
    """Local call on flattened rows: q ``[..., heads * head_dim]``, k/v ``[..., k_len * heads * head_dim]``,
    key_src ``[..., k_len]`` -> ``[..., heads * head_dim]``."""
    lead = q.shape[:-1]
    rows = math.prod(lead)
    k_len = key_src.shape[-1]
    head_dim = q.shape[-1] // heads
    out = jax.ffi.ffi_call(_backend.ffi_target(_OP, backend), jax.ShapeDtypeStruct((rows, heads, head_dim), q.dtype))(
        q.reshape(rows, heads, head_dim), k.reshape(rows, k_len, heads, head_dim),
        v.reshape(rows, k_len, heads, head_dim), key_src.reshape(rows, k_len), scale=np.float32(scale))
    return out.reshape(lead + (heads * head_dim,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode_self_attention(backend: str, scale: float, causal: bool, qkv, k_cache, v_cache, key_src, index):
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    out, k, v = _decode_self_attention_ffi(backend, scale, causal, qkv.shape[2], flat(qkv), flat(k_cache),
                                           flat(v_cache), key_src, index)
    return out.reshape(qkv.shape[:1] + qkv.shape[2:]), k.reshape(k_cache.shape), v.reshape(v_cache.shape)


def _self_fwd(backend, scale, causal, qkv, k_cache, v_cache, key_src, index):
    outs = _decode_self_attention(backend, scale, causal, qkv, k_cache, v_cache, key_src, index)
    return outs, (qkv, k_cache, v_cache, key_src, index)


def _self_bwd(backend, scale, causal, residuals, g):
    qkv, k_cache, v_cache, key_src, index = residuals
    mask, offsets = _mask_and_offsets(key_src)
    _, vjp = jax.vjp(lambda *a: decode_self_attention_reference(*a, index, mask, scale=scale, row_offsets=offsets,
                                                                causal=causal), qkv, k_cache, v_cache)
    return (*vjp(g), None, None)


_decode_self_attention.defvjp(_self_fwd, _self_bwd)


@rowwise([ROWS, ROWS, ROWS, ROWS, PARAM], [ROWS, ROWS, ROWS], n_static=4)
def _decode_self_attention_ffi(backend, scale, causal, heads, qkv, k_cache, v_cache, key_src, index):
    """Local call on flattened rows: qkv ``[..., 3 * heads * head_dim]``, caches ``[..., k_len * heads *
    head_dim]``, key_src ``[..., k_len]``, index ``[]`` -> (out ``[..., heads * head_dim]``, caches)."""
    lead = qkv.shape[:-1]
    rows = math.prod(lead)
    k_len = key_src.shape[-1]
    head_dim = qkv.shape[-1] // (3 * heads)
    cache = jax.ShapeDtypeStruct((rows, k_len, heads, head_dim), qkv.dtype)
    out, k, v = jax.ffi.ffi_call(
        _backend.ffi_target(_SELF_OP, backend),
        (jax.ShapeDtypeStruct((rows, heads, head_dim), qkv.dtype), cache, cache),
        input_output_aliases={1: 1, 2: 2})(
            qkv.reshape(rows, 3, heads, head_dim), k_cache.reshape(cache.shape), v_cache.reshape(cache.shape),
            key_src.reshape(rows, k_len), index, scale=np.float32(scale), causal=causal)
    return out.reshape(lead + (heads * head_dim,)), k.reshape(lead + (-1,)), v.reshape(lead + (-1,))
