"""Bias + dropout (+ residual / activation), rate 0.1, bf16 and fp16:
bias_dropout_residual at tokens {8192, 65536} x hidden {1024, 4096};
bias_act_dropout (relu, gelu) at tokens {8192, 65536} x intermediate 4096; plus
``bias_gelu_nodrop`` (rate 0) at 65536 x 4096, to show what the dropout RNG costs."""

import jax
import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax.ops.bias_act_dropout import bias_act_dropout, bias_act_dropout_reference
from lsjax.ops.bias_dropout_residual import bias_dropout_residual, bias_dropout_residual_reference

RATE = 0.1


def cases() -> list[Case]:
    key = jax.random.key(0)
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        name = jnp.dtype(dtype).name
        for tokens in (8192, 65536):
            for hidden in (1024, 4096):
                n = tokens * hidden * jnp.dtype(dtype).itemsize

                def make(rng, tokens=tokens, hidden=hidden, dtype=dtype):
                    x = jnp.asarray(rng.standard_normal((tokens, hidden), dtype="float32")).astype(dtype)
                    b = jnp.asarray(rng.standard_normal(hidden, dtype="float32")).astype(dtype)
                    r = jnp.asarray(rng.standard_normal((tokens, hidden), dtype="float32")).astype(dtype)
                    return x, b, r

                out.append(Case(
                    op="bias_dropout_residual", shape=f"{tokens}x{hidden}", dtype=name,
                    make_inputs=make,
                    ours=lambda x, b, r: bias_dropout_residual(x, b, r, rate=RATE, key=key),
                    ref=lambda x, b, r: bias_dropout_residual_reference(x, b, r, rate=RATE, key=key),
                    # fwd: read x, residual, write y; bwd: read dy, write dx
                    # (the mask is regenerated, not read). dresidual is dy
                    # itself in both implementations: returning it would only
                    # time a copy of the cotangent input, so it is not.
                    bytes_fwd=3 * n,
                    bytes_fwd_bwd=3 * n + 2 * n,
                    grad_argnums=(0, 1),
                ))
            acts = [("relu", RATE), ("gelu", RATE)] + ([("gelu", 0.0)] if tokens == 65536 else [])
            for act, rate in acts:
                hidden = 4096
                n = tokens * hidden * jnp.dtype(dtype).itemsize

                def make(rng, tokens=tokens, hidden=hidden, dtype=dtype):
                    x = jnp.asarray(rng.standard_normal((tokens, hidden), dtype="float32")).astype(dtype)
                    b = jnp.asarray(rng.standard_normal(hidden, dtype="float32")).astype(dtype)
                    return x, b

                out.append(Case(
                    op=f"bias_{act}_dropout" if rate else f"bias_{act}_nodrop", shape=f"{tokens}x{hidden}", dtype=name,
                    make_inputs=make,
                    ours=lambda x, b, act=act, rate=rate: bias_act_dropout(x, b, activation=act, rate=rate, key=key),
                    ref=lambda x, b, act=act, rate=rate: bias_act_dropout_reference(x, b, activation=act, rate=rate,
                                                                                   key=key),
                    # fwd: read x, write y; bwd: read dy and y (relu) or x
                    # (gelu), write dx.
                    bytes_fwd=2 * n,
                    bytes_fwd_bwd=2 * n + 3 * n,
                    grad_argnums=(0, 1),
                ))
    return out
