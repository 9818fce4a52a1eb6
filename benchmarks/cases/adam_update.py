"""Fused Adam update vs XLA's elementwise update: {60M, 200M} params x {bf16, fp16}.

Forward-only op (no backward). Moments float32, grads in the param dtype. The
harness keeps its inputs alive across calls, so both sides write fresh moment
buffers (``in_place=False``); ``python -m benchmarks.optimizer_step`` times the
in-place, donated training-loop form and the whole optimizer step.
"""

import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax import ops
from lsjax.ops.adam_update import adam_scalars

_SCALARS = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, bias_correction1=0.1,
                bias_correction2=0.001, grad_scale=1.0)


def update_bytes(n: int, dtype) -> int:
    """Bytes one update moves: read param, grad, m, v; write param, m, v (float32 moments)."""
    p = jnp.dtype(dtype).itemsize
    return n * (3 * p + 16)  # param read + write, grad read (param dtype), m/v read + write


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for n in (60_000_000, 200_000_000):

            def make(rng, n=n, dtype=dtype):
                p = jnp.asarray(rng.standard_normal(n, dtype="float32")).astype(dtype)
                g = jnp.asarray(rng.standard_normal(n, dtype="float32")).astype(dtype)
                m = jnp.asarray(rng.standard_normal(n, dtype="float32")) * 0.1
                v = jnp.square(m)
                return p, g, m, v, adam_scalars(**_SCALARS)

            out.append(Case(
                op="adam_update", shape=f"{n // 1_000_000}M", dtype=jnp.dtype(dtype).name,
                make_inputs=make,
                ours=lambda *a: ops.adam_update(*a, in_place=False),
                ref=ops.adam_update_reference,
                bytes_fwd=update_bytes(n, dtype), bytes_fwd_bwd=0, modes=("fwd",),
            ))
    return out
