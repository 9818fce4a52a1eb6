"""Multi-tensor Adam update over transformer-base's parameter leaves, bf16 params and grads.

Rows (same XLA reference, ``adam_update_multi_reference``, in each):
``adam_update_multi``: the whole update as one op (a few kernel launches);
``adam_update_leaf``: one ``adam_update`` per leaf, as the optimizer did before.
Weight decay on the matrices only. Each timed application is ``STEPS`` updates
chained in a ``fori_loop`` (params and moments carried, so updated in place as
in a training loop; times and bytes are for all ``STEPS``): one jitted call with
~800 array arguments costs milliseconds of host dispatch, more than one update.
"""

import functools
import math

import jax
import jax.numpy as jnp

from benchmarks.cases.adam_update import _SCALARS, update_bytes
from benchmarks.harness import Case
from lsjax import ops

STEPS = 20


@functools.cache
def _shapes() -> tuple[tuple[int, ...], ...]:
    from lsjax.models import Transformer, load_model_config

    model = Transformer(load_model_config("transformer-base"))
    tokens = jnp.zeros((1, 8), jnp.int32)
    with ops.use_backend("xla"):  # shapes only
        params = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)
    return tuple(x.shape for x in jax.tree.leaves(params))


def cases() -> list[Case]:
    shapes, dtype = _shapes(), jnp.bfloat16
    k, n = len(shapes), sum(math.prod(s) for s in shapes)
    decay = tuple(len(s) >= 2 for s in shapes)

    def make(rng):
        normal = lambda s, d, scale=1.0: jnp.asarray(rng.standard_normal(s, dtype="float32") * scale).astype(d)  # noqa: E731
        return (ops.adam_scalars(**_SCALARS), *[normal(s, dtype) for s in shapes], *[normal(s, dtype) for s in shapes],
                *[normal(s, jnp.float32, 0.1) for s in shapes], *[jnp.square(normal(s, jnp.float32, 0.1)) for s in shapes])

    def split(args):
        s, *leaves = args
        return (*(leaves[i * k:(i + 1) * k] for i in range(4)), s)

    def chained(update):
        def run(*args):
            def step(_, a):
                p, g, m, v, s = split(a)
                p, m, v = update(p, g, m, v, s)
                return (s, *p, *g, *m, *v)
            return jax.lax.fori_loop(0, STEPS, step, args)
        return run

    def per_leaf(p, g, m, v, s):
        no_decay = s.at[4].set(0.0)
        out = [ops.adam_update(*x, s if d else no_decay) for *x, d in zip(p, g, m, v, decay)]
        return tuple([o[j] for o in out] for j in range(3))

    multi = lambda p, g, m, v, s: ops.adam_update_multi(p, g, m, v, s, decay)  # noqa: E731
    ref = chained(lambda p, g, m, v, s: ops.adam_update_multi_reference(p, g, m, v, s, decay))
    shape = f"{k}x{n / 1e6:.0f}Mx{STEPS}"
    return [Case(op=op, shape=shape, dtype="bfloat16", make_inputs=make, ours=chained(ours), ref=ref,
                 bytes_fwd=STEPS * update_bytes(n, dtype), bytes_fwd_bwd=0, modes=("fwd",))
            for op, ours in (("adam_update_multi", multi), ("adam_update_leaf", per_leaf))]
