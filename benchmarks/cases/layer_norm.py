"""Layer norm: tokens {8192, 65536} x hidden {512, 1024, 4096} x {bf16, fp16}."""

import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax import ops


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for tokens in (8192, 65536):
            for hidden in (512, 1024, 4096):
                n = tokens * hidden * jnp.dtype(dtype).itemsize

                def make(rng, tokens=tokens, hidden=hidden, dtype=dtype):
                    x = jnp.asarray(rng.standard_normal((tokens, hidden), dtype="float32")).astype(dtype)
                    s = jnp.asarray(rng.standard_normal(hidden, dtype="float32"))
                    b = jnp.asarray(rng.standard_normal(hidden, dtype="float32"))
                    return x, s, b

                out.append(Case(
                    op="layer_norm", shape=f"{tokens}x{hidden}", dtype=jnp.dtype(dtype).name,
                    make_inputs=make,
                    ours=lambda x, s, b: ops.layer_norm(x, s, b),
                    ref=lambda x, s, b: ops.layer_norm_reference(x, s, b),
                    # fwd: read x, write y (+ 8 B/row stats); bwd: read dy, x, write dx.
                    bytes_fwd=2 * n + 8 * tokens,
                    bytes_fwd_bwd=2 * n + 8 * tokens + 3 * n,
                    grad_argnums=(0, 1, 2),
                ))
    return out
