"""Where a step's device time goes: per-kernel totals from a JAX profiler trace.

    python -m benchmarks.profile train  [--model transformer-base] [--dtype bfloat16] [--impl lsjax|plain]
    python -m benchmarks.profile decode [--batch 8] [--dtype bfloat16] [--impl lsjax|plain]
    python -m benchmarks.profile case --case embedding:256x256x1024:bfloat16[:op] [--impl lsjax|plain] [--mode fwd]
                                      [--apps 4]
    ... [--steps 5] [--top 40] [--xla-options default|while|cublas|while+cublas] [--out profile.json] [--smoke]

Compiles one program (the ``benchmarks.train_step`` step, the ``benchmarks.decode`` beam
search, or one ``benchmarks/cases`` op case's fwd+bwd as ``benchmarks.ops`` times it, ``--impl
plain`` being its XLA reference), runs it twice to warm up, then traces ``--steps`` calls (each blocked on, as the
benchmarks time them) with ``jax.profiler.trace`` and reads the XSpace back with
``jax.profiler.ProfileData`` (no TensorBoard needed). Reported per call:

* ``wall_ms``: host time per call; ``busy_ms``: time at least one kernel (or copy) ran on
  the device (union over streams); ``idle``: 1 - busy / wall, i.e. launch gaps and host work;
  ``host_top``: the host trace events (XLA/PJRT TraceMe spans per thread) by time per call;
* ``kernels``: kernel launches; per category (``gemm``, ``lsjax`` = our CUDA kernels,
  ``xla`` = XLA's fusions, ``copy``) their count and time;
* the ``--top`` kernels by total time, with launches and mean microseconds.

``--hlo PATH`` also writes the compiled program's optimized HLO (to map fusion names to ops);
``--timeline`` lists the last call's kernels by stream with start and end times (where a call's
time goes between kernels: launch gaps, waits on the other stream).
``--xla-options while`` compiles with XLA's command buffers (CUDA graphs) extended to
``WHILE``/``CONDITIONAL`` (the decode loop then runs as one graph, no host round trip per
step); ``cublas`` sends every GEMM to cuBLAS instead of Triton (see ``XLA_OPTIONS``). ``--smoke`` profiles transformer-tiny / a toy decoder on the CPU, whose XLA thunks
stand in for kernels (checks the script).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np

from lsjax import ops
from lsjax.decode import WHILE_LOOP_GRAPHS

# Named XLA compile-option sets (``jax.jit(..., compiler_options=...)``): XLA's defaults; command
# buffers extended to the while loop; cuBLAS for every GEMM instead of Triton (split-K) fusions;
# Triton GEMMs without split-K (no separate reduction kernel, the epilogue can fuse into the GEMM);
# no command buffers (every thunk launched from the host); command buffers from 1 thunk on.
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}
XLA_OPTIONS = {"default": None, "while": WHILE_LOOP_GRAPHS, "cublas": CUBLAS_GEMMS,
               "while+cublas": {**WHILE_LOOP_GRAPHS, **CUBLAS_GEMMS},
               "nosplitk": {"xla_gpu_experimental_force_split_k": 1},
               "nographs": {"xla_gpu_enable_command_buffer": ""},
               "graphs_min1": {"xla_gpu_graph_min_graph_size": 1}}
_CATEGORIES = (  # first match wins; matched against the kernel name
    ("lsjax", re.compile(r"lsjax")),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm\d+_.*(tensorop|wgmma)|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
)


def category(kernel: str) -> str:
    """``lsjax``, ``gemm``, ``copy`` or ``xla`` (everything else: XLA's fusions)."""
    return next((name for name, pattern in _CATEGORIES if pattern.search(kernel)), "xla")


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length of the union of ``[start, end)`` intervals."""
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def device_events(xspace_path: str) -> list[tuple[str, int, int, str]]:
    """``(name, start_ns, duration_ns, stream)`` of every device activity in an XSpace file.

    GPU planes (``/device:GPU:*``): the events of their stream lines (kernels, copies).
    Without a GPU plane (CPU runs): the host's XLA thunks (events carrying an ``hlo_op`` stat).
    """
    data = jax.profiler.ProfileData.from_file(xspace_path)
    planes = list(data.planes)
    gpu = [p for p in planes if p.name.startswith("/device:GPU")]
    events = []
    if gpu:
        for plane in gpu:
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    events += [(e.name, int(e.start_ns), int(e.duration_ns), line.name) for e in line.events]
        return events
    for plane in planes:
        if plane.name.startswith("/host:CPU"):
            for line in plane.lines:
                events += [(e.name, int(e.start_ns), int(e.duration_ns), line.name) for e in line.events
                           if any(k == "hlo_op" for k, _ in e.stats) and e.duration_ns > 0]
    return events


def host_events(xspace_path: str) -> list[tuple[str, str, int]]:
    """``(thread, name, duration_ns)`` of every host trace event (TraceMe) in an XSpace file."""
    data = jax.profiler.ProfileData.from_file(xspace_path)
    return [(line.name, e.name, int(e.duration_ns)) for plane in data.planes if plane.name.startswith("/host:")
            for line in plane.lines for e in line.events]


def summarize_host(events: Iterable[tuple[str, str, int]], calls: int, top: int) -> list[dict]:
    """The ``top`` host events by total time per call (nested events each count their own span)."""
    totals: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for thread, name, dur in events:
        totals[thread, name[:120]][0] += 1
        totals[thread, name[:120]][1] += dur
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"thread": t, "event": n, "count": c / calls, "ms": d / 1e6 / calls} for (t, n), (c, d) in ranked]


def last_call_timeline(events: Iterable[tuple[str, int, int, str]], calls: int) -> list[dict]:
    """The last call's device activities in start order, times in microseconds from its first start.

    Calls are blocked on one by one, so the ``calls - 1`` longest idle gaps of the device separate them.
    """
    events = sorted(events, key=lambda e: e[1])
    if not events:
        return []
    gaps, end = [], events[0][1] + events[0][2]
    for i, (_, start, dur, _) in enumerate(events[1:], 1):
        gaps.append((start - end, i))
        end = max(end, start + dur)
    first = max((i for _, i in sorted(gaps)[len(gaps) - (calls - 1):]), default=0) if calls > 1 else 0
    t0 = events[first][1]
    return [{"stream": stream, "start_us": (start - t0) / 1e3, "end_us": (start + dur - t0) / 1e3,
             "kernel": name} for name, start, dur, stream in events[first:]]


def summarize(events: Iterable[tuple[str, int, int, str]], calls: int, wall_s: float, top: int) -> dict:
    """Per-call totals, per-category and top-kernel tables of ``events`` (see module doc)."""
    events = list(events)
    by_kernel: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for name, _, dur, _ in events:
        by_kernel[name][0] += 1
        by_kernel[name][1] += dur
    by_cat: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for name, (n, dur) in by_kernel.items():
        by_cat[category(name)][0] += n
        by_cat[category(name)][1] += dur
    busy_ns = _union_ns([(s, s + d) for _, s, d, _ in events])
    wall_ms = 1e3 * wall_s / calls
    busy_ms = busy_ns / 1e6 / calls
    kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "calls": calls, "wall_ms": wall_ms, "busy_ms": busy_ms,
        "idle": 1.0 - busy_ms / wall_ms if wall_ms > 0 else None,
        "kernels": len(events) / calls,
        "categories": {c: {"kernels": n / calls, "ms": d / 1e6 / calls} for c, (n, d) in sorted(by_cat.items())},
        "top": [{"kernel": k, "category": category(k), "launches": n / calls, "ms": d / 1e6 / calls,
                 "mean_us": d / 1e3 / n} for k, (n, d) in kernels],
    }


def profile(fn: Callable, args_per_call: list[tuple], warmup: int = 2) -> tuple[list, float, list]:
    """Traces ``fn(*args)`` for each tuple in ``args_per_call`` (each blocked on) after
    ``warmup`` untraced calls; returns (device events, traced wall seconds, host events)."""
    for args in args_per_call[:warmup]:
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            start = time.perf_counter()
            for args in args_per_call:
                jax.block_until_ready(fn(*args))
            wall = time.perf_counter() - start
        paths = glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {log_dir}")
        return device_events(paths[0]), wall, host_events(paths[0])


def _train_program(args, options) -> tuple[Callable, list[tuple], Callable]:
    from benchmarks import train_step

    v = train_step.Variant(args.model, args.dtype, args.impl, args.batch_sentences, args.length, args.length,
                           args.steps, 0, lsjax_overrides=tuple(o for o in args.lsjax_overrides.split(",") if o))
    vocab = train_step.load_model_config(v.model).vocab_size
    batches = jax.device_put(train_step.make_batches(v, vocab, args.steps))
    step_fn, init = train_step.build_step(v, batches[0])
    step = jax.jit(step_fn, donate_argnums=0, compiler_options=options)
    state = [init()]

    def call(batch):  # threads the donated state through the calls
        state[0], metrics = step(state[0], batch)
        return metrics

    return call, [(b,) for b in batches], lambda: step.lower(state[0], batches[0])


def _decode_program(args, options) -> tuple[Callable, list[tuple], Callable]:
    from benchmarks import decode

    rng = np.random.default_rng(0)
    make = decode._toy_inputs if args.smoke else decode._transformer_inputs
    searches, inputs = make(args.batch, args.dtype, rng)
    which = 0 if args.impl == "lsjax" else 1
    fn = jax.jit(searches[which], compiler_options=options)
    calls = [inputs[which][i % len(inputs[which])] for i in range(args.steps)]
    return fn, calls, lambda: fn.lower(*calls[0])


def _case_program(args, options) -> tuple[Callable, list[tuple], Callable]:
    import importlib

    from benchmarks import harness

    module, shape, dtype, *op = args.case.split(":")
    cases = [c for c in importlib.import_module(f"benchmarks.cases.{module}").cases()
             if c.shape == shape and c.dtype == dtype and c.op in (op or [c.op])]
    if not cases:
        raise SystemExit(f"no case {args.case}: give module:shape:dtype[:op] of benchmarks/cases")
    case, rng = cases[0], np.random.default_rng(0)
    fn = case.ours if args.impl == "lsjax" else case.ref
    inputs = [case.make_inputs(rng) for _ in range(2 * args.apps)]
    if args.mode == "fwd+bwd":
        fn, inputs = harness.fwd_bwd(fn, case.grad_argnums), harness.with_cotangent(case.ref, inputs, rng)
    # apps applications on distinct inputs per call, as benchmarks.harness.time_fn's program.
    prog = jax.jit(lambda *sets: [fn(*x) for x in sets], compiler_options=options)
    sets = [tuple(inputs[a::2]) for a in range(2)]
    calls = [sets[i % 2] for i in range(args.steps)]
    return prog, calls, lambda: prog.lower(*calls[0])


def table(result: dict) -> str:
    """Markdown summary of :func:`summarize`'s result."""
    r = result
    lines = [f"wall {r['wall_ms']:.3f} ms/call, device busy {r['busy_ms']:.3f} ms ({100 * (1 - r['idle']):.0f}%), "
             f"{r['kernels']:.0f} kernels/call",
             "", "| category | kernels/call | ms/call |", "| --- | ---: | ---: |"]
    lines += [f"| {c} | {v['kernels']:.0f} | {v['ms']:.3f} |" for c, v in r["categories"].items()]
    lines += ["", "| kernel | cat | launches/call | ms/call | mean us |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| `{t['kernel'][:90]}` | {t['category']} | {t['launches']:.0f} | {t['ms']:.3f} | {t['mean_us']:.1f} |"
              for t in r["top"]]
    if r.get("timeline"):
        lines += ["", "last call's timeline:", "",
                  "| stream | start us | end us | kernel |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {t['stream'][:20]} | {t['start_us']:.1f} | {t['end_us']:.1f} | `{t['kernel'][:80]}` |"
                  for t in r["timeline"]]
    if r.get("host_top"):
        lines += ["", "| host thread | host event | count/call | ms/call |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {h['thread'][:30]} | `{h['event'][:80]}` | {h['count']:.0f} | {h['ms']:.3f} |"
                  for h in r["host_top"][:30]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("program", choices=("train", "decode", "case"))
    parser.add_argument("--impl", choices=("lsjax", "plain"), default="lsjax")
    parser.add_argument("--model", default="transformer-base", help="train: model config")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sentences", type=int, default=128, help="train: sentences per batch")
    parser.add_argument("--length", type=int, default=64, help="train: source and target positions")
    parser.add_argument("--lsjax-overrides", default="",
                        help="train: comma-separated overrides of the lsjax side, as benchmarks.train_step's")
    parser.add_argument("--batch", type=int, default=8, help="decode: batch (beam 4, 64 forced steps)")
    parser.add_argument("--case", default="embedding:256x256x1024:bfloat16", help="case: module:shape:dtype[:op]")
    parser.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd", help="case: what is traced")
    parser.add_argument("--apps", type=int, default=1,
                        help="case: applications per call, on distinct inputs (the timeline then shows them "
                             "back to back, as benchmarks.ops times them)")
    parser.add_argument("--steps", type=int, default=5, help="traced calls")
    parser.add_argument("--top", type=int, default=40, help="kernels listed")
    parser.add_argument("--xla-options", choices=tuple(XLA_OPTIONS), default="default")
    parser.add_argument("--out", default="", help="write the summary as JSON here")
    parser.add_argument("--hlo", default="", help="write the compiled program's optimized HLO text here")
    parser.add_argument("--timeline", action="store_true",
                        help="also list the last call's kernels by stream with start and end times")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_sentences, args.length, args.batch, args.steps = "transformer-tiny", 4, 8, 1, 3
    options = XLA_OPTIONS[args.xla_options]
    build = {"train": _train_program, "decode": _decode_program, "case": _case_program}[args.program]
    # The plain side runs no lsjax kernel (its loss scaling's gradient check included).
    backend = "xla" if args.impl == "plain" else "cpu_ffi" if args.smoke else None
    with ops.use_backend(backend) if backend else contextlib.nullcontext():
        fn, calls, lower = build(args, options)
        events, wall, host = profile(fn, calls)
        if args.hlo:
            with open(args.hlo, "w") as f:
                f.write(lower().compile().as_text())
    result = {"program": args.program, "impl": args.impl, "dtype": args.dtype, "xla_options": args.xla_options,
              "device": jax.devices()[0].device_kind, **summarize(events, len(calls), wall, args.top),
              "host_top": summarize_host(host, len(calls), args.top),
              "timeline": last_call_timeline(events, len(calls)) if args.timeline else []}
    if args.program == "train":
        result.update(model=args.model, batch=args.batch_sentences, length=args.length)
    elif args.program == "case":
        result.update(case=args.case, mode=args.mode, apps=args.apps)
    else:
        result.update(batch=args.batch, beam=4, decode_steps=64)
    print(f"{args.program} {args.impl} {args.dtype} on {result['device']}, XLA options {args.xla_options}")
    print(table(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
