"""Decode-step dense layer: ``act(layer_norm(x) @ kernel + bias) + residual`` in one kernel.

A beam-search step multiplies a few rows (``batch * beam``, e.g. 32) by each weight
matrix. XLA runs such a GEMM as a split-K Triton GEMM writing float32 partials
and a second kernel that sums them and applies the bias, activation, residual
add or the next layer norm: two launches of a few microseconds each, six times
per decoder layer. Here one kernel does it all (LightSeq / FasterTransformer
fuse the same way): it normalises its rows in shared memory (optional layer
norm), multiplies them by a tile of ``kernel`` on the tensor cores with float32
accumulation, and applies the epilogue before the only write.

Measured (H100, transformer-base beam search at batch 8, 32 rows): the kernel is
latency-bound at 5.6 us (N = 512 / 1536) to 8.1 us (the FFN's) a launch, against 3.5-6 us
for XLA's GEMM + fusion pair, so the whole search ran slower with it (24.9 vs 19.7 ms):
the layers use it only with ``decode_dense_impl="fused"`` (each block redoes the layer
norm of all rows; sharing it across a thread-block cluster is the next step).

Semantics (the reference, :func:`decode_dense_reference`): ``a = layer_norm(x)``
rounded to ``x``'s dtype (float32 statistics, as :func:`lsjax.ops.layer_norm`),
or ``x``; ``acc = a @ kernel`` accumulated in float32; ``y = act(acc + bias)``
then ``y + residual``, all in float32, rounded once to ``x``'s dtype.

Backends: ``"xla"`` runs the reference; ``"cpu_ffi"`` / ``"cuda"`` call
``lsjax_decode_dense_{cpu,cuda}``. The CUDA kernel takes float16 / bfloat16 and up
to :data:`MAX_ROWS` rows (a decode step's); beyond that, or in float32, the
``"cuda"`` backend runs the reference (XLA's GEMMs are the right tool there).
The op is meant for inference: its gradient (a ``custom_vjp``) goes through the
reference.

Sharding: row-wise (:mod:`lsjax.ops._rowwise`); ``kernel`` and the vectors are
read whole by every row block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._checks import check_float, check_same_dtype, check_shape
from lsjax.ops._rowwise import PARAM, ROWS, rowwise
from lsjax.ops.bias_act_dropout import ACTIVATIONS, apply_activation
from lsjax.ops.layer_norm import layer_norm_reference

_F32 = jnp.float32
_OP = "decode_dense"
MAX_ROWS = 64  # CUDA kernel limit (csrc/decode_dense.h: kDecodeDenseMaxRows)
_ACTIVATIONS = {"none": 0, **ACTIVATIONS}


def decode_dense_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, ln_scale: jax.Array | None = None,
                           ln_bias: jax.Array | None = None, eps: float = 1e-5, activation: str = "none",
                           residual: jax.Array | None = None) -> jax.Array:
    """Pure-JAX decode dense; same contract as :func:`decode_dense`."""
    a = x if ln_scale is None else layer_norm_reference(x, ln_scale, ln_bias, eps=eps)
    acc = jnp.dot(a, kernel, preferred_element_type=_F32)
    y = acc + bias.astype(_F32)
    if activation != "none":
        y = apply_activation(activation, y)
    if residual is not None:
        y = residual.astype(_F32) + y
    return y.astype(x.dtype)


def decode_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, ln_scale: jax.Array | None = None,
                 ln_bias: jax.Array | None = None, eps: float = 1e-5, activation: str = "none",
                 residual: jax.Array | None = None) -> jax.Array:
    """``act(layer_norm(x) @ kernel + bias) + residual`` for a decode step's few rows, in one kernel.

    Args:
      x: ``[rows, in_features]`` float32, float16 or bfloat16.
      kernel: ``[in_features, out_features]``, ``x``'s dtype.
      bias: ``[out_features]``, any float dtype (used in float32).
      ln_scale, ln_bias: both or neither, ``[in_features]`` (float32 use): layer-normalise
        ``x`` first (``eps`` added to the variance).
      activation: ``"none"``, ``"relu"``, ``"gelu"`` (erf form) or ``"gelu_tanh"``.
      residual: optional ``[rows, out_features]`` in ``x``'s dtype, added after the activation.

    Returns:
      ``[rows, out_features]`` in ``x``'s dtype.

    Raises:
      ValueError / TypeError on bad ranks, shapes, dtypes or an unknown activation.
    """
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{_OP}: x must be a non-empty [rows, in_features] array, got shape {x.shape}")
    check_float(_OP, "x", x)
    rows, k = x.shape
    if kernel.ndim != 2 or kernel.shape[0] != k or kernel.shape[1] == 0:
        raise ValueError(f"{_OP}: kernel must be [in_features={k}, out_features >= 1], got shape {kernel.shape}")
    check_same_dtype(_OP, "kernel", kernel, x)
    n = kernel.shape[1]
    check_shape(_OP, "bias", bias, (n,))
    check_float(_OP, "bias", bias)
    if (ln_scale is None) != (ln_bias is None):
        raise ValueError(f"{_OP}: give both ln_scale and ln_bias, or neither")
    if ln_scale is not None:
        for name, v in (("ln_scale", ln_scale), ("ln_bias", ln_bias)):
            check_shape(_OP, name, v, (k,))
            check_float(_OP, name, v)
    if not eps >= 0:
        raise ValueError(f"{_OP}: eps must be >= 0, got {eps}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if residual is not None:
        check_shape(_OP, "residual", residual, (rows, n))
        check_same_dtype(_OP, "residual", residual, x)
    backend = _backend.get_backend()
    if backend == "xla" or (backend == "cuda" and not cuda_supports(x.dtype, rows)):
        return decode_dense_reference(x, kernel, bias, ln_scale=ln_scale, ln_bias=ln_bias, eps=eps,
                                      activation=activation, residual=residual)
    # Absent optional operands travel as empty arrays (the handler tells them by their size).
    ln = (ln_scale.astype(_F32), ln_bias.astype(_F32)) if ln_scale is not None else (jnp.zeros((0,), _F32),) * 2
    res = residual if residual is not None else jnp.zeros((rows, 0), x.dtype)
    return _decode_dense(backend, float(eps), activation, x, kernel, bias.astype(_F32), *ln, res)


def cuda_supports(dtype, rows: int) -> bool:
    """Whether the CUDA kernel runs ``rows`` rows of ``dtype`` (else the ``"cuda"`` backend runs the reference)."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)) and rows <= MAX_ROWS


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode_dense(backend, eps, activation, x, kernel, bias, ln_scale, ln_bias, residual):
    return _decode_dense_ffi(backend, eps, activation, x, kernel, bias, ln_scale, ln_bias, residual)


