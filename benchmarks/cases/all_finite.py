"""All-finite check of transformer-base's gradient leaves (~197 leaves, ~60M elements), bf16 and fp16.

Forward-only op: ``all_finite`` (a memset and one kernel launch per dtype) vs
the reference's per-leaf ``jnp.all(jnp.isfinite(g))`` reductions. Each timed
application is ``STEPS`` checks chained in a ``fori_loop`` (times and bytes are
for all ``STEPS``; passing the leaves through an optimization barrier with the
step index keeps XLA from hoisting the loop-invariant check out of the loop): one jitted call with
hundreds of array arguments costs more host dispatch than one check. Bytes:
every element read once.
"""

import math

import jax
import jax.numpy as jnp

from benchmarks.cases.adam_update_multi import _shapes
from benchmarks.harness import Case
from lsjax import ops

STEPS = 20


def _chained(check):
    def run(*leaves):
        def step(i, ok):
            xs, i = jax.lax.optimization_barrier((leaves, i))
            return ok & check(xs) & (i >= 0)  # (i >= 0): a used step index keeps the barrier's loop dependence
        return jax.lax.fori_loop(0, STEPS, step, jnp.asarray(True))
    return run


def cases() -> list[Case]:
    shapes = _shapes()
    k, n = len(shapes), sum(math.prod(s) for s in shapes)
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):

        def make(rng, dtype=dtype):
            return tuple(jnp.asarray(rng.standard_normal(s, dtype="float32")).astype(dtype) for s in shapes)

        out.append(Case(op="all_finite", shape=f"{k}x{n / 1e6:.0f}Mx{STEPS}", dtype=jnp.dtype(dtype).name,
                        make_inputs=make, ours=_chained(ops.all_finite), ref=_chained(ops.all_finite_reference),
                        bytes_fwd=STEPS * n * jnp.dtype(dtype).itemsize, bytes_fwd_bwd=0, modes=("fwd",)))
    return out
