"""Multi-GPU training throughput of the lsjax train step: one GPU vs dp, zero3 and tp on two.

    python -m benchmarks.parallel --out results/parallel.json [--cache-dir /tmp/jax_cache]
    python -m benchmarks.parallel --smoke          # CPU, 2 of 8 fake devices, transformer-tiny

Each run is the real ``lsjax.training`` step (bf16 params, lsjax AdamW, dropout on, fused
ops) of ``--model`` at an equal per-GPU batch of ``--rows`` sentences x ``--length`` tokens:

* ``single``: mesh ``single`` on one device, ``rows`` rows;
* ``dp``, ``zero3``: two devices, ``2 * rows`` rows (``rows`` per device);
* ``tp``: two devices, the same ``2 * rows`` rows as dp, every row on both (Megatron split).

Each device's rows have the same lengths as the single-device batch (only the token ids differ), so
two devices process exactly twice the tokens of one. The two-device modes run with the mesh
configs' default ``overlap_collectives`` (XLA's latency-hiding scheduler) and, with
``--overlap on,off``, also without it (``<mode>/no-overlap`` rows), in the same run.

All runs start from the same params (same seed; the init is mesh-independent) and the same
batches, so dp, zero3 and tp must agree on the losses of the first steps (``loss_match``:
max relative difference against dp under ``--loss-rtol``). Reports compile seconds, ms per
step, target tokens per second, and the speed-up over one device (tokens/s ratio), as JSON
(``--out``) and a markdown table (stdout, and ``--out`` with ``.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

RUNS = (("single", 1), ("dp", 2), ("zero3", 2), ("tp", 2))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="transformer-big", help="name in configs/model/")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--rows", type=int, default=128, help="sentences per device (128 x 64: the train-step benchmark's batch)")
    parser.add_argument("--length", type=int, default=64, help="source and target tokens per sentence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--loss-steps", type=int, default=3, help="first steps whose losses are compared")
    parser.add_argument("--loss-rtol", type=float, default=2e-2, help="tolerance of tp/zero3 vs dp losses")
    parser.add_argument("--modes", default=",".join(m for m, _ in RUNS), help="subset of " + ",".join(m for m, _ in RUNS))
    parser.add_argument("--overlap", default="on,off",
                        help="two-device runs with the latency-hiding scheduler on, off, or both (on,off)")
    parser.add_argument("--backend", help="lsjax op backend (default: cuda on GPU, else xla)")
    parser.add_argument("--cache-dir", help="JAX persistent compilation cache directory")
    parser.add_argument("--out", help="JSON results path (a .md table is written next to it)")
    parser.add_argument("--smoke", action="store_true", help="CPU check: transformer-tiny, 8 fake devices, 2 used")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.precision, args.rows, args.length, args.steps = "transformer-tiny", "fp32", 8, 8, 3
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return args


def _batch(rng, rows: int, shards: int, length: int, vocab: int) -> dict:
    """``shards * rows`` random token rows with trailing padding (pad id 0); every shard of ``rows``
    rows has the same lengths (drawn from a fixed seed), so each device gets the same token count."""
    import numpy as np

    batch = {k: rng.integers(3, vocab, (shards * rows, length)).astype(np.int32) for k in ("src", "tgt_in", "tgt_out")}
    lengths = np.tile(np.random.default_rng(1).integers(length // 2, length + 1, rows), shards)
    for key in batch:
        batch[key][np.arange(length)[None, :] >= lengths[:, None]] = 0
    return batch


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8}


def all_reduce_bytes(hlo: str) -> dict[str, int]:
    """Bytes all-reduced per step by element type, from a compiled program's HLO text."""
    totals: dict[str, int] = {}
    for line in hlo.splitlines():
        match = re.search(r" = (.*?) all-reduce(-start)?\(", line)
        for dtype, dims in re.findall(r"\b(pred|[su]8|bf16|f16|[su]32|f32|s64|f64)\[([\d,]*)\]", match.group(1) if match else ""):
            count = math.prod(int(d) for d in dims.split(",") if d)
            totals[dtype] = totals.get(dtype, 0) + count * _DTYPE_BYTES[dtype]
    return totals


