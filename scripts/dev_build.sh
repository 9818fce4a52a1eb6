#!/usr/bin/env bash
# Incremental in-tree build for development: compiles lsjax._ffi into
# build/dev and copies it next to the sources, so `python -m pytest` from the
# repository root uses this checkout. (Users install with pip; see README.)
# LSJAX_CUDA_ARCHITECTURES=90a-real speeds up CUDA builds on one target.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip show pybind11 >/dev/null
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v python)" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
  -DLSJAX_CUDA="${LSJAX_CUDA:-AUTO}" \
  -DLSJAX_CUDA_ARCHITECTURES="${LSJAX_CUDA_ARCHITECTURES:-80-real;90a-real;90-virtual}" >/dev/null
cmake --build build/dev
cp build/dev/_ffi*.so lsjax/
