#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the GPU tests, the op benchmarks and any
# model-level benchmarks; logs and JSON go under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh [--ops layer_norm,...|none] [--tests tests/test_x.py ...|none]
#                                             ($OPS_ONLY: a regex over 'op shape dtype' of the op cases)
#                                             [--bench layers,layers_cudnn,decode,train_step,...]
#
# Everything is packed into $OUT/results.tgz at the end.
# --bench names (each writes <name>.json and <name>.log):
#   layers        benchmarks/layers.py (fused attention softmax)
#   layers_cudnn  benchmarks/layers.py --attention-impl fused,cudnn --dtypes bf16 (both paths, no attention-prob
#                 dropout anywhere: picks the default path)
#   decode        benchmarks/decode.py (decode_bar: only the issue's bar rows, bf16 batch 8 and 64, + top-k,
#                 each with our stop check every 8 steps (the default) and every step; decode_ln: the same rows
#                 with our decode layer norm as XLA's and as the fused op, no top-k; decode_dense: the same rows
#                 with our decode projections as lsjax.ops.decode_dense and as XLA GEMMs (the default), no
#                 top-k; decode_xla: the same rows
#                 under each XLA option set of benchmarks.profile.XLA_OPTIONS, or those in $DECODE_XLA_OPTIONS, no top-k)
#   ce_memory     benchmarks/cross_entropy_memory.py at 8192 x 32000 bf16 (compiled and measured peak memory)
#   profile_train / profile_decode   benchmarks/profile.py: per-kernel device time of the train step
#                 ($PROFILE_MODEL, default transformer-base) ($PROFILE_TRAIN: impl:dtype[:xla options of benchmarks.profile[:lsjax overrides as train_step's,
#                 e.g. optimizer.kernel=multi]], default "lsjax:bfloat16 plain:bfloat16") / the
#                 batch-8 beam search ($PROFILE_DECODE: impl:options pairs, default "lsjax:default plain:default
#                 lsjax:while"); tables in $OUT/<name>.log, JSON and optimized HLO in $OUT/profile_*
#   profile_case  the same per-kernel table for op cases' fwd+bwd, ours and the XLA reference ($PROFILE_CASES:
#                 space-separated module:shape:dtype[:op], default "embedding:256x256x1024:bfloat16"), and the
#                 last call's timeline ($PROFILE_APPS applications per call, default 1)
#   sass          SASS instruction counts of our kernels (cuobjdump; $SASS_KERNELS: a regex over the names)
#   train_step    benchmarks/train_step.py (train_step_base / train_step_big: one model each; + $TRAIN_STEP_ARGS,
#                 e.g. "--dtypes bfloat16 --lsjax-overrides scan_layers=true")
#   ncu           Nsight Compute on single op calls (benchmarks/ncu_case.py): $NCU_CASES = space-separated
#                 module:shape:dtype[:kernel regex[:op[:grad]]], e.g. "beam_topk:8x4x32000:bfloat16:Chunk|Merge"
#                 (a sixth field, any word, profiles the case's fwd+bwd: "layer_norm:8192x512:bfloat16:LnBwd::grad")
#   parallel      benchmarks/parallel.py (needs 2 GPUs; + $PARALLEL_ARGS)
#   train_mesh    lsjax-train tiny-synthetic under each of $TRAIN_MESHES (default dp zero3 tp) on all GPUs
#   multi30k      benchmarks/convergence.sh lsjax      (needs .data/multi30k: pass it in `carry`)
#   multi30k_fp32 benchmarks/convergence.sh fp32master   (both + $MULTI30K_OVERRIDES, key=value ...)
#   decode_quality  a 2000-step multi30k run (+ $MULTI30K_OVERRIDES, no BLEU eval), then
#                 benchmarks/decode_quality.py on its checkpoint ($DECODE_QUALITY_ARGS, e.g. --variants ...)
# Through the device tool:  run(command="OUT=$OUT timeout 570 bash benchmarks/gpu_check.sh ...", carry=[".data", ".whl"])
# where .whl holds the runtime wheels the GPU image lacks, fetched here with
#   pip download -d .whl sentencepiece sacrebleu tqdm pyyaml --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 && rm .whl/numpy-*
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OPS=""
TESTS=(tests)
BENCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --ops) OPS="$2"; shift 2 ;;
    --bench) BENCH="$2"; shift 2 ;;
    --tests) shift; TESTS=(); while [ $# -gt 0 ] && [[ "$1" != --* ]]; do TESTS+=("$1"); shift; done ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LSJAX_CUDA=ON
# NVLink multicast stays off on the shared multi-GPU hosts (KINDS.md): set here too, in case the image does not.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LSJAX_COMPILATION_CACHE=${LSJAX_COMPILATION_CACHE:-/tmp/lsjax_jax_cache}
status=0
# The device tool returns few files: everything goes back in one archive, also when the run is
# stopped early (run it as `timeout 570 bash benchmarks/gpu_check.sh ...` so that a TERM arrives
# before the device call's own limit).
pack() {  # (+ the metrics of a convergence run that was stopped before it copied them)
  for run in /tmp/lsjax_runs/*/; do
    [ -f "$run/metrics.jsonl" ] && mkdir -p "$OUT/runs/$(basename "$run")" && cp "$run"/*.json* "$OUT/runs/$(basename "$run")/"
  done
  tar czf /tmp/gpu_check_results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu_check_results.tgz "$OUT/results.tgz"
}
trap pack EXIT
trap 'echo "stopped early (signal): packing what ran"; exit 124' TERM INT

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu --format=csv
  nvidia-smi topo -m; date -u; git rev-parse --short HEAD; git status --short | head -20; } > "$OUT/machine.txt" 2>&1
if [ -d .whl ]; then  # runtime deps the GPU image lacks (no network there): carried wheels, installed if missing
  $PY -m pip install -q --no-index --find-links .whl sentencepiece sacrebleu tqdm pyyaml > "$OUT/deps.log" 2>&1 \
    || { cat "$OUT/deps.log"; status=1; }
fi
echo "== build" | tee "$OUT/build.log"
t0=$SECONDS
if ! $PY -m pip install --no-build-isolation --no-deps -v -e . >> "$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "(build took $((SECONDS - t0)) s)"
grep -E "warning|error" "$OUT/build.log" | grep -v "^ *$" | head -20
$PY -m lsjax | tee "$OUT/info.txt"

if [ "${TESTS[*]}" != "none" ]; then
  echo "== GPU tests"
  # Compilation dominates them (~1 s a test): pytest-xdist workers (GPU_TEST_WORKERS, default 4)
  # share the GPU, each allocating on demand instead of preallocating 75% of it.
  workers=()
  if [ "${GPU_TEST_WORKERS:-4}" -gt 1 ] && $PY -c "import xdist" 2>/dev/null; then
    workers=(-n "${GPU_TEST_WORKERS:-4}")
  fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m pytest -q -m gpu -p no:cacheprovider "${workers[@]}" "${TESTS[@]}" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "$OPS" != "none" ]; then
  echo "== op benchmarks"
  # SM/memory clocks and power every 0.5 s while they run: kernels' speed follows the clocks the GPU holds.
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 500 \
    > "$OUT/clocks.csv" 2>&1 &
  clocks_pid=$!
  $PY -m benchmarks.ops ${OPS:+--ops "$OPS"} ${OPS_ONLY:+--only "$OPS_ONLY"} --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  kill "$clocks_pid" 2>/dev/null
fi

bench() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "it/s\]" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "($name took $((SECONDS - t0)) s)"
}
for name in ${BENCH//,/ }; do
  case "$name" in
    layers) bench layers $PY -m benchmarks.layers --out "$OUT/layers.json" ;;
    layers_cudnn) bench layers_cudnn $PY -m benchmarks.layers --attention-impl fused,cudnn --dtypes bf16 \
                    --out "$OUT/layers_cudnn.json" ;;
    decode) bench decode $PY -m benchmarks.decode --out "$OUT/decode.json" ;;
    ce_memory) bench ce_memory $PY -m benchmarks.cross_entropy_memory --tokens 8192 --vocab 32000 --dtype bfloat16 ;;
    decode_bar) bench decode_bar $PY -m benchmarks.decode --batches 8,64 --dtypes bfloat16 --steps-per-check 8,1 \
                  --out "$OUT/decode_bar.json" ;;
    decode_ln) bench decode_ln $PY -m benchmarks.decode --batches 8,64 --dtypes bfloat16 --layer-norm xla,fused --no-topk \
                  --out "$OUT/decode_ln.json" ;;
    decode_dense) bench decode_dense $PY -m benchmarks.decode --batches 8,64 --dtypes bfloat16 --decode-dense fused,xla \
                  --no-topk --out "$OUT/decode_dense.json" ;;
    decode_xla) bench decode_xla $PY -m benchmarks.decode --batches 8,64 --dtypes bfloat16 --no-topk \
                  --xla-options "${DECODE_XLA_OPTIONS:-default,while,cublas,while+cublas}" --out "$OUT/decode_xla.json" ;;
    profile_train) for v in ${PROFILE_TRAIN:-lsjax:bfloat16 plain:bfloat16}; do IFS=: read -r impl dtype xopt ovr <<< "$v"
        set -- "$impl" "$dtype" "${xopt:-default}"
        name="profile_train_$1_$2${xopt:+_$xopt}${ovr:+_${ovr//[=.,]/-}}"
        bench "$name" $PY -m benchmarks.profile train --model "${PROFILE_MODEL:-transformer-base}" --impl $1 --dtype $2 \
          --xla-options $3 --top "${PROFILE_TOP:-40}" \
          ${ovr:+--lsjax-overrides "$ovr"} --out "$OUT/$name.json" --hlo "$OUT/$name.hlo.txt"
      done ;;
    profile_decode) for v in ${PROFILE_DECODE:-lsjax:default plain:default lsjax:while}; do set -- ${v/:/ }
        bench "profile_decode_$1_$2" $PY -m benchmarks.profile decode --impl $1 --xla-options $2 --top "${PROFILE_TOP:-40}" \
          --out "$OUT/profile_decode_$1_$2.json" --hlo "$OUT/profile_decode_$1_$2.hlo.txt"
      done ;;
    profile_case) for c in ${PROFILE_CASES:-embedding:256x256x1024:bfloat16}; do for impl in lsjax plain; do
        bench "profile_case_${impl}_${c//:/_}" $PY -m benchmarks.profile case --case "$c" --impl $impl \
          --top "${PROFILE_TOP:-20}" --timeline --apps "${PROFILE_APPS:-1}" --out "$OUT/profile_case_${impl}_${c//:/_}.json"
      done; done ;;
    sass) bench sass $PY -m benchmarks.sass_count "${SASS_KERNELS:-.}" ;;
    train_step) bench train_step $PY -m benchmarks.train_step --out "$OUT/train_step.json" ;;
    train_step_base|train_step_big)
      bench "$name" $PY -m benchmarks.train_step --models "transformer-${name#train_step_}" --out "$OUT/$name.json" \
        ${TRAIN_STEP_ARGS:-} ;;
    ncu) for c in ${NCU_CASES:-beam_topk:8x4x32000:bfloat16:Chunk|Merge}; do IFS=: read -r mod shape dtype regex op grad <<< "$c"
        bench "ncu_${op:-$mod}_${shape}_${dtype}${grad:+_grad}" ncu --clock-control none ${regex:+-k "regex:$regex"} -c "${NCU_COUNT:-4}" \
          --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
          --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats \
          --section ComputeWorkloadAnalysis $PY -m benchmarks.ncu_case "$mod" "$shape" "$dtype" \
          ${op:+--op "$op"} ${grad:+--grad}
      done ;;
    parallel) bench parallel $PY -m benchmarks.parallel --out "$OUT/parallel.json" ${PARALLEL_ARGS:-} ;;
    train_mesh) for mesh in ${TRAIN_MESHES:-dp zero3 tp}; do  # the CLI on every GPU under a mesh config
        bench "train_mesh_$mesh" lsjax-train --config tiny-synthetic --mesh "configs/mesh/$mesh.yaml" \
          --run-dir "/tmp/lsjax_runs/tiny_$mesh" precision=fp16 steps=300 eval.every=300
      done ;;
    multi30k) bench multi30k bash benchmarks/convergence.sh lsjax ${MULTI30K_OVERRIDES:-} ;;
    decode_quality)
      bench decode_quality_train bash benchmarks/convergence.sh lsjax steps=2000 eval.every=2000 checkpoint.every=2000 \
        eval.bleu=false ${MULTI30K_OVERRIDES:-}
      bench decode_quality $PY -m benchmarks.decode_quality --run-dir /tmp/lsjax_runs/multi30k_lsjax \
        --out "$OUT/decode_quality.json" ${DECODE_QUALITY_ARGS:-} ;;
    multi30k_fp32) bench multi30k_fp32 bash benchmarks/convergence.sh fp32master ${MULTI30K_OVERRIDES:-} ;;
    *) echo "unknown --bench $name" >&2; status=1 ;;
  esac
done
exit $status
