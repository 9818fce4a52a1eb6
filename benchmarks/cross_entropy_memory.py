"""Peak memory of the jitted cross-entropy fwd+bwd: ours vs the XLA reference.

    python -m benchmarks.cross_entropy_memory [--tokens 8192] [--vocab 32000] [--dtype bfloat16]

Compiles ``value_and_grad`` of the mean loss (label smoothing 0.1) for
``[tokens, vocab]`` logits and reports XLA's ``memory_analysis()``: temporaries
+ outputs (the arguments, logits and labels, are the same for both). Then, each
in a fresh process, runs the step once on random logits and reports the device's
``peak_bytes_in_use`` (arguments included; where the backend reports it, i.e. on
a GPU). Ours uses the current backend (``cuda`` on a GPU, else set
``LSJAX_BACKEND=cpu_ffi``); the reference runs under ``xla``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import jax
import jax.numpy as jnp

from lsjax import ops
from lsjax.ops.cross_entropy import cross_entropy, cross_entropy_reference


def _step(fn):
    def mean_loss(x, y):
        loss, count = fn(x, y, label_smoothing=0.1)
        return jnp.sum(loss) / jnp.maximum(count, 1)
    return jax.value_and_grad(mean_loss)


def peak_bytes(fn, backend: str, tokens: int, vocab: int, dtype) -> dict:
    x = jax.ShapeDtypeStruct((tokens, vocab), dtype)
    y = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    with ops.use_backend(backend):
        mem = jax.jit(_step(fn)).lower(x, y).compile().memory_analysis()
    temp, out, args = mem.temp_size_in_bytes, mem.output_size_in_bytes, mem.argument_size_in_bytes
    return {"temp": temp, "output": out, "argument": args, "peak": temp + out}


def measured_peak(impl: str, tokens: int, vocab: int, dtype) -> int | None:
    """peak_bytes_in_use after one run of the step, in a fresh process (None if not reported)."""
    cmd = [sys.executable, "-m", "benchmarks.cross_entropy_memory", "--tokens", str(tokens), "--vocab", str(vocab),
           "--dtype", jnp.dtype(dtype).name, "--measure", impl]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes_in_use"]


def _measure(impl: str, tokens: int, vocab: int, dtype) -> None:
    fn, backend = (cross_entropy, ops.get_backend()) if impl == "ours" else (cross_entropy_reference, "xla")
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (tokens, vocab), dtype)
    y = jax.random.randint(key_y, (tokens,), 0, vocab)
    with ops.use_backend(backend):
        jax.block_until_ready(jax.jit(_step(fn))(x, y))
    stats = jax.devices()[0].memory_stats() or {}
    print(json.dumps({"peak_bytes_in_use": stats.get("peak_bytes_in_use")}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--measure", choices=("ours", "ref"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    if args.measure:
        _measure(args.measure, args.tokens, args.vocab, dtype)
        return
    ours_backend = ops.get_backend()
    if ours_backend == "xla":
        print("note: backend 'xla' selected for ours too; set LSJAX_BACKEND=cuda or cpu_ffi")
    rows = [("lsjax (" + ours_backend + ")", peak_bytes(cross_entropy, ours_backend, args.tokens, args.vocab, dtype)),
            ("xla reference", peak_bytes(cross_entropy_reference, "xla", args.tokens, args.vocab, dtype))]
    print(f"device: {jax.devices()[0].device_kind}; fwd+bwd of cross_entropy at {args.tokens}x{args.vocab} {dtype.name}")
    print(f"{'impl':<22}{'temp MiB':>10}{'output MiB':>12}{'peak MiB':>10}")
    for name, r in rows:
        print(f"{name:<22}{r['temp'] / 2**20:>10.1f}{r['output'] / 2**20:>12.1f}{r['peak'] / 2**20:>10.1f}")
    ratio = rows[1][1]["peak"] / max(rows[0][1]["peak"], 1)
    print(f"peak memory (temp + output): ours {rows[0][1]['peak']} B, reference {rows[1][1]['peak']} B "
          f"({ratio:.2f}x less with ours)")
    peaks = {impl: measured_peak(impl, args.tokens, args.vocab, dtype) for impl in ("ours", "ref")}
    if None in peaks.values():
        print("measured peak_bytes_in_use: not reported by this backend")
    else:
        print(f"measured peak_bytes_in_use after one step (logits and labels included): ours "
              f"{peaks['ours'] / 2**20:.1f} MiB, reference {peaks['ref'] / 2**20:.1f} MiB "
              f"({peaks['ref'] / peaks['ours']:.2f}x less with ours)")


if __name__ == "__main__":
    main()
