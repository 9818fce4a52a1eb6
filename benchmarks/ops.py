"""Benchmark every fused op against its XLA reference in the same run.

    python -m benchmarks.ops [--ops layer_norm,softmax] [--only 'gelu.*65536'] [--json out.json]

Prints ms, achieved GB/s, fraction of the measured copy bandwidth and the
speed ratio (XLA time / ours) for fwd and fwd+bwd. Needs the "cuda" backend
for meaningful numbers; runs anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import sys

import jax
import numpy as np

import benchmarks.cases
from benchmarks.harness import measure_copy_bandwidth, run_case


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", default="", help="comma-separated case modules (default: all)")
    parser.add_argument("--json", default="", help="write results here")
    parser.add_argument("--only", default="", help="regex: only the cases whose 'op shape dtype' it matches")
    args = parser.parse_args(argv)
    from lsjax import ops

    names = [m.name for m in pkgutil.iter_modules(benchmarks.cases.__path__)]
    if args.ops:
        wanted = args.ops.split(",")
        unknown = set(wanted) - set(names)
        if unknown:
            sys.exit(f"unknown op case modules {sorted(unknown)}; have {names}")
        names = wanted
    device = jax.devices()[0]
    copy_bw = measure_copy_bandwidth()
    print(f"device: {device.device_kind}; backend: {ops.get_backend()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    header = f"{'op':<22}{'shape':<18}{'dtype':<9}{'mode':<9}{'ours ms':>9}{'xla ms':>9}{'GB/s':>7}{'%copy':>7}{'speedup':>8}"
    print(header)
    for name in names:
        module = importlib.import_module(f"benchmarks.cases.{name}")
        for case in module.cases():
            if args.only and not re.search(args.only, f"{case.op} {case.shape} {case.dtype}"):
                continue
            for r in run_case(case, rng, copy_bw):
                rows.append(r)
                print(f"{r['op']:<22}{r['shape']:<18}{r['dtype']:<9}{r['mode']:<9}{r['ours_ms']:>9.4f}{r['xla_ms']:>9.4f}"
                      f"{r['ours_GBps']:>7.0f}{100 * r['ours_frac_copy_bw']:>6.0f}%{r['speedup']:>7.2f}x", flush=True)
            if args.json:  # after every case, so a run cut short keeps its rows
                with open(args.json, "w") as f:
                    json.dump({"device": device.device_kind, "backend": ops.get_backend(),
                               "copy_GBps": copy_bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
