"""Timing harness for the op benchmarks (same-run comparison against XLA).

Each timed call is one ``jax.jit`` program that applies the op to ``K``
different fresh random inputs (rotating buffers, so neither caches nor a
single dispatch dominate); the per-op time is the median over repeats of the
program's wall time (after ``block_until_ready``) divided by ``K``.

fwd+bwd is timed as in a training step (see :func:`fwd_bwd`): the cotangent
is a random input, not a constant, and it only exists once the forward's
output does.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Case:
    """One benchmark row: our op vs its XLA reference on the same inputs.

    ``make_inputs(rng)`` returns a tuple of arrays; ``ours``/``ref`` take them
    and return an array or a tuple of arrays. ``grad_argnums`` are the inputs
    differentiated in the fwd+bwd timing; ``modes`` drops fwd+bwd for
    forward-only ops. Bytes are the minimum a perfect kernel moves (each input
    read once, each output written once).
    """

    op: str
    shape: str
    dtype: str
    make_inputs: Callable[[np.random.Generator], tuple]
    ours: Callable
    ref: Callable
    bytes_fwd: float
    bytes_fwd_bwd: float
    grad_argnums: Sequence[int] = (0,)
    modes: Sequence[str] = ("fwd", "fwd+bwd")


def _scalar_loss(fn, argnums):
    def loss(*args):
        out = fn(*args)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))
    return jax.grad(loss, argnums=tuple(argnums))


def fwd_bwd(fn, argnums):
    """fwd + bwd of ``fn(*args)`` for ``run(*args, cot)``, as in a training step.

    The cotangent ``cot`` (a tree like the output) is an input, so XLA can
    neither fold it (a constant ``ones`` cotangent lets XLA's reference skip
    reading ``dy`` while a kernel must read a materialised one) nor compute
    the backward in the forward's fusions: an optimisation barrier makes it
    available only after the output, as when it comes from the layers above.
    What the forward saves and what the backward recomputes stay each
    implementation's choice.
    """
    def run(*args):
        *args, cot = args
        out, vjp = jax.vjp(fn, *args)
        out, cot = jax.lax.optimization_barrier((out, cot))
        grads = vjp(cot)
        return out, tuple(grads[i] for i in argnums)
    return run


def with_cotangent(fn, inputs: list[tuple], rng: np.random.Generator) -> list[tuple]:
    """Each input tuple plus a random normal cotangent shaped like ``fn``'s output."""
    out = jax.eval_shape(fn, *inputs[0])
    return [(*ins, jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32)).astype(s.dtype), out))
        for ins in inputs]


def time_fn(fn: Callable, inputs: list[tuple], calls: int = 10, trials: int = 7, warmup: int = 2,
            compiler_options: dict | None = None, return_outputs: bool = False):
    """Median seconds per application of ``fn`` over the list of input tuples.

    Each trial dispatches the K-application program ``calls`` times back to back
    (asynchronous dispatch keeps the GPU busy, so host overhead is hidden) and
    blocks once; the result is the median trial time / (calls * K).
    ``compiler_options`` are XLA options of the program (``jax.jit(compiler_options=)``).
    With ``return_outputs``: ``(seconds, [fn(*x) for x in inputs])`` from the last call.
    """
    k = len(inputs)
    prog = jax.jit(lambda ins: [fn(*x) for x in ins], compiler_options=compiler_options)
    for _ in range(warmup):
        jax.block_until_ready(prog(inputs))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = prog(inputs)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    seconds = statistics.median(times) / k
    return (seconds, out) if return_outputs else seconds


def copies_for(nbytes: float, budget: float = 4e9, max_k: int = 8) -> int:
    """How many rotating input sets fit a memory budget (2 to ``max_k``).

    Every set is one more application of the op in the timed program, so the set
    count multiplies compile time (32 sets made one `--ops bias_dropout` run outlast
    a 10-minute device call); 8 sets of the benchmarked shapes already exceed the
    H100's 50 MB L2 except at the smallest, launch-bound shapes."""
    return int(max(2, min(max_k, budget // max(nbytes, 1))))


def measure_copy_bandwidth(nbytes: int = 1 << 28) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written): the best of a
    copy and elementwise bf16/float32 passes over 4 rotating buffers of ``nbytes``."""
    rng = np.random.default_rng(0)
    best = 0.0
    for dtype, fn in ((jnp.bfloat16, jnp.copy), (jnp.bfloat16, lambda a: a + 1), (jnp.float32, lambda a: a * 2)):
        n = nbytes // jnp.dtype(dtype).itemsize
        bufs = [(jnp.asarray(rng.standard_normal(n, dtype=np.float32)).astype(dtype),) for _ in range(4)]
        best = max(best, 2 * nbytes / time_fn(fn, bufs))
    return best


def run_case(case: Case, rng: np.random.Generator, copy_bw: float) -> list[dict]:
    """Times fwd and fwd+bwd of ours and the reference; returns result rows."""
    from lsjax import ops

    one = case.make_inputs(rng)
    per_set = sum(a.size * a.dtype.itemsize for a in one)
    k = copies_for(per_set * 3)
    inputs = [one] + [case.make_inputs(rng) for _ in range(k - 1)]
    rows = []
    for mode, nbytes in (("fwd", case.bytes_fwd), ("fwd+bwd", case.bytes_fwd_bwd)):
        if mode not in case.modes:
            continue
        if mode == "fwd":
            wrap, args = (lambda f: f), inputs
        else:
            wrap, args = (lambda f: fwd_bwd(f, case.grad_argnums)), with_cotangent(case.ref, inputs, rng)
        with ops.use_backend("xla"):
            t_ref = time_fn(wrap(case.ref), args)
        t_ours = time_fn(wrap(case.ours), args)
        rows.append({
            "op": case.op, "shape": case.shape, "dtype": case.dtype, "mode": mode,
            "ours_ms": t_ours * 1e3, "xla_ms": t_ref * 1e3,
            "ours_GBps": nbytes / t_ours / 1e9, "xla_GBps": nbytes / t_ref / 1e9,
            "ours_frac_copy_bw": nbytes / t_ours / copy_bw, "speedup": t_ref / t_ours,
        })
    return rows
