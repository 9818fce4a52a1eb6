"""Beam-search step bookkeeping (forward-only) vs its XLA reference: (batch, beam, max_len) in
{(8, 4, 64), (64, 4, 64), (64, 8, 256)}. Latency-bound at decode sizes: the bytes (the candidates,
both sequence sets read and written, the small per-beam arrays) are tiny; what counts is one launch
against XLA's sorts, gathers and copies. The harness keeps its inputs alive, so both sides write
fresh sequence buffers (no in-place update here)."""

import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax import ops


def cases() -> list[Case]:
    out = []
    for batch, k, max_len in ((8, 4, 64), (64, 4, 64), (64, 8, 256)):

        def make(rng, batch=batch, k=k, max_len=max_len, vocab=32000):
            scores = -jnp.sort(jnp.asarray(rng.exponential(size=(batch, 2 * k)), jnp.float32), axis=1)
            idx = jnp.asarray(rng.integers(0, k * vocab, (batch, 2 * k)), jnp.int32)
            seqs = lambda: jnp.asarray(rng.integers(0, vocab, (batch, k, max_len)), jnp.int32)  # noqa: E731
            fin = -jnp.sort(jnp.asarray(rng.exponential(size=(batch, k)), jnp.float32), axis=1)
            return (scores, idx, seqs(), seqs(), fin, jnp.asarray(rng.random((batch, k)) < 0.5), jnp.int32(max_len // 2),
                    jnp.float32(0.8))

        nbytes = batch * (2 * k * 8 + 2 * 2 * k * max_len * 4 + k * (4 + 4 + 4 + 4 + 1) + k * (4 + 1))
        out.append(Case(
            op="beam_update", shape=f"{batch}x{k}x{max_len}", dtype="int32", make_inputs=make,
            ours=lambda *a: ops.beam_update(*a, vocab=32000, eos_id=3),
            ref=lambda *a: ops.beam_update_reference(*a, vocab=32000, eos_id=3),
            bytes_fwd=nbytes, bytes_fwd_bwd=0, modes=("fwd",),
        ))
    return out
