#!/usr/bin/env bash
# The README's test command: install lsjax with its test extras (compiling the
# CPU handlers and, where nvcc is found, the CUDA kernels), then run pytest.
# GPU tests are skipped without a GPU. pytest's exit status is returned as is
# (5 = no tests collected is a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -m pytest -q "$@"
