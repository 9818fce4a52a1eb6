"""Backend switch: defaults, overrides, and no silent fallback."""

import jax
import jax.numpy as jnp
import pytest

import lsjax
from lsjax import ops


def test_extension_lists_targets():
    import lsjax._ffi as ext

    cpu = ext.targets("cpu")
    assert "lsjax_layer_norm_fwd_cpu" in cpu and "lsjax_layer_norm_bwd_cpu" in cpu
    if ext.cuda_built:
        assert "lsjax_layer_norm_fwd_cuda" in ext.targets("CUDA")
    assert ops.registered_targets()["cpu"] == sorted(cpu)


def test_default_backend_on_this_machine():
    expected = "cuda" if ops.backend.unavailable_reason("cuda") is None and jax.default_backend() == "gpu" else "xla"
    assert ops.default_backend() == expected
    assert "xla" in ops.available_backends() and "cpu_ffi" in ops.available_backends()


def test_use_backend_overrides_and_restores():
    before = ops.get_backend()
    with ops.use_backend("cpu_ffi"):
        assert ops.get_backend() == "cpu_ffi"
        with ops.use_backend("xla"):
            assert ops.get_backend() == "xla"
        assert ops.get_backend() == "cpu_ffi"
    assert ops.get_backend() == before


def test_env_var(monkeypatch):
    monkeypatch.setenv("LSJAX_BACKEND", "cpu_ffi")
    assert ops.get_backend() == "cpu_ffi"
    monkeypatch.setenv("LSJAX_BACKEND", "nonsense")
    with pytest.raises(ops.BackendUnavailableError, match="unknown lsjax backend"):
        ops.get_backend()


@pytest.mark.skipif(ops.backend.unavailable_reason("cuda") is None, reason="CUDA is available here")
def test_forcing_unavailable_cuda_raises(monkeypatch):
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        with ops.use_backend("cuda"):
            pass
    monkeypatch.setenv("LSJAX_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="LSJAX_BACKEND"):
        ops.layer_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4))


def test_missing_extension_still_imports(monkeypatch):
    monkeypatch.setattr(ops.backend, "_extension", lambda: None)
    assert ops.backend.unavailable_reason("xla") is None
    reason = ops.backend.unavailable_reason("cpu_ffi")
    assert reason is not None and "pip install" in reason
    with pytest.raises(ops.BackendUnavailableError, match="not built"):
        with ops.use_backend("cpu_ffi"):
            pass
    assert lsjax.ops.layer_norm is not None


def test_jit_retraces_under_another_backend():
    x, s, b = jnp.ones((4, 8)), jnp.ones(8), jnp.zeros(8)
    step = jax.jit(lambda x: ops.layer_norm(x, s, b))

    def targets():
        return "lsjax_layer_norm_fwd_cpu" in step.lower(x).compile().as_text()

    with ops.use_backend("xla"):
        step(x)
        assert not targets()
    with ops.use_backend("cpu_ffi"):
        step(x)
        assert targets()
