"""Embedding: batch x seq {128x64, 256x256}, vocab 32000, hidden {512, 1024}, dropout 0.1, {bf16, fp16}.

Ids are uniform over the vocabulary, and in the ``...zipf`` rows (256x256x1024) Zipf-distributed
(exponent 1.1) as word frequencies in text are: a few rows own thousands of tokens each.
``embedding_nodrop`` (rate 0) at 256x256x1024, to show what the dropout RNG costs.
"""

import jax
import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax.ops.embedding import embedding, embedding_reference

VOCAB = 32000
RATE = 0.1


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        size = jnp.dtype(dtype).itemsize
        for batch, seq, hidden, zipf, rate in ((128, 64, 512, False, RATE), (128, 64, 1024, False, RATE),
                                               (256, 256, 512, False, RATE), (256, 256, 1024, False, RATE),
                                               (256, 256, 1024, True, RATE), (256, 256, 1024, False, 0.0)):
            tokens = batch * seq
            rows = tokens * hidden * size

            def make(rng, batch=batch, seq=seq, hidden=hidden, dtype=dtype, zipf=zipf):
                ids = ((rng.zipf(1.1, (batch, seq)) - 1) % (VOCAB - 1) + 1 if zipf
                       else rng.integers(1, VOCAB, (batch, seq)))
                ids = jnp.asarray(ids, jnp.int32)
                table = jnp.asarray(rng.standard_normal((VOCAB, hidden), dtype="float32")).astype(dtype)
                return ids, table

            kw = dict(rate=rate, padding_id=0)
            out.append(Case(
                op="embedding" if rate else "embedding_nodrop", shape=f"{batch}x{seq}x{hidden}" + ("zipf" if zipf else ""),
                dtype=jnp.dtype(dtype).name,
                make_inputs=make,
                ours=lambda ids, table, kw=kw: embedding(ids, table, key=jax.random.key(0), **kw),
                ref=lambda ids, table, kw=kw: embedding_reference(ids, table, key=jax.random.key(0), **kw),
                # fwd: read ids and the gathered table rows, write y;
                # bwd: read dy, write the dense [vocab, hidden] gradient.
                bytes_fwd=4 * tokens + 2 * rows,
                bytes_fwd_bwd=4 * tokens + 2 * rows + rows + VOCAB * hidden * size,
                grad_argnums=(1,),
            ))
    return out
