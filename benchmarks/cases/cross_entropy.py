"""Cross-entropy: tokens x vocab in {8192 x 32000, 8192 x 128000, 2048 x 256000} x {bf16, fp16}.

Label smoothing 0.1, 10% of the tokens ignored (padding). The XLA baseline is
:func:`cross_entropy_reference` (optax-style ``log_softmax`` in float32).
"""

import jax
import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax.ops.cross_entropy import cross_entropy, cross_entropy_reference

EPS = 0.1


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for tokens, vocab in ((8192, 32000), (8192, 128000), (2048, 256000)):
            n = tokens * vocab * jnp.dtype(dtype).itemsize

            def make(rng, tokens=tokens, vocab=vocab, dtype=dtype):
                # Drawn on the device: numpy would take seconds per set at 1e9 logits.
                key = jax.random.key(int(rng.integers(1 << 31)))
                x = (3 * jax.random.normal(key, (tokens, vocab), jnp.float32)).astype(dtype)
                y = rng.integers(0, vocab, tokens)
                y[rng.random(tokens) < 0.1] = -1
                return x, jnp.asarray(y, jnp.int32)

            out.append(Case(
                op="cross_entropy", shape=f"{tokens}x{vocab}", dtype=jnp.dtype(dtype).name,
                make_inputs=make,
                # The loss only: the int32 count has no cotangent.
                ours=lambda x, y: cross_entropy(x, y, label_smoothing=EPS)[0],
                ref=lambda x, y: cross_entropy_reference(x, y, label_smoothing=EPS)[0],
                # fwd: read logits + labels, write loss (+ 4 B/row lse).
                # bwd: read logits, labels, lse, dloss, write dlogits.
                # (Ignored rows need not be read at all; counted anyway.)
                bytes_fwd=n + 12 * tokens,
                bytes_fwd_bwd=n + 12 * tokens + 2 * n + 12 * tokens,
                grad_argnums=(0,),
            ))
    return out
