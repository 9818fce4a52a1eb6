"""Fused bias + activation + dropout (``dropout(act(x + bias))``), the FFN's inner epilogue.

Backends: ``"xla"`` runs :func:`bias_act_dropout_reference`; ``"cpu_ffi"``/
``"cuda"`` run the FFI targets ``lsjax_bias_act_dropout_{fwd,bwd}_{cpu,cuda}``
under a ``jax.custom_vjp``. No mask is stored; what the backward reads besides
``dy``:

* relu: the output ``y`` (kept alive anyway as the next matmul's input). ``y > 0``
  iff the element was kept and ``x + bias > 0``, so ``dx = y > 0 ? dy / (1 - rate)
  : 0`` needs neither ``x`` nor random bits: the backward reads ``dy`` and ``y``,
  writes ``dx`` and computes nothing else (``x`` need not outlive the forward).
* gelu / gelu_tanh: the pre-activation ``x`` (the preceding matmul's output) and
  the ``uint32[4]`` rng operand: the backward recomputes ``act'(x + bias)`` and
  regenerates the Philox mask (``csrc/philox.h``; element index = flat index
  into the output; 16 random bits per element, so the drop probability is
  ``floor(rate * 2**16) / 2**16``). Regenerating cost ~12 instructions per
  element when each element took 32 bits (16 bits halve the Philox part) and
  no bytes; a stored 1-bit mask would add 1/16 of a 16-bit tensor write and read
  to save those instructions, and a 1-byte mask half a tensor each way. With
  the cheap erfc (``csrc/bias_dropout.h``) the gelu backward is ~45
  instructions per element against the ~60 that an H100 issues in the time
  its copy bandwidth moves the 6 bytes per element (bf16), so it stays
  memory-bound and the mask would only add bytes.

``dbias`` is a deterministic column sum (float32, rounded once).

Sharding: the rows and the hidden dim may both stay sharded (e.g. the FFN's
``[tokens, mlp]`` under Megatron tensor parallelism, with ``bias [mlp]`` split
alike): every shard runs the kernels on its block and draws the unsharded
mask's bits for it (:mod:`lsjax.ops._bias_dropout`); ``dbias`` comes out split
the same way, summed over the row shards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.ops import backend as _backend
from lsjax.ops._bias_dropout import dbias_call, dropout_reference, dropout_rng, dropout_rowwise, ffi, like
from lsjax.ops._checks import check_float, check_rank, check_shape
from lsjax.ops._rowwise import COL_SUM, COLS, ROWS, param_operands

_F32 = jnp.float32

# Activation codes of csrc/bias_dropout.h (0 is the identity, not exposed here).
ACTIVATIONS = {"relu": 1, "gelu": 2, "gelu_tanh": 3}


def apply_activation(name: str, v: jax.Array) -> jax.Array:
    """``name`` (a key of ``ACTIVATIONS``) applied to ``v``, as the kernels compute it."""
    if name == "relu":
        return jax.nn.relu(v)
    return jax.nn.gelu(v, approximate=(name == "gelu_tanh"))


def bias_act_dropout_reference(x: jax.Array, bias: jax.Array, *, activation: str = "relu", rate: float,
                               key: jax.Array | None) -> jax.Array:
    """Pure-JAX float32 ``dropout(act(x + bias))``; same contract as :func:`bias_act_dropout`."""
    v = apply_activation(activation, x.astype(_F32) + bias.astype(_F32))
    return dropout_reference(v, rate, key).astype(x.dtype)


def bias_act_dropout(x: jax.Array, bias: jax.Array, *, activation: str = "relu", rate: float,
                     key: jax.Array | None) -> jax.Array:
    """``dropout(act(x + bias))`` in one pass (float32 math, one rounding).

    Args:
      x: ``[..., hidden]`` float32, float16 or bfloat16 (any hidden size).
      bias: ``[hidden]`` of any float dtype (math in float32; read as it is in ``x``'s
        dtype, else converted to float32 first).
      activation: ``"relu"``, ``"gelu"`` (exact erf form, ``jax.nn.gelu(approximate=False)``)
        or ``"gelu_tanh"`` (``jax.nn.gelu(approximate=True)``).
      rate: dropout probability in ``[0, 1)``; kept values are scaled by ``1 / (1 - rate)``.
      key: a JAX PRNG key, or None for no dropout (as ``rate == 0``: deterministic).

    Returns:
      ``y`` of ``x``'s shape and dtype; the dropout mask is the one
      :func:`lsjax.ops.bias_dropout_residual.bias_dropout_residual` draws for
      the same key and shape. Gradients: ``dx = mask * dy * act'(x + bias) / (1 - rate)``,
      ``dbias = sum over rows of dx`` (summed in float32, rounded once to ``bias.dtype``). The
      kernels' relu gradient is 0 where ``0 < x + bias`` rounds ``y`` to 0
      (below half the smallest subnormal of ``x.dtype``); their gelu's
      ``Phi`` is within 3e-7 of the exact one, and gelu_tanh evaluates
      ``(1 + tanh(u)) / 2`` as the equal ``sigmoid(2u)``.
    """
    op = "bias_act_dropout"
    check_rank(op, "x", x, 1)
    check_float(op, "x", x)
    check_shape(op, "bias", bias, (x.shape[-1],))
    check_float(op, "bias", bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    rate, rng = dropout_rng(op, rate, key)
    backend = _backend.get_backend()
    if backend == "xla":
        return bias_act_dropout_reference(x, bias, activation=activation, rate=rate,
                                          key=key if rate > 0 else None)
    return _bad_ffi(x, bias, rng, ACTIVATIONS[activation], rate, backend)


# ------------------------------------------------------------- FFI path --

@dropout_rowwise([ROWS, COLS], [ROWS], n_static=3)
def _fwd(act, rate, backend, row_stride, x, bias, rng):
    return ffi("bias_act_dropout_fwd", backend, like(x), x, bias, rng, rate=np.float32(rate),
               row_stride=np.int64(row_stride), activation=np.int32(act))


@dropout_rowwise([ROWS, ROWS, COLS], [ROWS, COL_SUM], n_static=3)
def _bwd(act, rate, backend, row_stride, dy, saved, bias, rng):
    return dbias_call("bias_act_dropout_bwd", backend, bias.dtype, dy, saved, bias, rng, rate=np.float32(rate),
                      row_stride=np.int64(row_stride), activation=np.int32(act))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bad_ffi(x, bias, rng, act, rate, backend):
    return _fwd(act, rate, backend, x, *param_operands(x, bias), rng)


def _bad_ffi_fwd(x, bias, rng, act, rate, backend):
    y = _fwd(act, rate, backend, x, *param_operands(x, bias), rng)
    if act == ACTIVATIONS["relu"]:  # the backward reads y; bias and the rng go unread
        return y, (y, bias, None)
    return y, (x, bias, rng)


def _bad_ffi_bwd(act, rate, backend, saved, dy):
    saved, bias, rng = saved
    dx, dbias = _bwd(act, rate, backend, dy, saved, *param_operands(dy, bias), rng)
    return dx, dbias.astype(bias.dtype), None


_bad_ffi.defvjp(_bad_ffi_fwd, _bad_ffi_bwd)
