"""Decode attention (one query per row over a KV cache) vs its XLA reference.

Beam-search shapes of transformer-base (8 heads x 64): batch x beam rows {32, 256}
against a self-attention cache of {64, 256} keys filled to about half (``prefix``
mask), bf16 and fp16; and the appending self-attention step as a beam search runs
it (``decode_self_attention``: causal, through random row offsets, writing key
``k_len // 2``).
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
                out.append(_self_case(rows, k_len, dtype))
    return out


def _self_case(rows: int, k_len: int, dtype) -> Case:
    index = k_len // 2
    scale = HEAD_DIM ** -0.5

    def make(rng):
        def normal(shape):
            return jnp.asarray(rng.standard_normal(shape, dtype="float32")).astype(dtype)

        offsets = jnp.asarray(rng.integers(0, rows, (rows, k_len)) - np.arange(rows)[:, None], jnp.int32)
        return (normal((rows, 3, HEADS, HEAD_DIM)), normal((rows, k_len, HEADS, HEAD_DIM)),
                normal((rows, k_len, HEADS, HEAD_DIM)), offsets)

    def ours(qkv, k, v, offsets):
        return ops.decode_self_attention(qkv, k, v, jnp.int32(index), scale=scale, row_offsets=offsets, causal=True)

    def ref(qkv, k, v, offsets):
        return ops.decode_self_attention_reference(qkv, k, v, jnp.int32(index), scale=scale, row_offsets=offsets,
                                                   causal=True)

    size = jnp.dtype(dtype).itemsize
    # the attended keys and values, qkv, the offsets, the output and the written key and value.
    return Case(op="decode_self_attention", shape=f"{rows}x{k_len}x{HEADS}x{HEAD_DIM}", dtype=jnp.dtype(dtype).name,
                make_inputs=make, ours=ours, ref=ref,
                bytes_fwd=rows * (2 * index * HEADS * HEAD_DIM * size + 6 * HEADS * HEAD_DIM * size + 4 * k_len),
                bytes_fwd_bwd=0, modes=("fwd",))
