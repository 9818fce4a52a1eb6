"""split_heads (bias add + head split of a fused projection), bf16 and fp16, bias in x's
dtype: [batch, length, n, heads, head_dim] = 128x64x3x8x64 and 128x64x3x16x64 (Q/K/V)
and 128x64x2x8x64 (cross-attention K/V)."""

import math

import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax.ops.split_heads import split_heads, split_heads_reference

SHAPES = [(128, 64, 3, 8, 64), (128, 64, 3, 16, 64), (128, 64, 2, 8, 64)]


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for shape in SHAPES:
            n = math.prod(shape) * jnp.dtype(dtype).itemsize

            def make(rng, shape=shape, dtype=dtype):
                x = jnp.asarray(rng.standard_normal(shape, dtype="float32")).astype(dtype)
                b = jnp.asarray(rng.standard_normal(shape[2:], dtype="float32")).astype(dtype)
                return x, b

            out.append(Case(
                op="split_heads", shape="x".join(map(str, shape)), dtype=jnp.dtype(dtype).name,
                make_inputs=make, ours=split_heads, ref=split_heads_reference,
                # fwd: read x, write the n outputs; bwd: read the n cotangents,
                # write dx (dbias's partial sums are ~1% more, not counted).
                bytes_fwd=2 * n,
                bytes_fwd_bwd=2 * n + 2 * n,
                grad_argnums=(0, 1),
            ))
    return out
