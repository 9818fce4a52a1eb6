"""Fused attention softmax: scale, key-padding / causal masks, softmax, dropout.

Backends: ``"xla"`` runs :func:`attention_softmax_reference`; ``"cpu_ffi"`` /
``"cuda"`` run the FFI targets ``lsjax_attention_softmax_{fwd,bwd}_{cpu,cuda}``
under a ``jax.custom_vjp``.

What the backward saves: the input ``scores`` (which it holds anyway) and two
float32 statistics per row (the row max and ``1 / sum``), never ``y`` or ``p``.
The backward recomputes ``p`` from them bit-identically and regenerates the
dropout mask from the rng operand. Saving the output ``y = dropout(p)`` would
not be enough: where dropout zeroed ``y``, ``p`` is lost, yet the gradient
there, ``-scale * p * sum(g * p)``, is not zero. Saving ``p`` instead would
cost one more full-size write in the forward; the scores are free.

Sharding: a ``custom_partitioning`` with the Shardy rule
``b h q k, b k, r -> b h q k, b h q, b h q`` (``k`` and the rng operand
replicated). Batch, heads and queries may be sharded and stay sharded; each
block gets its global ``(b, h, q)`` origin so causal masking and the dropout
mask are exactly those of the unsharded op, however the scores are sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from lsjax.ops import _philox
from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_rank, static_scale

_F32 = jnp.float32
_OP = "attention_softmax"


def _valid(shape, key_padding_mask, causal):
    """bool, broadcastable to ``shape`` = [b, h, q, k]: True where a key is attended; None if all."""
    _, _, q, k = shape
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask[:, None, None, :]
    if causal:
        qi = jnp.arange(q)[:, None]
        kj = jnp.arange(k)[None, :]
        c = (kj <= qi + (k - q))[None, None]
        valid = c if valid is None else valid & c
    return valid


def _dropout_scale(rate: float) -> np.float32:
    """``1 / (1 - rate)`` rounded as the kernels compute it (float32 division)."""
    return np.float32(1) / (np.float32(1) - np.float32(rate))


def _f32_rate(rate: float) -> float:
    """The rate the kernels see (a float32 attribute); the reference uses the same value."""
    return float(np.float32(rate))


def attention_softmax_reference(scores: jax.Array, *, key_padding_mask: jax.Array | None = None,
                                causal: bool = False, scale: float = 1.0, dropout_rate: float = 0.0,
                                key: jax.Array | None = None) -> jax.Array:
    """Pure-JAX attention softmax with float32 math; same contract as :func:`attention_softmax`."""
    z = scores.astype(_F32) * _F32(scale)
    valid = _valid(scores.shape, key_padding_mask, causal)
    if valid is not None:
        z = jnp.where(valid, z, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    m = jnp.where(m == -jnp.inf, 0.0, m)  # no valid key: p = 0, never NaN
    e = jnp.exp(z - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(s > 0, s, 1.0)
    if key is not None and dropout_rate > 0:
        rate = _f32_rate(dropout_rate)
        keep = _philox.dropout_mask(_philox.rng_operand(key), scores.shape, rate)
        p = jnp.where(keep, p * _dropout_scale(rate), 0.0)
    return p.astype(scores.dtype)


def attention_softmax(scores: jax.Array, *, key_padding_mask: jax.Array | None = None,
                      causal: bool = False, scale: float = 1.0, dropout_rate: float = 0.0,
                      key: jax.Array | None = None) -> jax.Array:
    """Softmax over the key axis of attention scores, with masks and dropout.

    ``y = dropout(softmax(scale * scores, masked keys = -inf))``, all math in
    float32, output rounded to the input dtype.

    Args:
      scores: ``[batch, heads, q_len, k_len]`` float32, float16 or bfloat16
        (any ``k_len``: no length cap).
      key_padding_mask: optional bool ``[batch, k_len]``. **True = keep**
        (the query attends that key), **False = masked** (padding). Same for
        every head and query of a batch row.
      causal: query ``i`` attends key ``j`` iff ``j <= i + (k_len - q_len)``
        (bottom-right aligned: with ``q_len == k_len`` the usual lower
        triangle; incremental decoding with ``q_len == 1`` sees every key; if
        ``q_len > k_len`` the first ``q_len - k_len`` queries see no key).
        Combined with the padding mask by AND.
      scale: Python float multiplied into the scores before the softmax.
      dropout_rate: Python float in ``[0, 1)``; kept probabilities are scaled
        by ``1 / (1 - rate)``. Elements are dropped with probability
        ``floor(rate * 2**16) / 2**16`` (16 random bits per element).
      key: JAX PRNG key for dropout. Dropout is applied only when ``key`` is
        given and ``dropout_rate > 0`` (``key=None`` means deterministic /
        evaluation mode). The mask is Philox4x32-10 over the flat row-major
        index of the ``[batch, heads, q_len, k_len]`` output (see
        :mod:`lsjax.ops._philox`): bit-identical on every backend and under
        any sharding of the scores.

    Returns:
      ``[batch, heads, q_len, k_len]`` in ``scores``' dtype. A row whose keys
      are all masked is all zeros (never NaN), and so is its gradient.
    """
    check_rank(_OP, "scores", scores, 4)
    if np.ndim(scores) != 4:
        raise ValueError(f"{_OP}: scores must have rank 4 [batch, heads, q_len, k_len], got shape {tuple(scores.shape)}")
    check_float(_OP, "scores", scores)
    b, _, _, k = scores.shape
    if key_padding_mask is not None:
        if tuple(np.shape(key_padding_mask)) != (b, k):
            raise ValueError(f"{_OP}: key_padding_mask must have shape (batch, k_len) = {(b, k)}, "
                             f"got {tuple(np.shape(key_padding_mask))}")
        if jnp.dtype(key_padding_mask.dtype) != jnp.dtype(bool):
            raise TypeError(f"{_OP}: key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{_OP}: causal must be a Python bool, got {type(causal).__name__}")
    scale = static_scale(_OP, scale)
    _philox.check_rate(_OP, dropout_rate)
    dropout_rate = float(dropout_rate)
    backend = _backend.get_backend()
    if backend == "xla":
        return attention_softmax_reference(scores, key_padding_mask=key_padding_mask, causal=bool(causal),
                                           scale=scale, dropout_rate=dropout_rate, key=key)
    use_dropout = key is not None and dropout_rate > 0
    rng = _philox.rng_operand(key) if use_dropout else None
    statics = (bool(causal), scale, _f32_rate(dropout_rate) if use_dropout else 0.0, backend)
    return _attention_softmax_ffi(scores, key_padding_mask, rng, statics)


# ------------------------------------------------------------- FFI path --

def _ffi_attrs(statics, has_mask, heads_total, q_total):
    causal, scale, rate, _ = statics
    return dict(scale=np.float32(scale), rate=np.float32(rate), causal=bool(causal), has_mask=bool(has_mask),
                heads_total=np.int64(heads_total), q_total=np.int64(q_total))


def _dummies(mask, rng):
    """The FFI targets always take mask and rng; absent ones are tiny placeholders."""
    mask = jnp.zeros((1, 1), bool) if mask is None else mask
    rng = jnp.zeros((4,), jnp.uint32) if rng is None else rng
    return mask, rng


def _fwd_call(statics, x, mask, rng, origin, heads_total, q_total):
    has_mask = mask is not None
    mask, rng = _dummies(mask, rng)
    stats = jax.ShapeDtypeStruct(x.shape[:-1], _F32)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats)
    target = _backend.ffi_target("attention_softmax_fwd", statics[3])
    return jax.ffi.ffi_call(target, out)(x, mask, rng, origin, **_ffi_attrs(statics, has_mask, heads_total, q_total))


def _bwd_call(statics, dy, x, row_max, row_inv, mask, rng, origin, heads_total, q_total):
    has_mask = mask is not None
    mask, rng = _dummies(mask, rng)
    target = _backend.ffi_target("attention_softmax_bwd", statics[3])
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype))(
        dy, x, row_max, row_inv, mask, rng, origin, **_ffi_attrs(statics, has_mask, heads_total, q_total))


# Operand layouts: "s" = [b, h, q, k] (scores-like), "t" = [b, h, q] (row
# statistics), "m" = [b, k] (mask), "r" = uint32[4] (rng).
_FWD_IN, _FWD_OUT = ("s", "m", "r"), ("s", "t", "t")
_BWD_IN, _BWD_OUT = ("s", "s", "t", "t", "m", "r"), ("s",)
_DIMS = {"s": "b h q k", "t": "b h q", "m": "b k", "r": "r"}


def _present(kinds, has_mask, has_rng):
    return tuple(k for k in kinds if (k != "m" or has_mask) and (k != "r" or has_rng))


def _split(kinds, arrays):
    """Named view of the present operands."""
    it = iter(arrays)
    return [next(it) if present else None for present in kinds]


def _local(is_fwd, statics, has_mask, has_rng, arrays, origin, heads_total, q_total):
    full_kinds = _FWD_IN if is_fwd else _BWD_IN
    present = [(k != "m" or has_mask) and (k != "r" or has_rng) for k in full_kinds]
    ops = _split(present, arrays)
    if is_fwd:
        x, mask, rng = ops
        return _fwd_call(statics, x, mask, rng, origin, heads_total, q_total)
    dy, x, row_max, row_inv, mask, rng = ops
    return _bwd_call(statics, dy, x, row_max, row_inv, mask, rng, origin, heads_total, q_total)


def _unsharded(is_fwd, statics, has_mask, has_rng, *arrays):
    x = arrays[0]
    origin = jnp.zeros((3,), jnp.int32)
    return _local(is_fwd, statics, has_mask, has_rng, arrays, origin, x.shape[1], x.shape[2])


def _spec3(shape) -> tuple:
    """Partition spec entries of (b, h, q) of a scores-like operand."""
    sharding = shape.sharding
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    spec = spec + (None,) * (4 - len(spec))
    return spec[:3]


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _shardings(mesh, kinds, spec3):
    b, h, q = spec3
    specs = {"s": PartitionSpec(b, h, q, None), "t": PartitionSpec(b, h, q), "m": PartitionSpec(b, None),
             "r": PartitionSpec()}
    return tuple(NamedSharding(mesh, specs[k]) for k in kinds)


def _make_partitioned(is_fwd: bool):
    fn = custom_partitioning(functools.partial(_unsharded, is_fwd), static_argnums=(0, 1, 2))
    in_kinds, out_kinds = (_FWD_IN, _FWD_OUT) if is_fwd else (_BWD_IN, _BWD_OUT)

    def infer(statics, has_mask, has_rng, mesh, arg_shapes, result_shape):
        results = _shardings(mesh, out_kinds, _spec3(arg_shapes[0]))
        return results if is_fwd else results[0]

    def partition(statics, has_mask, has_rng, mesh, arg_shapes, result_shape):
        spec3 = _spec3(arg_shapes[0])
        kinds = _present(in_kinds, has_mask, has_rng)
        arg_shardings = _shardings(mesh, kinds, spec3)
        results = _shardings(mesh, out_kinds, spec3)
        _, heads_total, q_total, _ = arg_shapes[0].shape  # global shapes

        def lower(*arrays):
            local = arrays[0].shape
            origin = []
            for dim, entry in enumerate(spec3):
                index = jnp.int32(0)
                for axis in _axes(entry):
                    index = index * mesh.shape[axis] + jax.lax.axis_index(axis).astype(jnp.int32)
                origin.append(index * local[dim])
            return _local(is_fwd, statics, has_mask, has_rng, arrays, jnp.stack(origin), heads_total, q_total)

        return mesh, lower, (results if is_fwd else results[0]), arg_shardings

    def sharding_rule(statics, has_mask, has_rng, mesh, value_types, result_types):
        ins = ", ".join(_DIMS[k] for k in _present(in_kinds, has_mask, has_rng))
        outs = ", ".join(_DIMS[k] for k in out_kinds)
        replicated = ("k", "r") if has_rng else ("k",)
        return f"{ins} -> {outs}", {"need_replication_factors": replicated}

    fn.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule)
    return fn


_fwd_partitioned = _make_partitioned(True)
_bwd_partitioned = _make_partitioned(False)


def _with_vmap(partitioned, statics, kinds, arrays):
    """Calls ``partitioned`` with a vmap rule: a mapped axis is folded into the batch dim."""
    has_mask, has_rng = "m" in kinds, "r" in kinds
    f = lambda *a: partitioned(statics, has_mask, has_rng, *a)
    wrapped = jax.custom_batching.custom_vmap(f)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *a):
        if has_rng:
            # Every instance must draw the mask of an unbatched call with its key.
            batched = [x for x, b in zip(a, in_batched) if b]

            def one(xs):
                it = iter(xs)
                return f(*(next(it) if b else x for x, b in zip(a, in_batched)))

            outs = jax.lax.map(one, batched)
        else:
            merged = []
            for x, b in zip(a, in_batched):
                x = x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
                merged.append(x.reshape(axis_size * x.shape[1], *x.shape[2:]))
            outs = f(*merged)
            outs = jax.tree.map(lambda o: o.reshape(axis_size, o.shape[0] // axis_size, *o.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return wrapped(*arrays)


def _fwd(statics, x, mask, rng):
    kinds = _present(_FWD_IN, mask is not None, rng is not None)
    arrays = [a for a in (x, mask, rng) if a is not None]
    return _with_vmap(_fwd_partitioned, statics, kinds, arrays)


def _bwd(statics, dy, x, row_max, row_inv, mask, rng):
    kinds = _present(_BWD_IN, mask is not None, rng is not None)
    arrays = [a for a in (dy, x, row_max, row_inv, mask, rng) if a is not None]
    return _with_vmap(_bwd_partitioned, statics, kinds, arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_softmax_ffi(x, mask, rng, statics):
    return _attention_softmax_ffi_fwd(x, mask, rng, statics)[0]


def _attention_softmax_ffi_fwd(x, mask, rng, statics):
    y, row_max, row_inv = _fwd(statics, x, mask, rng)
    return y, (x, row_max, row_inv, mask, rng)


def _attention_softmax_ffi_bwd(statics, saved, dy):
    x, row_max, row_inv, mask, rng = saved
    return _bwd(statics, dy, x, row_max, row_inv, mask, rng), None, None


_attention_softmax_ffi.defvjp(_attention_softmax_ffi_fwd, _attention_softmax_ffi_bwd)
