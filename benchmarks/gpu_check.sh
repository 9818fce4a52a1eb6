#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the GPU tests and the op
# benchmarks, leave logs and JSON under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh [--ops layer_norm,...] [--tests tests/test_x.py ...]
#
# Through the device tool:  run(command="bash benchmarks/gpu_check.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OPS=""
TESTS=(tests)
while [ $# -gt 0 ]; do
  case "$1" in
    --ops) OPS="$2"; shift 2 ;;
    --tests) shift; TESTS=(); while [ $# -gt 0 ] && [[ "$1" != --* ]]; do TESTS+=("$1"); shift; done ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LSJAX_CUDA=ON
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; git rev-parse --short HEAD; } > "$OUT/machine.txt" 2>&1
echo "== build" | tee "$OUT/build.log"
if ! $PY -m pip install --no-build-isolation --no-deps -v -e . >> "$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "warning|error" "$OUT/build.log" | grep -v "^ *$" | head -20
$PY -m lsjax | tee "$OUT/info.txt"

echo "== GPU tests"
$PY -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== op benchmarks"
$PY -m benchmarks.ops ${OPS:+--ops "$OPS"} --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