def _fwd(backend, eps, activation, *args):
    return _decode_dense(backend, eps, activation, *args), args


def _bwd(backend, eps, activation, args, g):
    x, kernel, bias, ln_scale, ln_bias, residual = args
    has_ln, has_res = ln_scale.size > 0, residual.size > 0

    def ref(x, kernel, bias, ln_scale, ln_bias, residual):
        return decode_dense_reference(x, kernel, bias, ln_scale=ln_scale if has_ln else None,
                                      ln_bias=ln_bias if has_ln else None, eps=eps, activation=activation,
                                      residual=residual if has_res else None)

    _, vjp = jax.vjp(ref, *args)
    return vjp(g)


_decode_dense.defvjp(_fwd, _bwd)


@rowwise([ROWS, PARAM, PARAM, PARAM, PARAM, ROWS], [ROWS], n_static=3)
def _decode_dense_ffi(backend, eps, activation, x, kernel, bias, ln_scale, ln_bias, residual):
    """Local call: x ``[..., in]``, residual ``[..., out]`` or ``[..., 0]`` -> ``[..., out]``."""
    lead = x.shape[:-1]
    rows = int(np.prod(lead))
    n = kernel.shape[1]
    out = jax.ffi.ffi_call(_backend.ffi_target(_OP, backend), jax.ShapeDtypeStruct((rows, n), x.dtype))(
        x.reshape(rows, -1), kernel, bias, ln_scale, ln_bias, residual.reshape(rows, -1), eps=np.float32(eps),
        activation=np.int32(_ACTIVATIONS[activation]))
    return out.reshape(lead + (n,))
