"""Beam-search top-k vs lax.top_k over beam*vocab: vocab {32k, 128k, 256k} x batch {8, 64}, beam 4, k 8."""

import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax import ops

BEAM, K = 4, 8


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for vocab in (32000, 128000, 256000):
            for batch in (8, 64):
                def make(rng, batch=batch, vocab=vocab, dtype=dtype):
                    logits = jnp.asarray(rng.standard_normal((batch, BEAM, vocab), dtype="float32")).astype(dtype)
                    scores = jnp.asarray(-rng.random((batch, BEAM), dtype="float32") * 5)
                    return logits, scores

                out.append(Case(
                    op="beam_topk", shape=f"{batch}x{BEAM}x{vocab}", dtype=jnp.dtype(dtype).name,
                    make_inputs=make,
                    ours=lambda x, s: ops.beam_topk(x, s, K),
                    ref=lambda x, s: ops.beam_topk_reference(x, s, K),
                    # read the logits once (+ scores), write k values and indices.
                    bytes_fwd=batch * BEAM * vocab * jnp.dtype(dtype).itemsize + batch * (BEAM + 8 * K),
                    bytes_fwd_bwd=0, modes=("fwd",),
                ))
    return out
