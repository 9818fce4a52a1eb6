"""In-place optimizer timing: a donated training-loop step, fused kernel vs XLA.

    python -m benchmarks.optimizer_step [--params 60,200] [--dtypes bfloat16,float16] [--json out.json]
                                        [--backend cuda]   (cpu_ffi: a smoke test on CPU)

For each size (millions of params, split into 1024x1024 leaves plus a
remainder, like a model's tree) and dtype it times, with params and optimizer
state donated so every buffer is updated in place:

* ``op``: one ``lsjax.ops.adam_update`` per leaf (backend "cuda") against
  ``adam_update_reference`` (XLA's fused elementwise loop); bytes are the
  minimum the update moves (``benchmarks/cases/adam_update.update_bytes``);
* ``adamw``: the whole ``lsjax.optim.adamw`` update + ``apply_updates`` step
  on backend "cuda" (fused per leaf) against backend "xla".
Reports ms per step, GB/s and the speed ratio (XLA time / ours).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases.adam_update import _SCALARS, update_bytes
from lsjax import ops, optim

_LEAF = 1024 * 1024


def _tree(n: int, dtype, fill):
    sizes = [_LEAF] * (n // _LEAF) + ([n % _LEAF] if n % _LEAF else [])
    return [fill(i, s, dtype) for i, s in enumerate(sizes)]


def _time_loop(step, carry, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per step of ``carry = step(*carry)`` (donated carry)."""
    for _ in range(warmup):
        carry = step(*carry)
    jax.block_until_ready(carry)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        carry = step(*carry)
        jax.block_until_ready(carry)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _op_step(update):
    def step(params, grads, m, v, scalars):
        out = [update(p, g, mi, vi, scalars) for p, g, mi, vi in zip(params, grads, m, v)]
        return [o[0] for o in out], grads, [o[1] for o in out], [o[2] for o in out], scalars
    return jax.jit(step, donate_argnums=(0, 2, 3))


def _adamw_step(tx):
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), grads, state
    return jax.jit(step, donate_argnums=(0, 2))


def bench(n: int, dtype, fused: str = "cuda") -> list[dict]:
    key = jax.random.key(0)
    normal = lambda i, s, d: jax.random.normal(jax.random.fold_in(key, i), (s,), jnp.float32).astype(d)  # noqa: E731
    rows = []
    nbytes = update_bytes(n, dtype)
    for name, make_step, make_carry in (
        ("op", lambda backend: _op_step(ops.adam_update_reference if backend == "xla" else ops.adam_update),
         lambda: (_tree(n, dtype, normal), _tree(n, dtype, normal), _tree(n, jnp.float32, normal),
                  _tree(n, jnp.float32, lambda i, s, d: jnp.ones((s,), d)), ops.adam_scalars(**_SCALARS))),
        ("adamw", lambda backend: _adamw_step(optim.adamw(1e-3, weight_decay=0.01)),
         lambda: (lambda p: (p, _tree(n, dtype, normal), optim.adamw(1e-3).init(p)))(_tree(n, dtype, normal))),
    ):
        times = {}
        for backend in (fused, "xla"):
            with ops.use_backend(backend):
                times[backend] = _time_loop(make_step(backend), make_carry())
        rows.append({"what": name, "params_M": n / 1e6, "dtype": jnp.dtype(dtype).name,
                     "ours_ms": times[fused] * 1e3, "xla_ms": times["xla"] * 1e3,
                     "ours_GBps": nbytes / times[fused] / 1e9, "xla_GBps": nbytes / times["xla"] / 1e9,
                     "speedup": times["xla"] / times[fused]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="60,200", help="sizes in millions of params")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--json", default="")
    parser.add_argument("--backend", default="cuda", choices=("cuda", "cpu_ffi"), help="the fused side")
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'what':<7}{'params':>8}{'dtype':>10}{'ours ms':>10}{'xla ms':>10}{'GB/s':>8}{'xla GB/s':>10}{'speedup':>9}")
    rows = []
    for size in args.params.split(","):
        for dtype in args.dtypes.split(","):
            for r in bench(int(float(size) * 1e6), jnp.dtype(dtype), args.backend):
                rows.append(r)
                print(f"{r['what']:<7}{r['params_M']:>7.0f}M{r['dtype']:>10}{r['ours_ms']:>10.3f}{r['xla_ms']:>10.3f}"
                      f"{r['ours_GBps']:>8.0f}{r['xla_GBps']:>10.0f}{r['speedup']:>8.2f}x", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
