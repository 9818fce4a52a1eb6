"""Fused bias + dropout + residual add (``residual + dropout(x + bias)``), and plain dropout.

Backends: ``"xla"`` runs :func:`bias_dropout_residual_reference`;
``"cpu_ffi"``/``"cuda"`` run the FFI targets
``lsjax_bias_dropout_residual_{fwd,bwd}_{cpu,cuda}`` under a ``jax.custom_vjp``
that saves only the ``uint32[4]`` rng operand: the backward regenerates the
Philox mask (``csrc/philox.h``; element index = flat index into the output)
instead of storing it. ``dbias`` is a deterministic column sum (float32, rounded once).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._bias_dropout import dropout_reference as _dropout32
from lsjax.ops._bias_dropout import dbias_call, dropout_rng, dropout_rowwise, ffi, like
from lsjax.ops._checks import check_float, check_rank, check_same_dtype, check_shape
from lsjax.ops._rowwise import COL_SUM, COLS, ROWS, param_operands

_F32 = jnp.float32


def bias_dropout_residual_reference(x: jax.Array, bias: jax.Array, residual: jax.Array, *, rate: float,
                                    key: jax.Array | None) -> jax.Array:
    """Pure-JAX float32 ``residual + dropout(x + bias)``; same contract as :func:`bias_dropout_residual`."""
    v = _dropout32(x.astype(_F32) + bias.astype(_F32), rate, key)
    return (residual.astype(_F32) + v).astype(x.dtype)


def bias_dropout_residual(x: jax.Array, bias: jax.Array, residual: jax.Array, *, rate: float,
                          key: jax.Array | None) -> jax.Array:
    """``residual + dropout(x + bias)`` in one pass (float32 math, one rounding).

    Args:
      x: ``[..., hidden]`` float32, float16 or bfloat16 (any hidden size).
      bias: ``[hidden]`` of any float dtype (math in float32; read as it is in ``x``'s
        dtype, else converted to float32 first).
      residual: same shape and dtype as ``x``.
      rate: dropout probability in ``[0, 1)``; kept values are scaled by ``1 / (1 - rate)``.
      key: a JAX PRNG key, or None for no dropout (as ``rate == 0``: deterministic).

    Returns:
      ``y`` of ``x``'s shape and dtype. Element ``e`` (flat row-major index) is
      dropped iff the Philox stream of ``key`` says so (``lsjax.ops._philox``),
      identically on every backend, with probability ``floor(rate * 2**16) /
      2**16`` (16 random bits per element). Gradients: ``dx = mask * dy / (1 - rate)``,
      ``dbias = sum over rows of dx`` (summed in float32, rounded once to ``bias.dtype``),
      ``dresidual = dy``.
    """
    op = "bias_dropout_residual"
    check_rank(op, "x", x, 1)
    check_float(op, "x", x)
    hidden = x.shape[-1]
    check_shape(op, "bias", bias, (hidden,))
    check_float(op, "bias", bias)
    check_shape(op, "residual", residual, x.shape)
    check_same_dtype(op, "residual", residual, x)
    rate, rng = dropout_rng(op, rate, key)
    backend = _backend.get_backend()
    if backend == "xla":
        return bias_dropout_residual_reference(x, bias, residual, rate=rate, key=key if rate > 0 else None)
    return _bdr_ffi(x, bias, residual, rng, rate, backend)


def dropout_reference(x: jax.Array, *, rate: float, key: jax.Array | None) -> jax.Array:
    """Pure-JAX dropout with the Philox mask; same contract as :func:`dropout`."""
    return _dropout32(x.astype(_F32), rate, key).astype(x.dtype)


def dropout(x: jax.Array, *, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: ``mask * x / (1 - rate)``.

    Args:
      x: any shape of rank >= 1, float32, float16 or bfloat16.
      rate: dropout probability in ``[0, 1)``.
      key: a JAX PRNG key, or None for no dropout (returns ``x``).

    Returns:
      ``x``'s shape and dtype; the mask is the one :func:`bias_dropout_residual`
      draws for the same key and shape (flat element index into ``x``).
    """
    op = "dropout"
    check_rank(op, "x", x, 1)
    check_float(op, "x", x)
    rate, rng = dropout_rng(op, rate, key)
    if rng is None:
        return x
    backend = _backend.get_backend()
    if backend == "xla":
        return dropout_reference(x, rate=rate, key=key)
    return _dropout_ffi(x, rng, rate, backend)


# ------------------------------------------------------------- FFI path --

@dropout_rowwise([ROWS, COLS, ROWS], [ROWS], n_static=2)
def _fwd(rate, backend, row_stride, x, bias, residual, rng):
    return ffi("bias_dropout_residual_fwd", backend, like(x), x, bias, residual, rng, rate=np.float32(rate),
               row_stride=np.int64(row_stride))


@dropout_rowwise([ROWS], [ROWS, COL_SUM], n_static=3)
def _bwd(rate, backend, dbias_dtype, row_stride, dy, rng):
    return dbias_call("bias_dropout_residual_bwd", backend, dbias_dtype, dy, rng, rate=np.float32(rate),
                      row_stride=np.int64(row_stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _bdr_ffi(x, bias, residual, rng, rate, backend):
    return _fwd(rate, backend, x, *param_operands(x, bias), residual, rng)


def _bdr_ffi_fwd(x, bias, residual, rng, rate, backend):
    y = _fwd(rate, backend, x, *param_operands(x, bias), residual, rng)
    # The backward needs only the mask (regenerated from rng) and bias's dtype.
    return y, (rng, jnp.zeros((0,), bias.dtype))


def _bdr_ffi_bwd(rate, backend, saved, dy):
    rng, bias_like = saved
    dbias_dtype = param_operands(dy, bias_like)[0].dtype
    dx, dbias = _bwd(rate, backend, dbias_dtype, dy, rng)
    return dx, dbias.astype(bias_like.dtype), dy, None


_bdr_ffi.defvjp(_bdr_ffi_fwd, _bdr_ffi_bwd)


@dropout_rowwise([ROWS], [ROWS], n_static=2)
def _dropout_fwd(rate, backend, row_stride, x, rng):
    return ffi("dropout_fwd", backend, like(x), x, rng, rate=np.float32(rate), row_stride=np.int64(row_stride))


@dropout_rowwise([ROWS], [ROWS], n_static=2)
def _dropout_bwd(rate, backend, row_stride, dy, rng):
    return ffi("dropout_bwd", backend, like(dy), dy, rng, rate=np.float32(rate), row_stride=np.int64(row_stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dropout_ffi(x, rng, rate, backend):
    return _dropout_fwd(rate, backend, x, rng)


def _dropout_ffi_fwd(x, rng, rate, backend):
    return _dropout_fwd(rate, backend, x, rng), rng


def _dropout_ffi_bwd(rate, backend, rng, dy):
    return _dropout_bwd(rate, backend, dy, rng), None


_dropout_ffi.defvjp(_dropout_ffi_fwd, _dropout_ffi_bwd)
