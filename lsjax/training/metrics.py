"""Run bookkeeping: JSON-lines metrics, compile counting per shape, persistent compilation cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax


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
    lines = Path(path).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


class ShapeCompileTracker:
    """Wraps a jitted function; the first call per distinct argument shape is timed as its compile.

    ``compile_seconds`` maps a shape signature to the wall time of its first call (trace + compile
    + one execution, or a persistent-cache load); ``len(tracker)`` is the number of programs.
    """

    def __init__(self, fn: Callable, signature: Callable[..., tuple]):
        self.fn, self.signature = fn, signature
        self.compile_seconds: dict[tuple, float] = {}

    def __call__(self, *args):
        sig = self.signature(*args)
        if sig in self.compile_seconds:
            return self.fn(*args)
        start = time.perf_counter()
        out = jax.block_until_ready(self.fn(*args))
        self.compile_seconds[sig] = time.perf_counter() - start
        return out

    def __len__(self) -> int:
        return len(self.compile_seconds)


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache (a second run of a config compiles nothing)."""
    if not directory:
        return None
    path = os.path.expanduser(directory)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
