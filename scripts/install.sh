#!/usr/bin/env bash
# Installs lsjax in editable mode with its runtime (and optional extra) deps.
# jax must be importable at build time (the XLA FFI headers ship with jaxlib),
# so the build deps are installed first and the build reuses this environment.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
python -m pip install -q "jax>=0.10" "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
python -m pip install -q --no-build-isolation -e ".${extra:+[$extra]}"
