"""Backend selection for the fused ops: ``"cuda" | "cpu_ffi" | "xla"``.

* ``"cuda"``: our CUDA kernels through XLA FFI custom calls (needs a GPU and a
  build with nvcc).
* ``"cpu_ffi"``: the plain C++ twins through the same custom-call path, on CPU.
* ``"xla"``: the pure-JAX reference; runs everywhere (CPU/GPU/TPU fallback).

The default is ``"cuda"`` when JAX's default backend is a GPU and the CUDA
targets were built, else ``"xla"``. ``LSJAX_BACKEND`` and :func:`use_backend`
override it; a forced backend that is unavailable raises
:class:`BackendUnavailableError` (never a silent fallback).

The backend is part of JAX's trace context (like ``jax.default_matmul_precision``):
a ``jax.jit`` function retraces when it is called under another backend.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from types import ModuleType

import jax

BACKENDS = ("cuda", "cpu_ffi", "xla")
_FFI_PLATFORM = {"cuda": "CUDA", "cpu_ffi": "cpu"}
_TARGET_SUFFIX = {"cuda": "cuda", "cpu_ffi": "cpu"}

_BUILD_HINT = (
    "Build the extension from the repository root with "
    "`pip install --no-build-isolation -e .` (CUDA kernels need nvcc on PATH; "
    "force them with LSJAX_CUDA=ON)."
)

# A JAX config state, so the forced backend is part of jit's cache key and a
# function traced under one backend is retraced under another.
from jax._src import config as _jax_config  # noqa: E402

_override = _jax_config.optional_enum_state(
    name="lsjax_backend",
    enum_values=BACKENDS,
    default=None,
    help="Backend forced by lsjax.ops.use_backend (None: LSJAX_BACKEND or the default).",
    include_in_jit_key=True,
    include_in_trace_context=True,
)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this build or machine cannot run."""


@functools.cache
def _extension() -> ModuleType | None:
    """Imports ``lsjax._ffi`` and registers its targets with XLA, once."""
    try:
        from lsjax import _ffi
    except ImportError:
        return None
    for platform in ("cpu", "CUDA"):
        for name, capsule in _ffi.targets(platform).items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
    return _ffi


def registered_targets() -> dict[str, list[str]]:
    """FFI target names registered per platform (``{"cpu": [...], "CUDA": [...]}``)."""
    ext = _extension()
    if ext is None:
        return {"cpu": [], "CUDA": []}
    return {p: sorted(ext.targets(p)) for p in ("cpu", "CUDA")}


def _has_gpu() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name not in BACKENDS:
        return f"unknown lsjax backend {name!r}; choose one of {BACKENDS}"
    if name == "xla":
        return None
    ext = _extension()
    if ext is None:
        return f"backend {name!r} needs the compiled extension lsjax._ffi, which is not built. {_BUILD_HINT}"
    if name == "cuda":
        if not ext.cuda_built:
            return f"backend 'cuda' needs the CUDA targets, but lsjax._ffi was built without nvcc. {_BUILD_HINT}"
        if not _has_gpu():
            return "backend 'cuda' needs a GPU visible to JAX (jax.devices('gpu') is empty)"
    return None


def available_backends() -> tuple[str, ...]:
    """The backends that can run on this machine with this build."""
    return tuple(b for b in BACKENDS if unavailable_reason(b) is None)


def default_backend() -> str:
    """``"cuda"`` on a GPU with the CUDA targets built, else ``"xla"``."""
    if jax.default_backend() == "gpu" and unavailable_reason("cuda") is None:
        return "cuda"
    return "xla"


def _checked(name: str, source: str) -> str:
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"{reason} (asked for by {source})")
    return name


def get_backend() -> str:
    """The backend ops use now: :func:`use_backend` > ``LSJAX_BACKEND`` > default."""
    forced = _override.value
    if forced is not None:
        return forced
    env = os.environ.get("LSJAX_BACKEND")
    if env:
        return _checked(env, "the LSJAX_BACKEND environment variable")
    return default_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager forcing the ops' backend; raises if it cannot run here."""
    with _override(_checked(name, "lsjax.ops.use_backend")):
        yield name


def ffi_target(op: str, backend: str) -> str:
    """XLA FFI target name of ``op`` for an FFI backend (``"cuda"``/``"cpu_ffi"``)."""
    return f"lsjax_{op}_{_TARGET_SUFFIX[backend]}"


# Register the targets once, at import.
_extension()
