"""Fused layer norm (optionally with the pre-LN residual add).

Backends: ``"xla"`` runs :func:`layer_norm_reference`; ``"cpu_ffi"``/``"cuda"``
run the FFI targets ``lsjax_layer_norm[_residual]_{fwd,bwd}_{cpu,cuda}`` under
a ``jax.custom_vjp`` that saves only the per-row ``mean``/``rstd`` (float32)
next to the input it already holds. Statistics are two-pass (mean, then
centred variance) in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_rank, check_same_dtype, check_shape
from lsjax.ops._rowwise import PARAM, ROW_SUM, ROWS, STATS, param_operands, rowwise

_F32 = jnp.float32


def layer_norm_reference(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float = 1e-5,
                         residual: jax.Array | None = None):
    """Pure-JAX layer norm with float32 statistics; same contract as :func:`layer_norm`."""
    # With a residual, normalise the rounded sum, as an unfused `layer_norm(x + r)`.
    z = x if residual is None else (x.astype(_F32) + residual.astype(_F32)).astype(x.dtype)
    z32 = z.astype(_F32)
    mean = jnp.mean(z32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z32 - mean), axis=-1, keepdims=True)
    y = (z32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(_F32) + bias.astype(_F32)
    y = y.astype(x.dtype)
    return y if residual is None else (y, z)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float = 1e-5,
               residual: jax.Array | None = None):
    """Layer norm over the last axis, optionally of ``x + residual``.

    Args:
      x: ``[..., hidden]`` float32, float16 or bfloat16 (any hidden size).
      scale, bias: ``[hidden]`` of any float dtype (math in float32; read as they are
        when both are in ``x``'s dtype, else converted to float32 first).
      eps: added to the variance.
      residual: optional, same shape and dtype as ``x``.

    Returns:
      ``y`` of ``x``'s shape and dtype; with ``residual``, ``(y, x + residual)``
      so a pre-LN block gets its residual stream from the same pass.
    """
    op = "layer_norm"
    check_rank(op, "x", x, 1)
    check_float(op, "x", x)
    hidden = x.shape[-1]
    check_shape(op, "scale", scale, (hidden,))
    check_shape(op, "bias", bias, (hidden,))
    check_float(op, "scale", scale)
    check_float(op, "bias", bias)
    if residual is not None:
        check_shape(op, "residual", residual, x.shape)
        check_same_dtype(op, "residual", residual, x)
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    backend = _backend.get_backend()
    if backend == "xla":
        return layer_norm_reference(x, scale, bias, eps=eps, residual=residual)
    return _layer_norm_ffi(x, residual, scale, bias, float(eps), backend)


# ------------------------------------------------------------- FFI path --

def _stats_shape(x):
    return jax.ShapeDtypeStruct(x.shape[:-1], _F32)


@rowwise([ROWS, PARAM, PARAM], [ROWS, STATS, STATS], n_static=2)
def _fwd(eps, backend, x, scale, bias):
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), _stats_shape(x), _stats_shape(x))
    return jax.ffi.ffi_call(_backend.ffi_target("layer_norm_fwd", backend), out)(
        x, scale, bias, eps=np.float32(eps))


@rowwise([ROWS, ROWS, PARAM, PARAM], [ROWS, ROWS, STATS, STATS], n_static=2)
def _residual_fwd(eps, backend, x, residual, scale, bias):
    like = jax.ShapeDtypeStruct(x.shape, x.dtype)
    out = (like, like, _stats_shape(x), _stats_shape(x))
    return jax.ffi.ffi_call(_backend.ffi_target("layer_norm_residual_fwd", backend), out)(
        x, residual, scale, bias, eps=np.float32(eps))


# Rows of the backward's float32 [2, min(rows, _MAX_PARTIALS), hidden]
# workspace for deterministic column sums (csrc: kLayerNormBwdMaxPartials).
_MAX_PARTIALS = 512


def _grad_call(target, z, scale, *args):
    """``(dz, dscale, dbias)`` of ``target(*args)``, the two sums in ``scale``'s dtype."""
    rows = math.prod(z.shape[:-1])
    vec = jax.ShapeDtypeStruct(z.shape[-1:], scale.dtype)
    partials = jax.ShapeDtypeStruct((2, min(rows, _MAX_PARTIALS), z.shape[-1]), _F32)
    dz, dscale, dbias, _ = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct(z.shape, z.dtype), vec, vec, partials))(
        *args)
    return dz, dscale, dbias


@rowwise([ROWS, ROWS, PARAM, STATS, STATS], [ROWS, ROW_SUM, ROW_SUM], n_static=1)
def _bwd(backend, dy, x, scale, mean, rstd):
    return _grad_call(_backend.ffi_target("layer_norm_bwd", backend), x, scale, dy, x, scale, mean, rstd)


@rowwise([ROWS, ROWS, ROWS, PARAM, STATS, STATS], [ROWS, ROW_SUM, ROW_SUM], n_static=1)
def _residual_bwd(backend, dy, dz, z, scale, mean, rstd):
    return _grad_call(_backend.ffi_target("layer_norm_residual_bwd", backend), z, scale, dy, dz, z, scale, mean,
                      rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _layer_norm_ffi(x, residual, scale, bias, eps, backend):
    return _layer_norm_ffi_fwd(x, residual, scale, bias, eps, backend)[0]


def _layer_norm_ffi_fwd(x, residual, scale, bias, eps, backend):
    scale_in, bias_in = param_operands(x, scale, bias)
    if residual is None:
        y, mean, rstd = _fwd(eps, backend, x, scale_in, bias_in)
        return y, (x, scale, bias, mean, rstd)
    y, z, mean, rstd = _residual_fwd(eps, backend, x, residual, scale_in, bias_in)
    return (y, z), (z, scale, bias, mean, rstd)


def _layer_norm_ffi_bwd(eps, backend, saved, cotangent):
    z, scale, bias, mean, rstd = saved
    scale_in, _ = param_operands(z, scale, bias)
    if isinstance(cotangent, tuple):  # residual form: cotangents of (y, z)
        dy, dz_out = cotangent
        dz, dscale, dbias = _residual_bwd(backend, dy, dz_out, z, scale_in, mean, rstd)
        return dz, dz, dscale.astype(scale.dtype), dbias.astype(bias.dtype)
    dx, dscale, dbias = _bwd(backend, cotangent, z, scale_in, mean, rstd)
    return dx, None, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_layer_norm_ffi.defvjp(_layer_norm_ffi_fwd, _layer_norm_ffi_bwd)
