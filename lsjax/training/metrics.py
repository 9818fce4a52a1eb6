"""Run bookkeeping: JSON-lines metrics, compile counting per shape, a non-finite-loss guard,
persistent compilation cache."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jax
from jax.experimental.compilation_cache import compilation_cache


class MetricsWriter:
    """Appends one JSON object per line (``{"step": ..., "kind": "train"|"eval"|..., ...}``).

    TensorBoard users can convert with any JSONL reader; the file survives crashes line by line.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)

    def write(self, step: int, kind: str, **values: Any) -> None:
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update({k: (float(v) if hasattr(v, "dtype") else v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file in order, optionally only those of one ``kind``."""
    lines = Path(path).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


class ShapeCompileTracker:
    """Wraps a jitted function; the first call per distinct argument shape is timed as its compile.

    ``compile_seconds`` maps a shape signature to the wall time of its first call (trace + compile
    + one execution, or a persistent-cache load), or to its compile time under :meth:`precompile`;
    ``len(tracker)`` is the number of programs.
    """

    def __init__(self, fn: Callable, signature: Callable[..., tuple]):
        self.fn, self.signature = fn, signature
        self.compile_seconds: dict[tuple, float] = {}
        self.precompile_seconds = 0.0  # wall time of :meth:`precompile` (its compiles overlap)
        self._compiled: dict[tuple, Callable] = {}

    def precompile(self, arg_specs: Sequence[tuple]) -> None:
        """Compiles the programs for ``arg_specs`` (tuples of ``jax.ShapeDtypeStruct`` with
        shardings, one per shape) at once: traced and lowered here one by one, then compiled in
        parallel threads (XLA compiles outside the GIL, and mostly on one core per program), so the
        first steps wait for the slowest compile, not for the sum. Later calls with those shapes
        run the compiled executables; their arguments must have the specs' shardings."""
        start = time.perf_counter()
        todo = {self.signature(*spec): spec for spec in arg_specs}
        lowered = {sig: self.fn.lower(*spec) for sig, spec in todo.items() if sig not in self._compiled}

        def compile_one(item):
            sig, low = item
            t0 = time.perf_counter()
            return sig, low.compile(), time.perf_counter() - t0

        with ThreadPoolExecutor(max_workers=max(1, len(lowered))) as pool:
            for sig, compiled, seconds in pool.map(compile_one, lowered.items()):
                self._compiled[sig], self.compile_seconds[sig] = compiled, seconds
        self.precompile_seconds += time.perf_counter() - start

    def __call__(self, *args):
        sig = self.signature(*args)
        if sig in self._compiled:
            return self._compiled[sig](*args)
        if sig in self.compile_seconds:
            return self.fn(*args)
        start = time.perf_counter()
        out = jax.block_until_ready(self.fn(*args))
        self.compile_seconds[sig] = time.perf_counter() - start
        return out

    def __len__(self) -> int:
        return len(self.compile_seconds)


class NonFiniteLossError(FloatingPointError):
    """A training step produced an inf/NaN loss; the run stops without saving that state."""


class LossGuard:
    """Raises :class:`NonFiniteLossError` naming the first step whose loss is inf/NaN.

    ``push`` checks the *previous* step's loss, so the host never waits for the step it has just
    dispatched; ``flush`` checks the pending one now (call it before saving or evaluating).
    """

    def __init__(self):
        self._pending: tuple[int, jax.Array] | None = None

    def push(self, step: int, loss: jax.Array) -> None:
        self.flush()
        self._pending = (step, loss)

    def flush(self) -> None:
        if self._pending is None:
            return
        (step, loss), self._pending = self._pending, None
        value = float(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at step {step}; stopping without saving this state (the last "
                "checkpoint, if any, is untouched). Try a lower optimizer.lr or optimizer.clip_norm > 0, "
                "and check the data.")


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache (a second run of a config compiles nothing).

    ``None`` leaves JAX's cache settings as they are.
    """
    if not directory:
        return None
    path = os.path.expanduser(directory)
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, path):
        compilation_cache.reset_cache()  # JAX opens its cache once; reopen it at the new path
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
