"""Decode attention (one query per row over a KV cache) vs its XLA reference.

Beam-search shapes of transformer-base (8 heads x 64): batch x beam rows {32, 256}
against a self-attention cache of {64, 256} keys filled to about half (``prefix``
mask), bf16 and fp16.
"""

import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Case
from lsjax import ops

HEADS, HEAD_DIM = 8, 64


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for rows in (32, 256):
            for k_len in (64, 256):
                def make(rng, rows=rows, k_len=k_len, dtype=dtype):
                    def normal(shape):
                        return jnp.asarray(rng.standard_normal(shape, dtype="float32")).astype(dtype)

                    mask = jnp.asarray(np.arange(k_len)[None] <= k_len // 2).repeat(rows, 0)
                    return (normal((rows, HEADS, HEAD_DIM)), normal((rows, k_len, HEADS, HEAD_DIM)),
                            normal((rows, k_len, HEADS, HEAD_DIM)), mask)

                size = jnp.dtype(dtype).itemsize
                filled = k_len // 2 + 1
                out.append(Case(
                    op="decode_attention", shape=f"{rows}x{k_len}x{HEADS}x{HEAD_DIM}", dtype=jnp.dtype(dtype).name,
                    make_inputs=make,
                    ours=lambda q, k, v, m: ops.decode_attention(q, k, v, m, scale=HEAD_DIM ** -0.5),
                    ref=lambda q, k, v, m: ops.decode_attention_reference(q, k, v, m, scale=HEAD_DIM ** -0.5),
                    # the filled keys and values, q, the mask, and the output.
                    bytes_fwd=rows * (2 * filled * HEADS * HEAD_DIM * size + 2 * HEADS * HEAD_DIM * size + k_len),
                    bytes_fwd_bwd=0, modes=("fwd",),
                ))
    return out