def run_mode(mode: str, overlap: bool, devices: list, model, optimizer, batch: dict, args) -> dict:
    """Compiles and times one mesh config; returns its row of the results."""
    import dataclasses

    import jax
    import numpy as np

    from lsjax.training import loop

    plan = loop.make_plan(mode, model, batch, devices)
    plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, overlap_collectives=overlap))
    state = loop.init_sharded_state(model, optimizer, batch, 0, plan)
    abstract = loop.abstract_state(model, optimizer, batch, 0, plan)
    step, _ = loop.compile_steps(model, optimizer, plan, abstract, label_smoothing=0.1)
    device_batch = loop.shard_batch(plan, batch)
    start = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    reduced = all_reduce_bytes(compiled.as_text())
    losses = []
    for _ in range(args.loss_steps):
        state, metrics = compiled(state, device_batch)
        losses.append(float(metrics["loss"]))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, device_batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / args.steps
    tokens = int(np.count_nonzero(batch["tgt_out"]))
    label = mode if overlap or len(devices) == 1 else f"{mode}/no-overlap"
    return {"mode": label, "devices": len(plan.mesh.devices.flat), "compiler_options": plan.compiler_options, "mesh": dict(plan.mesh.shape),
            "rows": len(batch["src"]), "target_tokens_per_step": tokens, "compile_s": round(compile_s, 2),
            "step_ms": round(seconds * 1e3, 3), "tokens_per_s": round(tokens / seconds, 1), "losses": losses,
            "skipped_steps": int(metrics["skipped_steps"]), "all_reduce_mib": {k: round(v / 2**20, 2) for k, v in reduced.items()}}


def summarize(rows: list[dict], rtol: float) -> dict:
    """Speed-ups over ``single`` and loss agreement with ``dp``."""
    by_mode = {r["mode"]: r for r in rows}
    dp = by_mode.get("dp", by_mode.get("dp/no-overlap"))
    for r in rows:
        if "single" in by_mode:
            r["speedup_vs_single"] = round(r["tokens_per_s"] / by_mode["single"]["tokens_per_s"], 3)
        if dp is not None and r["rows"] == dp["rows"] and r is not dp:
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], dp["losses"])]
            r["loss_max_rel_diff_vs_dp"] = max(diffs)
            r["loss_match"] = max(diffs) <= rtol
    return by_mode


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| mode | devices | mesh | rows | compile s | ms/step | target tok/s | speed-up vs 1 | "
             "all-reduced MiB/step | losses (first steps) | vs dp |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        match = ("" if "loss_match" not in r else
                 f"{'match' if r['loss_match'] else 'MISMATCH'} ({r['loss_max_rel_diff_vs_dp']:.1e})")
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        reduced = ", ".join(f"{k} {v:g}" for k, v in sorted(r["all_reduce_mib"].items()) if v >= 0.01)
        lines.append(f"| {r['mode']} | {r['devices']} | {r['mesh']} | {r['rows']} | {r['compile_s']} | "
                     f"{r['step_ms']} | {r['tokens_per_s']:.0f} | {r.get('speedup_vs_single', '')} | {reduced} | {losses} | "
                     f"{match} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import contextlib

    import jax
    import numpy as np

    from lsjax import ops
    from lsjax.training import loop
    from lsjax.training.config import TrainConfig
    from lsjax.training.metrics import enable_compilation_cache

    enable_compilation_cache(args.cache_dir)
    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit(f"benchmarks.parallel needs 2 devices, found {len(devices)} ({devices[0].platform})")
    modes = args.modes.split(",")
    unknown = set(modes) - {m for m, _ in RUNS}
    if unknown:
        raise SystemExit(f"unknown --modes {sorted(unknown)}; choose from {[m for m, _ in RUNS]}")
    config = TrainConfig(model=args.model, precision=args.precision,
                         model_overrides={"max_batch_tokens": 2 * args.rows * args.length})
    model_vocab = loop.load_model_config(args.model).vocab_size
    model, optimizer = loop.build_model(config, model_vocab), loop.build_optimizer(config)[0]
    rng = np.random.default_rng(0)
    batches = {n: _batch(rng, args.rows, n, args.length, model_vocab) for n in (1, 2)}
    overlaps = [{"on": True, "off": False}[v] for v in args.overlap.split(",")]
    backend = ops.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    rows = []
    with backend:
        for mode, n in RUNS:
            for overlap in overlaps[:1] if n == 1 else overlaps:
                if mode in modes:
                    rows.append(run_mode(mode, overlap, devices[:n], model, optimizer, batches[n], args))
                    print(json.dumps(rows[-1]), flush=True)
    summarize(rows, args.loss_rtol)
    header = (f"{args.model}, {args.precision}, {args.rows} x {args.length} tokens per device, "
              f"{devices[0].device_kind}, backend {ops.get_backend() if not args.backend else args.backend}")
    table = markdown(rows, header)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": vars(args), "device": devices[0].device_kind, "runs": rows}, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
