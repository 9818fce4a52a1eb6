"""Test setup: 8 fake CPU devices for the sharding tests, GPU marker handling."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

from lsjax.ops import backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    reason = backend.unavailable_reason("cuda")
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """Fresh random inputs per test (unseeded: every run draws new ones, so a test must hold for any draw)."""
    import numpy as np

    return np.random.default_rng()


def pytest_report_header(config):
    return f"lsjax backends available: {backend.available_backends()}; jax {jax.__version__}"
