"""Attention softmax with key padding mask and dropout 0.1: batch x heads x q x k in
{8x8x128x128, 8x8x512x512, 2x16x1024x1024, 1x8x4096x4096} x {bf16, fp16}; plus
``attention_softmax_nodrop`` (dropout 0) at the largest shape, to show what the
dropout RNG costs."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Case
from lsjax.ops.attention_softmax import attention_softmax, attention_softmax_reference

SHAPES = [(8, 8, 128, 128), (8, 8, 512, 512), (2, 16, 1024, 1024), (1, 8, 4096, 4096)]
RATE = 0.1
# (op name, dropout rate, shapes)
VARIANTS = [("attention_softmax", RATE, SHAPES), ("attention_softmax_nodrop", 0.0, SHAPES[-1:])]


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for op, rate, shapes in VARIANTS:
            for b, h, q, k in shapes:
                n = b * h * q * k * jnp.dtype(dtype).itemsize
                stats = 8 * b * h * q  # float32 row max and 1/sum
                mask_bytes = b * k

                def make(rng, b=b, h=h, q=q, k=k, dtype=dtype):
                    x = jnp.asarray(rng.standard_normal((b, h, q, k), dtype="float32")).astype(dtype)
                    lengths = rng.integers(k // 2, k + 1, size=b)
                    mask = jnp.asarray(np.arange(k)[None, :] < lengths[:, None])
                    key = jax.random.PRNGKey(int(rng.integers(1 << 31)))  # raw uint32[2] key
                    return x, mask, key

                kw = dict(dropout_rate=rate, scale=0.125)
                out.append(Case(
                    op=op, shape=f"{b}x{h}x{q}x{k}", dtype=jnp.dtype(dtype).name,
                    make_inputs=make,
                    ours=lambda x, m, key, kw=kw: attention_softmax(x, key_padding_mask=m, key=key, **kw),
                    ref=lambda x, m, key, kw=kw: attention_softmax_reference(x, key_padding_mask=m, key=key, **kw),
                    # fwd: read scores + mask, write y (+ row stats); bwd: read dy, scores, mask, stats, write dx.
                    bytes_fwd=2 * n + mask_bytes + stats,
                    bytes_fwd_bwd=(2 * n + mask_bytes + stats) + (3 * n + mask_bytes + stats),
                    grad_argnums=(0,),
                ))
    return out
