"""Run one benchmark case's op (forward) a few times, for Nsight Compute to profile.

    ncu --clock-control none -k regex:Chunk -c 2 python3 -m benchmarks.ncu_case beam_topk 8x4x32000 bfloat16

Picks the case of ``benchmarks/cases/<module>.py`` with that shape and dtype (``--ref`` runs the XLA
reference instead); compiles once, then runs ``--calls`` times on the same inputs. ``--grad`` runs the
case's fwd+bwd as the benchmarks time it (:func:`benchmarks.harness.fwd_bwd`), to profile backward kernels.
"""

from __future__ import annotations

import argparse
import importlib

import jax
import numpy as np

from benchmarks import harness


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("module", help="case module under benchmarks/cases, e.g. beam_topk")
    parser.add_argument("shape", help="the case's shape string, e.g. 8x4x32000")
    parser.add_argument("dtype", help="bfloat16, float16 or float32")
    parser.add_argument("--op", default="", help="the case's op name when the module has several")
    parser.add_argument("--ref", action="store_true", help="run the XLA reference instead of our op")
    parser.add_argument("--grad", action="store_true", help="run fwd+bwd (backward kernels too)")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    cases = importlib.import_module(f"benchmarks.cases.{args.module}").cases()
    match = [c for c in cases if c.shape == args.shape and c.dtype == args.dtype and args.op in ("", c.op)]
    if not match:
        raise SystemExit(f"no case {args.shape} {args.dtype} in {args.module}: have "
                         f"{sorted({(c.op, c.shape, c.dtype) for c in cases})}")
    case = match[0]
    rng = np.random.default_rng(0)
    inputs = case.make_inputs(rng)
    fn = case.ref if args.ref else case.ours
    if args.grad:
        fn, inputs = harness.fwd_bwd(fn, case.grad_argnums), harness.with_cotangent(case.ref, [inputs], rng)[0]
    fn = jax.jit(fn)
    for _ in range(args.calls):
        jax.block_until_ready(fn(*inputs))
    mode = "fwd+bwd" if args.grad else "fwd"
    print(f"ran {case.op} {case.shape} {case.dtype} {mode} ({'reference' if args.ref else 'ours'}) {args.calls} times")


if __name__ == "__main__":
    main()
